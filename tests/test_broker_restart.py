"""The durable embedded broker restarted in the middle of a stream, with the real ingest path behind it.

A producer sends corpus documents at a steady pace; ingest actors under a real supervisor on the local
Ray instance store them in the dataset store. A third of the way through, the broker process is
stopped (SIGTERM), at two thirds killed (SIGKILL), and each time started again on the same port and
the same data directory (its object server too, which reads its files back) while the producer keeps
sending. Every document must then be in the store exactly once;
the test writes what it measured to var/reliability/ (tests/reliability.py).
"""

from __future__ import annotations

import collections
import os
import signal
import threading
import time

import pytest
from kafka import KafkaProducer

from reliability import record_figure
from senmon.ingest.broker import EmbeddedBroker
from senmon.ingest.metrics import format_ingest_status
from test_ingest import corpus_documents, encode, ingest_config, stored_rows, supervisor, wait_until  # noqa: F401

pytestmark = pytest.mark.slow

DOCUMENTS, PACE_S = 2400, 0.006  # about 160 documents a second: the stream runs for ~15 s


class PacedProducer(threading.Thread):
    """Sends the documents one by one at `PACE_S` apart; keeps every send's future. Before the document at each
    index of `holds` it waits until the test releases it (`go_on`): the test stops the broker there and lets the
    stream go on at once, so every restart finds the producer sending, however slow the machine."""

    def __init__(self, config, values, keys, holds: tuple[int, ...] = ()):
        super().__init__(daemon=True)
        self.config, self.values, self.keys = config, values, keys
        self.futures, self.sent = [], 0
        self.holds = {index: threading.Event() for index in holds}

    def go_on(self, index: int) -> None:
        self.holds[index].set()

    def run(self) -> None:
        # as senmon's own producer (ingest/producer.py): at least once, no idempotence (see the README)
        producer = KafkaProducer(**self.config.kafka.client_kwargs(), acks="all", linger_ms=5, enable_idempotence=False,
                                 request_timeout_ms=10_000, delivery_timeout_ms=120_000,
                                 reconnect_backoff_max_ms=1000, max_request_size=8 * 2**20)
        try:
            for index, (value, key) in enumerate(zip(self.values, self.keys)):
                if index in self.holds:
                    self.holds[index].wait(300)
                self.futures.append(producer.send(self.config.kafka.topics.documents, value=value, key=key))
                self.sent += 1
                time.sleep(PACE_S)
            producer.flush(timeout=120)
        finally:
            producer.close(timeout=10)

    def acknowledged_ids(self, docs: list[dict]) -> set[str]:
        return {docs[i]["id"] for i, f in enumerate(list(self.futures)) if f.is_done and f.succeeded()}


def _stored_ids(config) -> set[str]:
    return {row["id"] for row in stored_rows(config)}


def test_broker_restart_mid_stream_loses_and_duplicates_nothing(ray_local, make_config, supervisor, tmp_path):
    """Two restarts in one stream: an orderly one (SIGTERM) a third of the way, a crash (SIGKILL) at two thirds."""
    broker = EmbeddedBroker(data_dir=tmp_path / "broker")
    broker.start()
    try:
        config = ingest_config(make_config, broker.bootstrap, actors=1, batch_max_documents=200,
                               flush_interval_s=0.5)
        docs = corpus_documents(DOCUMENTS, seed=5)
        values, keys = encode(docs)
        handle = supervisor(config)
        explain = lambda: format_ingest_status(ray_local.get(handle.status.remote()))  # noqa: E731
        points = ((signal.SIGTERM, DOCUMENTS // 3), (signal.SIGKILL, 2 * DOCUMENTS // 3))
        stream = PacedProducer(config, values, keys, holds=tuple(at for _, at in points))
        stream.start()
        wait_until(lambda: len(stored_rows(config)) >= 200, 120, "the first documents stored", explain=explain)

        restarts = {}  # by signal: what bench/reliability.py shows of a figure
        for how, at in points:
            wait_until(lambda: stream.sent >= at, 60, f"{at} documents sent")
            acked_ids = stream.acknowledged_ids(docs)
            stored_before, sent_before = len(_stored_ids(config)), stream.sent
            t0 = time.monotonic()
            os.kill(broker.pid, how)  # SIGTERM: Tansu shuts down; SIGKILL: it crashes, in the middle of a write or not
            stream.go_on(at)  # the producer sends on while the broker is down and starting again
            broker.stop()  # waits for the process (and stops its object server); the files stay
            stopped_s = time.monotonic() - t0
            broker.start()  # same port, same data directory, a new object server reading the files back
            back = time.monotonic()
            wait_until(lambda: acked_ids <= _stored_ids(config), 120,
                       "every document acknowledged before the restart stored", explain=explain)
            restarts[how.name] = {"sent_before": sent_before, "acknowledged_before": len(acked_ids),
                                  "stored_before": stored_before, "down_s": round(stopped_s, 2),
                                  "restart_s": round(back - t0, 2), "catch_up_s": round(time.monotonic() - back, 2)}
            assert 0 < stored_before and sent_before < len(docs)  # it came in the middle of the stream
        back = time.monotonic()

        stream.join(180)
        assert not stream.is_alive(), "the producer did not finish"
        failed = [docs[i]["id"] for i, f in enumerate(stream.futures) if not f.succeeded()]
        assert not failed, f"{len(failed)} sends failed: the producer gave up during a restart"
        wait_until(lambda: len(_stored_ids(config)) >= len(docs), 180, "every document stored", explain=explain)
        all_stored_s = time.monotonic() - back
        time.sleep(2 * config.ingest.flush_interval_s)  # a late duplicate batch would land now

        rows = stored_rows(config)
        counts = collections.Counter(row["id"] for row in rows)
        lost = sorted({d["id"] for d in docs} - set(counts))
        duplicated = sum(n - 1 for n in counts.values() if n > 1)
        status = ray_local.get(handle.status.remote())
        by_id = {d["id"]: d for d in docs}
        record_figure("broker_restart_mid_stream", {
            "documents_produced": len(docs), "lost": len(lost), "duplicated": duplicated, "restarts": restarts,
            "all_stored_after_last_restart_s": round(all_stored_s, 2),
            "messages_read": status["totals"]["messages"],  # a resent batch is read twice, stored once
            "duplicates_skipped": status["totals"]["duplicates"],
            "ingest_errors": sum(w["errors"] for w in status["workers"]), "actor_restarts": status["restarts"],
            "storage": "durable (object server on local files)"})
        assert lost == [] and duplicated == 0
        assert all(row["text"] == by_id[row["id"]]["text"] and row["domain"] == by_id[row["id"]]["domain"]
                   for row in rows)
    finally:
        broker.cleanup()
