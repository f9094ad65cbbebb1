"""Produce a JSONL file's documents onto the documents topic (`senmon ingest FILE.jsonl`).

Each non-blank line is sent as it is, so the ingest actors are the one place that judges
messages: a broken line ends up in the dead-letter topic with its reason, not silently dropped
here. Lines whose JSON carries an `id` are keyed by it, so every copy of a document goes to the
same partition and is deduplicated by the same actor.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kafka import KafkaProducer

PROGRESS_EVERY_S = 1.0
CONNECT_TIMEOUT_S = 10.0  # give up when no broker answers within this


@dataclass
class ProduceResult:
    sent: int = 0
    unkeyed: int = 0  # lines without a JSON id: sent anyway, they will be dead-lettered
    failed: int = 0
    first_error: str | None = None
    bytes: int = 0
    seconds: float = 0.0


def document_key(line: bytes) -> bytes | None:
    try:
        doc = json.loads(line)
    except ValueError:
        return None
    doc_id = doc.get("id") if isinstance(doc, dict) else None
    return doc_id.encode("utf-8") if isinstance(doc_id, str) and doc_id else None


def produce_file(config, path: str | Path, progress: Callable[[ProduceResult], None] | None = None,
                 topic: str | None = None) -> ProduceResult:
    """Send every line of `path` to the documents topic and wait until the broker has them all."""
    topic = topic or config.kafka.topics.documents
    result = ProduceResult()
    started = last_progress = time.monotonic()
    # at least once, not idempotent: a broker stopped mid-produce may have advanced an idempotent producer's
    # sequence without storing its batch, and then answers the retry "duplicate" (= success); the ingest
    # stores each document id once, so a resent batch costs nothing (README, "Reliability and security")
    producer = KafkaProducer(**config.kafka.client_kwargs(), acks="all", linger_ms=20, batch_size=256 * 1024,
                             enable_idempotence=False,
                             max_request_size=64 * 2**20, bootstrap_timeout_ms=int(CONNECT_TIMEOUT_S * 1000))

    def failed(error: Exception) -> None:
        result.failed += 1
        result.first_error = result.first_error or f"{type(error).__name__}: {error}"

    try:
        with open(path, "rb") as handle:
            for line in handle:
                line = line.strip()
                if not line:
                    continue
                key = document_key(line)
                result.unkeyed += key is None
                producer.send(topic, value=line, key=key).add_errback(failed)
                result.sent += 1
                result.bytes += len(line)
                if progress and time.monotonic() - last_progress >= PROGRESS_EVERY_S:
                    result.seconds, last_progress = time.monotonic() - started, time.monotonic()
                    progress(result)
        producer.flush()
    finally:
        producer.close()
    result.seconds = time.monotonic() - started
    return result
