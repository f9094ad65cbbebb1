"""The status data without Ray (senmon/status.py) and its page in a real headless Chromium on a fixed sample.

The page against a real router, with real keys, is tests/test_serve.py's `test_status_page_in_chromium`.
"""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from senmon.config import parse_config
from senmon.status import (TABLE_HEADERS, RoutingWindow, StatusData, SwapLog, accuracy_line, collect_status, parse_iso,
                           shape_status, table_rows)

REPO = Path(__file__).resolve().parents[1]
NOW = parse_iso("2026-11-26T12:00:00Z")


@pytest.fixture()
def config(tmp_path, embedded_config_data):
    return parse_config(dict(embedded_config_data, storage_root=str(tmp_path / "storage")), source="test",
                        base_dir=REPO / "configs")


def record(name: str, version: int, status: str, ppl: float | None, created: str = "2026-11-26T11:00:00Z") -> dict:
    return {"specialist": name, "version": version, "status": status, "metrics": {} if ppl is None else {"val_ppl": ppl},
            "created_at": created, "reason": f"{status} reason", "path": f"/secret/checkpoints/{name}-{version}",
            "run_id": f"run-{name}-{version}", "history": [], "sizing": {}, "data": {}}


def run(name: str, outcome: str, ended: str, version: int, **extra) -> dict:
    started = parse_iso(ended) - 100
    return {"run_id": f"{name}-{ended}", "specialist": name, "trigger": "new data", "attempt": 1,
            "started_at": "x", "started_ts": started, "ended_at": ended, "ended_ts": started + 100, "outcome": outcome,
            "version": version, "reason": f"{outcome} because", "data": {}, "swap": None, **extra}


def inputs() -> dict:
    """What collect_status reads from a running system, fixed."""
    law_run = run("law", "serving", "2026-11-26T11:50:00Z", 3, swap_s=0.5,
                  swap={"model": "law", "version": 3, "from_version": 1, "kind": "in_place", "total_s": 0.44,
                        "changed": True})
    japanese_run = run("japanese", "swap_refused", "2026-11-26T11:40:00Z", 2)
    window = RoutingWindow(now=NOW - 7200)
    window.add("law", "auto", now=NOW - 5000)  # older than the hour: not counted
    decisions = [("law", "auto")] * 5 + [("law", "named")] * 2 + [("generalist", "fallback")] * 3
    for model, route in decisions:
        window.decided(SimpleNamespace(specialist=model, route=route), now=NOW - 60)
    swaps = SwapLog()
    swaps.add("rollback", {"model": "law", "version": 1, "from_version": 3, "kind": "in_place", "total_s": 0.6,
                           "changed": True}, now=NOW - 30)
    swaps.add("promote", {"model": "japanese", "version": 1, "from_version": 1, "changed": False}, now=NOW - 20)
    swaps.add("promote", None, {"specialist": "japanese", "version": 4}, outcome="refused", error="does not verify",
              now=NOW - 10)
    return dict(
        records={"law": [record("law", 3, "serving", 100.5, "2026-11-26T11:48:20Z"), record("law", 1, "retired", 120.0),
                         record("law", 2, "rejected", 130.0)],
                 "japanese": [record("japanese", 1, "serving", 143.94), record("japanese", 2, "rejected", None)],
                 "generalist": [record("generalist", 1, "serving", 196.4, "2026-11-25T12:00:00Z")]},
        schedule={"law": {"running": False, "waiting": False, "last_run": law_run, "next_due": "2026-11-27T00:00:00Z"},
                  "japanese": {"running": True, "waiting": True, "last_run": japanese_run, "next_due": None}},
        runs=[law_run, japanese_run],
        ingest={"state": "running", "topic": "senmon.documents", "storage_root": "/secret/storage", "group_id": "g",
                "listener": "senmon-scheduler", "workers": [{}, {}], "restarts": 0,
                "partitions": {"0": {"position": 10, "committed": 8, "lag": 5, "worker": 0},
                               "1": {"position": 3, "committed": 3, "lag": 7, "worker": 1},
                               "2": {"position": None, "committed": None, "lag": None, "worker": 1}},
                "totals": {"messages": 13, "bytes": 1000, "documents": 12, "duplicates": 0, "dead_letters": 1},
                "dead_letters_by_reason": {"invalid_json": 1}, "messages_per_s": 2.5, "bytes_per_s": float("nan"),
                "latency_ms": {"p50": 40.0, "p99": 90.0, "samples": 13},
                "specialists": {"law": {"documents": 40, "new_documents": 12, "threshold": 50, "notified": 0},
                                "japanese": {"documents": 0, "new_documents": 0, "threshold": 50, "notified": 0}}},
        router_meta={"test_accuracy_documents": {"law": 0.96, "japanese": 1.0, "code": 0.95},  # train/routing.py's
                     "test_accuracy_snippets_100": {"law": 0.9, "japanese": 0.9, "code": 0.9}},
        routing=window.summary("replica-1", 2, now=NOW), admin_swaps=swaps.recent())


def test_shape_status_from_fixed_inputs(config):
    status = shape_status(config, **inputs(), public=True, now=NOW)
    StatusData.model_validate(status)  # the OpenAPI document describes exactly this shape
    json.dumps(status, allow_nan=False)  # as the router sends it
    models = {m["name"]: m for m in status["models"]}
    assert [m["name"] for m in status["models"]] == ["generalist", "law", "code", "dictionary", "literature", "japanese"]
    law = models["law"]
    assert law["kind"] == "specialist" and law["domains"] == config.specialist("law").domains
    assert law["serving"]["version"] == 3 and law["serving"]["val_ppl"] == 100.5
    assert [(v["version"], v["status"], v["val_ppl"]) for v in law["versions"]] == [
        (1, "retired", 120.0), (2, "rejected", 130.0), (3, "serving", 100.5)]
    assert "path" not in law["serving"]  # no checkpoint paths leave the cluster
    assert law["freshness_s"] == 700.0 and models["generalist"]["freshness_s"] == 86400.0
    assert law["training"]["last"]["duration_s"] == 100.0 and law["training"]["last"]["outcome"] == "serving"
    assert law["training"]["next_due"] == "2026-11-27T00:00:00Z" and law["new_documents"] == 12
    assert models["japanese"]["training"]["running"] and models["japanese"]["versions"][1]["val_ppl"] is None
    assert models["code"]["serving"] is None and models["code"]["versions"] == [] and models["code"]["freshness_s"] is None
    assert models["generalist"]["domains"] == config.domains and models["generalist"]["new_documents"] is None

    routing = status["routing"]
    assert routing["total"] == 10 and routing["routes"] == {"auto": 5, "named": 2, "fallback": 3}
    assert routing["by_model"]["law"] == {"auto": 5, "named": 2, "fallback": 0, "total": 7}
    assert routing["replica"] == "replica-1" and routing["replicas"] == 2 and routing["since"] == "2026-11-26T11:01:00Z"

    # newest first: two admin swaps of this replica (the unchanged promote is left out), then the scheduler's
    assert [(s["model"], s["outcome"], s["source"]) for s in status["swaps"]] == [
        ("japanese", "refused", "admin promote"), ("law", "done", "admin rollback"),
        ("law", "done", "retrain (new data)"), ("japanese", "refused", "retrain (new data)")]
    assert status["swaps"][2]["seconds"] == 0.44 and status["swaps"][2]["kind"] == "in_place"
    assert status["swaps"][0]["version"] == 4 and status["swaps"][0]["error"] == "does not verify"

    assert status["ingest"]["lag"] == 12 and "storage_root" not in status["ingest"] and "listener" not in status["ingest"]
    assert status["ingest"]["bytes_per_s"] is None  # not a number: none (JSON has no NaN)
    accuracy = status["router_accuracy"]
    assert accuracy["documents"] == pytest.approx(0.97) and accuracy["snippets_100"] == pytest.approx(0.9)
    assert accuracy["by_model"]["japanese"] == {"documents": 1.0, "snippets_100": 0.9}
    assert status["generated_at"] == "2026-11-26T12:00:00Z" and status["unavailable"] == {}


def test_senmon_status_table_comes_from_the_same_data(config):
    from senmon.ingest.metrics import format_ingest_status

    data = inputs()
    data["ingest"]["bytes_per_s"] = 100.0
    status = shape_status(config, **data, now=NOW)
    rows = {row[0]: row for row in table_rows(status)}
    assert TABLE_HEADERS == ["model", "serving", "val ppl", "last training", "next due", "new docs"]
    assert rows["law"] == ["law", "v3", "100.5", "serving 2026-11-26T11:50:00Z", "2026-11-27T00:00:00Z", 12]
    assert rows["japanese"] == ["japanese", "v1", "143.9", "swap_refused 2026-11-26T11:40:00Z", "-", 0]
    assert rows["code"] == ["code", "-", "-", "-", "-", "-"]
    assert rows["generalist"] == ["generalist", "v1", "196.4", "-", "-", "-"]
    assert "-> /secret/storage" in format_ingest_status(status["ingest"])  # the command line keeps the storage root
    assert accuracy_line(status) == "router accuracy on the test split: documents 97.0%, 100-character snippets 90.0%"


def test_routing_window_keeps_one_hour_in_minute_buckets():
    window = RoutingWindow(now=0.0)
    for t in range(0, 7200, 10):  # one decision every 10 s for two hours
        window.add("law", "auto", now=float(t))
    summary = window.summary(now=7200.0)
    assert summary["total"] == 354 and len(window.buckets) == 59  # the minutes after 02:00 - 1 h, whole
    assert summary["since"] == "1970-01-01T01:01:00Z"
    assert RoutingWindow(now=100.0).summary(now=200.0)["since"] == "1970-01-01T00:01:40Z"  # since the replica started
    window.add("code", "weird", now=7201.0)
    assert window.summary(now=7201.0)["by_model"]["code"]["other"] == 1


class Fake:
    """An actor handle without Ray: `handle.method.remote(...)` gives an awaitable."""

    def __init__(self, **answers):
        self.answers = answers

    def __getattr__(self, name):
        answer = self.answers[name]

        async def call(*args):
            if isinstance(answer, BaseException):
                raise answer
            return answer

        return SimpleNamespace(remote=call)


def test_collect_status_reads_the_parts_and_says_which_are_missing(config):
    data = inputs()
    status = asyncio.run(collect_status(config, Fake(snapshot=data["records"]),
                                        Fake(status=data["schedule"], history=data["runs"]), None))
    assert status["models"][1]["serving"]["version"] == 3 and status["swaps"][0]["model"] == "law"
    assert status["unavailable"] == {"ingest": "not running"} and status["routing"] is None

    storage = Path(config.storage_root)  # no registry actor: its file; a scheduler that fails: said so
    (storage / "registry").mkdir(parents=True)
    (storage / "registry" / "registry.json").write_text(json.dumps({"format": 1, "specialists": data["records"]}))
    (storage / "router").mkdir()
    (storage / "router" / "router.json").write_text(json.dumps(data["router_meta"]))
    data["ingest"]["bytes_per_s"] = 100.0
    status = asyncio.run(collect_status(config, None, Fake(status=RuntimeError("gone")), Fake(status=data["ingest"])))
    assert status["models"][1]["serving"]["version"] == 3 and status["router_accuracy"]["by_model"]["law"]["documents"] == 0.96
    assert status["unavailable"] == {"scheduler": "RuntimeError: gone"} and status["ingest"]["lag"] == 12
    assert status["ingest"]["storage_root"] == "/secret/storage"  # not public: the command line prints it


# --------------------------------------------------------------------------- the page in Chromium, fixed data


class _Sample(BaseHTTPRequestHandler):
    key, data = "k-123", b"{}"

    def do_GET(self):
        from senmon.serve.status_page import HTML, PAGE_HEADERS

        if self.path == "/status":
            self._send(200, HTML.encode(), "text/html; charset=utf-8", PAGE_HEADERS)
        elif self.path == "/status/data" and self.headers.get("Authorization") == f"Bearer {self.key}":
            self._send(200, self.data, "application/json")
        elif self.path == "/status/data":
            self._send(401, b'{"error": {"message": "invalid API key", "type": "authentication_error"}}', "application/json")
        else:
            self._send(404, b"{}", "application/json")

    def _send(self, status: int, body: bytes, kind: str, headers: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_status_page_draws_a_fixed_sample_in_chromium(config, tmp_path):
    """Every part of the page from fixed data, edge cases included (a model with no version, a version without
    perplexity, no routing model accuracy...), with no console error; then the key form after a refusal."""
    from chromium import Chromium

    status = shape_status(config, **inputs(), public=True, now=NOW)
    _Sample.data = json.dumps(status).encode()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sample)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/status"
    try:
        with Chromium() as browser:
            browser.open(f"{url}#key={_Sample.key}")
            assert browser.wait_for("document.body.dataset.state === 'ready'")
            shown = browser.evaluate("""Object.fromEntries([...document.querySelectorAll('#models tr[data-model]')]
                                        .map(r => [r.dataset.model, r.querySelector('.serving').textContent]))""")
            assert shown == {"generalist": "v1", "law": "v3", "code": "none", "dictionary": "none", "literature": "none",
                             "japanese": "v1"}
            points = browser.evaluate("""Object.fromEntries([...document.querySelectorAll('svg[data-plot]')]
                                         .map(s => [s.dataset.plot, s.querySelectorAll('circle').length]))""")
            assert points == {"generalist": 1, "law": 3, "code": 0, "dictionary": 0, "literature": 0, "japanese": 1}
            assert browser.evaluate("location.hash") == ""  # the key left the address bar
            assert browser.evaluate("document.querySelector('[data-lag]').dataset.lag") == "12"
            assert browser.evaluate("document.querySelectorAll('#swaps tbody tr').length") == 4
            browser.pump(0.3)
            assert browser.errors == [], browser.errors
            browser.screenshot(tmp_path / "sample.png")

            browser.evaluate("sessionStorage.clear()")  # no key: the page asks for one, then shows the data
            browser.open(url)
            assert browser.wait_for("document.body.dataset.state === 'key'")
            browser.evaluate(f"document.getElementById('keyinput').value = '{_Sample.key}'; "
                             "document.getElementById('keyform').requestSubmit()")
            assert browser.wait_for("document.body.dataset.state === 'ready'")
            assert not [e for e in browser.errors if "401" not in e], browser.errors  # only the refused fetch
    finally:
        server.shutdown()
