"""The message contract of the documents topic, and the dead-letter record for what breaks it.

A message value is a UTF-8 JSON object `{"id", "text", "domain"?, "source"?, "ts"?}`. `domain`
names one of the configured domains; when it is absent the routing model picks a specialist and
the document goes to that specialist's first domain, recorded as `assigned_by: "router"` with
the router's confidence, unless the routing model puts it in no specialist's domain (its `none` class at least
`serve.none_threshold`, as the router's `auto` reads it): such a document would teach a specialist text of no domain,
so it becomes a `no_domain` dead letter, to produce back with a `domain` where an operator knows one. `check_message` turns one message value into either a dataset row or a
`Rejection` (a reason code plus a human detail); it is plain Python, so every rule is tested
without Kafka. A rejected message becomes a dead letter on the dead-letter topic: where it
came from and why in its Kafka headers (`senmon.reason`, `senmon.detail`,
`senmon.topic`, `senmon.partition`, `senmon.offset`, `senmon.timestamp`), and the original key
and value unchanged, so it costs no more bytes than the message did and can be produced back
onto the documents topic once fixed (`dead_letter_headers`, `read_dead_letter`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

# Reason codes in dead letters, with what they mean.
REASONS = {
    "oversize": "the message is larger than ingest.max_document_bytes",
    "invalid_json": "the value is not UTF-8 JSON",
    "not_an_object": "the JSON value is not an object",
    "missing_id": "no 'id', or it is not a non-empty string",
    "missing_text": "no 'text', or it is empty or not a string",
    "bad_field": "'domain', 'source' or 'ts' has the wrong type",
    "unknown_domain": "'domain' names no configured domain",
    "no_router": "no domain and no routing model",
    "no_domain": "no domain given, and the routing model puts the text in no specialist's domain",
}


class Router(Protocol):  # train/routing.py's RoutingModel: a Route (specialist, confidence, none, ...) per text
    def route(self, texts: list[str]) -> list: ...


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


@dataclass(frozen=True)
class Routing:
    """What the bridge needs to know about the configuration: domains and who owns them."""

    domains: frozenset[str]
    domain_of_specialist: dict[str, str]  # a routed document joins its specialist's first domain
    none_threshold: float = 1.01  # the routing model's `none` from which a document is in no domain (above 1: never)

    @classmethod
    def from_config(cls, config) -> "Routing":
        return cls(frozenset(config.domains), {s.name: s.domains[0] for s in config.specialists},
                   config.serve.none_threshold)


def check_message(value: bytes | None, max_bytes: int, routing: Routing) -> dict | Rejection:
    """A dataset row (keys of INGESTED_SCHEMA) for a valid message, else the reason it is rejected.

    A message without a domain is returned with `domain: None`; `route` fills it in, in batches.
    """
    if value is None:
        return Rejection("invalid_json", "the message has no value")
    if len(value) > max_bytes:
        return Rejection("oversize", f"{len(value)} bytes > {max_bytes}")
    try:
        doc = json.loads(value)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return Rejection("invalid_json", str(error)[:200])
    if not isinstance(doc, dict):
        return Rejection("not_an_object", f"a JSON {type(doc).__name__}")
    doc_id, text = doc.get("id"), doc.get("text")
    if not isinstance(doc_id, str) or not doc_id.strip():
        return Rejection("missing_id", f"id is {doc_id!r}"[:200])
    if not isinstance(text, str) or not text.strip():
        return Rejection("missing_text", "text is missing" if text is None else f"text is {text!r}"[:200])
    domain, source, ts = doc.get("domain"), doc.get("source"), doc.get("ts")
    if domain is not None and not isinstance(domain, str):
        return Rejection("bad_field", f"domain is a {type(domain).__name__}")
    if source is not None and not isinstance(source, str):
        return Rejection("bad_field", f"source is a {type(source).__name__}")
    if ts is not None and not isinstance(ts, (str, int, float)):
        return Rejection("bad_field", f"ts is a {type(ts).__name__}")
    if domain is not None and domain not in routing.domains:
        return Rejection("unknown_domain", f"{domain!r} (configured: {', '.join(sorted(routing.domains))})"[:300])
    return {"id": doc_id, "domain": domain, "text": text, "source": source or "kafka",
            "assigned_by": "producer" if domain is not None else None, "route_confidence": None}


def route(rows: list[dict], routing: Routing, router: Router | None) -> list[dict | Rejection]:
    """Give every row without a domain its specialist's domain, or a `no_router` or `no_domain` rejection."""
    unrouted = [row for row in rows if row["domain"] is None]
    if not unrouted:
        return list(rows)
    if router is None:
        assigned = {id(row): Rejection("no_router", REASONS["no_router"]) for row in unrouted}
    else:
        assigned = {}
        for row, decided in zip(unrouted, router.route([row["text"] for row in unrouted])):
            domain = routing.domain_of_specialist.get(decided.specialist)
            if decided.none >= routing.none_threshold:
                assigned[id(row)] = Rejection("no_domain", f"none {decided.none:.2f} (at least {routing.none_threshold:.2f}); "
                                                           f"else {decided.specialist} {decided.confidence:.2f}")
            elif domain is None:  # a router trained for another configuration
                assigned[id(row)] = Rejection("unknown_domain",
                                              f"the router chose {decided.specialist!r}, not a configured specialist")
            else:
                assigned[id(row)] = {**row, "domain": domain, "assigned_by": "router",
                                     "route_confidence": float(decided.confidence)}
    return [assigned.get(id(row), row) for row in rows]


def dead_letter_headers(rejection: Rejection, topic: str, partition: int, offset: int,
                        timestamp: int | None) -> list[tuple[str, bytes]]:
    """Kafka headers of a dead letter; its key and value are the original message's, byte for byte."""
    fields = {"reason": rejection.reason, "detail": rejection.detail, "topic": topic, "partition": partition,
              "offset": offset, "timestamp": timestamp}
    return [(f"senmon.{name}", str(value).encode("utf-8")) for name, value in fields.items() if value is not None]


def read_dead_letter(headers: list[tuple[str, bytes]], value: bytes | None) -> dict:
    """A dead letter as a dict: the header fields plus `original` (the message value)."""
    fields = {name.removeprefix("senmon."): raw.decode("utf-8") for name, raw in headers if name.startswith("senmon.")}
    for name in ("partition", "offset", "timestamp", "original_bytes"):
        if name in fields:
            fields[name] = int(fields[name])
    return {**fields, "original": value}
