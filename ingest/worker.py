"""The ingest actor: reads its assigned partitions of the documents topic into the dataset store.

The supervisor gives each actor a fixed list of partitions; the actor takes them with
`consumer.assign` (never the group protocol), resumes at the offsets committed under
`ingest.group_id`, and loops in a background thread: poll, check each message against the
contract, and gather a batch until it holds `batch_max_documents` messages or
`batch_max_bytes` bytes or is `flush_interval_s` old. A batch is made durable in this order:

1. rejected messages are produced to the dead-letter topic and the producer is flushed;
2. documents whose id the domain already holds are dropped, the rest go to Parquet shards named
   from topic, partition, offset range and first-message fingerprint (`ledger.shard_name`);
3. the batch manifest is written (`ledger.Ledger`): from here on the batch counts;
4. the offsets are committed.

A crash anywhere repeats at most the current batch: on (re)start, shards without a manifest
are deleted, and a manifest found at the committed offset is skipped over, so every message
lands in the dataset once. Any Kafka or storage error closes the clients and reconnects after
a doubling backoff, resuming from the committed offsets; a broker that is down just stalls the
actor. Memory stays bounded by one batch plus one poll (`max_poll_records`, fetch sizes).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.errors import MessageSizeTooLargeError
from kafka.structs import OffsetAndMetadata

from senmon.metrics import record_ingest_documents, record_ingest_lag

from .contract import Rejection, Routing, check_message, dead_letter_headers, route
from .ledger import Ledger, fingerprint, shard_name
from .metrics import WorkerMetrics
from .store import INGESTED_SCHEMA, DatasetStore

log = logging.getLogger(__name__)

ROUTER_RETRY_S = 30.0  # how often to look again for a routing model when there is none
KAFKA_TIMEOUT_MS = 15_000
LATENCY_SAMPLES = 20_000
STATUS_LATENCIES = 5_000  # the newest samples sent with each status
DEAD_LETTER_TRUNCATE = 64 * 1024  # only when the dead-letter topic refuses the original size


def fetch_sizes(settings) -> dict:
    """Consumer fetch limits: large fetches read fastest; one batch's bytes bound them."""
    fetch_max = min(settings.batch_max_bytes, 50 * 2**20)
    return {"fetch_max_bytes": fetch_max,
            "max_partition_fetch_bytes": min(fetch_max, max(8 * 2**20, settings.max_document_bytes + 4096))}


@dataclass
class PendingBatch:
    """Messages of one partition since its last durable batch (a contiguous offset range)."""

    first: int
    fingerprint: str
    last: int
    rows: list[dict] = field(default_factory=list)
    rejected: list[tuple[Rejection, object]] = field(default_factory=list)  # (why, the Kafka message)
    timestamps: list[int] = field(default_factory=list)
    messages: int = 0
    bytes: int = 0


class IngestWorker:
    """One ingest actor (create with `ray.remote(IngestWorker)`); starts reading at construction."""

    def __init__(self, config, partitions: list[int], worker: int = 0):
        self.config, self.settings = config, config.ingest
        self.topic, self.dead_letter_topic = config.kafka.topics.documents, config.kafka.topics.dead_letter
        self.partitions, self.worker = sorted(partitions), worker
        self.store, self.ledger = DatasetStore(config.storage_root), Ledger(config.storage_root)
        self.routing = Routing.from_config(config)
        self.specialists_of = {d: [s.name for s in config.specialists if d in s.domains] for d in config.domains}
        self.metrics = WorkerMetrics()
        self.consumer: KafkaConsumer | None = None
        self.producer: KafkaProducer | None = None
        self._router, self._router_checked = None, float("-inf")
        self._known: dict[str, set[str]] = {}  # ids already in the store, per domain (loaded when first needed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._reset_partition_state()
        self.state, self.errors, self.last_error, self.batches = "starting", 0, None, 0
        self.reading_since: float | None = None  # wall time of the first message this actor took
        self.totals = collections.Counter()
        self.documents: collections.Counter = collections.Counter()  # per domain
        self.dead_letters: collections.Counter = collections.Counter()  # per reason
        self.latencies_ms: collections.deque = collections.deque(maxlen=LATENCY_SAMPLES)
        self.committed: dict[int, int | None] = {p: None for p in self.partitions}
        self.highwater: dict[int, int | None] = {p: None for p in self.partitions}
        pa.table({k: [] for k in INGESTED_SCHEMA.names}, schema=INGESTED_SCHEMA)  # pyarrow imports pandas on first use
        self._thread = threading.Thread(target=self._run, name=f"senmon-ingest-{worker}", daemon=True)
        self._thread.start()

    def _reset_partition_state(self) -> None:
        self.pending: dict[int, PendingBatch] = {}
        self.position: dict[int, int | None] = {p: None for p in self.partitions}
        self.recovering = {p: True for p in self.partitions}  # a manifest may exist past the committed offset
        self.skip_until: dict[int, int] = {}
        self.commit_due: dict[int, int] = {}  # offsets to commit for batches found durable during recovery
        self._batch_started: float | None = None

    # ----------------------------------------------------------------- the loop

    def _run(self) -> None:
        backoff = self.settings.retry_backoff_s
        while not self._stop.is_set():
            try:
                self._connect()
                self.state = "running"
                while not self._stop.is_set():
                    if self._step():
                        backoff = self.settings.retry_backoff_s
                if self.pending:
                    self._flush()
            except Exception as error:  # Kafka, storage or anything else: reconnect and resume from the commits
                self.errors += 1
                self.last_error = f"{type(error).__name__}: {error}"[:300]
                self.state = "retrying"
                log.warning("ingest actor %s: %s; reconnecting in %.1f s", self.worker, self.last_error, backoff)
                self._close()
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.settings.retry_backoff_max_s)
        self._close()
        self.state = "stopped"

    def _connect(self) -> None:
        kwargs, settings = self.config.kafka.client_kwargs(), self.settings
        backoff_ms = {"reconnect_backoff_ms": int(settings.retry_backoff_s * 1000),
                      "reconnect_backoff_max_ms": int(settings.retry_backoff_max_s * 1000)}
        self.consumer = KafkaConsumer(
            **kwargs, **backoff_ms, group_id=settings.group_id, enable_auto_commit=False, auto_offset_reset="earliest",
            max_poll_records=settings.max_poll_records, **fetch_sizes(settings))
        self.producer = KafkaProducer(**kwargs, **backoff_ms, acks="all", linger_ms=5, max_request_size=64 * 2**20,
                                      enable_idempotence=False)  # as ingest/producer.py: a retry is never taken for sent
        partitions = [TopicPartition(self.topic, p) for p in self.partitions]
        self.consumer.assign(partitions)
        self._reset_partition_state()
        self._known.clear()  # orphans are about to go; reload ids from what is really stored
        for tp in partitions:
            committed = self.consumer.committed(tp, timeout_ms=KAFKA_TIMEOUT_MS)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
            self.committed[tp.partition] = committed
            orphans = self.ledger.orphan_shards(self.store, self.topic, tp.partition, self.config.domains)
            if orphans:
                log.info("ingest actor %s: removing %d shard(s) of an interrupted batch", self.worker, len(orphans))
                self.store.delete(orphans)

    def _close(self) -> None:
        consumer, producer, self.consumer, self.producer = self.consumer, self.producer, None, None
        for client in (consumer, producer):
            try:
                if client is consumer and client is not None:
                    client.close(autocommit=False, timeout_ms=2000)
                elif client is not None:
                    client.close(timeout=2)
            except Exception as error:  # closing a client of a dead broker may complain; nothing to save
                log.debug("closing a Kafka client: %s", error)

    def _step(self) -> bool:
        """One poll and, when due, one flush; True when it made progress."""
        records = self.consumer.poll(timeout_ms=200, max_records=self.settings.max_poll_records)
        for tp, messages in records.items():
            for message in messages:
                self._take(tp.partition, message)
            self.highwater[tp.partition] = self.consumer.highwater(tp)
        if self._batch_started is None:
            if self.commit_due:
                self._commit({})
            return bool(records)
        batch_messages = sum(b.messages for b in self.pending.values())
        batch_bytes = sum(b.bytes for b in self.pending.values())
        if (batch_messages >= self.settings.batch_max_documents or batch_bytes >= self.settings.batch_max_bytes
                or time.monotonic() - self._batch_started >= self.settings.flush_interval_s):
            self._flush()
            return True
        return bool(records)

    def _take(self, partition: int, message) -> None:
        self.position[partition] = message.offset + 1
        if self.reading_since is None:
            self.reading_since = time.time()
        if message.offset <= self.skip_until.get(partition, -1):
            return  # already in the dataset (a batch whose commit was lost)
        batch = self.pending.get(partition)
        if batch is None:
            print_ = fingerprint(self.topic, partition, message.offset, message.timestamp, message.value)
            if self.recovering[partition]:
                manifest = self.ledger.find(self.topic, partition, message.offset, print_)
                if manifest is not None:
                    log.info("ingest actor %s: offsets %d-%d of partition %d are already stored; skipping", self.worker,
                             manifest["first_offset"], manifest["last_offset"], partition)
                    self.skip_until[partition] = manifest["last_offset"]
                    self.commit_due[partition] = manifest["last_offset"] + 1
                    return
                self.recovering[partition] = False
            batch = self.pending[partition] = PendingBatch(message.offset, print_, message.offset)
            if self._batch_started is None:
                self._batch_started = time.monotonic()
        size = len(message.value or b"")
        batch.last, batch.messages, batch.bytes = message.offset, batch.messages + 1, batch.bytes + size
        batch.timestamps.append(message.timestamp)
        checked = check_message(message.value, self.settings.max_document_bytes, self.routing)
        if isinstance(checked, Rejection):
            batch.rejected.append((checked, message))
        else:
            if checked["domain"] is None:  # the router decides at flush time; keep the bytes for a dead letter
                checked["_message"] = message
            batch.rows.append(checked)

    # ----------------------------------------------------------------- making a batch durable

    def _flush(self) -> None:
        router = self._load_router() if any(r["domain"] is None for b in self.pending.values() for r in b.rows) else None
        for batch in self.pending.values():
            routed = route(batch.rows, self.routing, router)
            batch.rejected.extend((r, row["_message"]) for r, row in zip(routed, batch.rows) if isinstance(r, Rejection))
            batch.rows = [r for r in routed if not isinstance(r, Rejection)]
        self._send_dead_letters()
        manifests = {p: self._write_batch(p, batch) for p, batch in sorted(self.pending.items())}
        self._commit({p: batch.last + 1 for p, batch in self.pending.items()})
        now_ms = time.time() * 1000
        with self._lock:
            for partition, batch in self.pending.items():
                manifest = manifests[partition]
                tags = {"topic": self.topic, "partition": str(partition)}
                self.metrics.messages.inc(batch.messages, tags)
                if batch.bytes:
                    self.metrics.bytes.inc(batch.bytes, tags)
                self.totals.update(messages=batch.messages, bytes=batch.bytes, duplicates=manifest["duplicates"],
                                   documents=sum(manifest["documents"].values()))
                self.documents.update(manifest["documents"])
                self.dead_letters.update(manifest["dead_letters"])
                for domain, count in manifest["documents"].items():
                    record_ingest_documents(domain, count)
                    for specialist in self.specialists_of.get(domain, []):
                        self.metrics.documents.inc(count, {"specialist": specialist})
                for domain, count in manifest["duplicates_by_domain"].items():
                    for specialist in self.specialists_of.get(domain, []):
                        self.metrics.duplicates.inc(count, {"specialist": specialist})
                for reason, count in manifest["dead_letters"].items():
                    self.metrics.dead_letters.inc(count, {"reason": reason})
                self.latencies_ms.extend(now_ms - ts for ts in batch.timestamps if ts is not None and ts >= 0)
            self.batches += 1
            self.pending, self._batch_started = {}, None

    def _load_router(self):
        if self._router is None and time.monotonic() - self._router_checked > ROUTER_RETRY_S:
            from senmon.train.routing import load_router

            self._router, self._router_checked = load_router(self.config.storage_root), time.monotonic()
        return self._router

    def _send_dead_letters(self) -> None:
        """Produce every rejected message of the batch and wait until the broker has them all."""
        sends = []
        for partition, batch in self.pending.items():
            for rejection, message in batch.rejected:
                headers = dead_letter_headers(rejection, self.topic, partition, message.offset, message.timestamp)
                sends.append((self.producer.send(self.dead_letter_topic, value=message.value, key=message.key,
                                                 headers=headers), rejection, partition, message, headers))
        if not sends:
            return
        self.producer.flush(timeout=KAFKA_TIMEOUT_MS / 1000)
        retries = []
        for future, rejection, partition, message, headers in sends:
            try:
                future.get(timeout=0)
            except MessageSizeTooLargeError:  # the dead-letter topic takes less than the documents topic did
                truncated = headers + [("senmon.truncated", b"1"),
                                       ("senmon.original_bytes", str(len(message.value)).encode())]
                retries.append(self.producer.send(self.dead_letter_topic, value=message.value[:DEAD_LETTER_TRUNCATE],
                                                  key=message.key, headers=truncated))
        if retries:
            self.producer.flush(timeout=KAFKA_TIMEOUT_MS / 1000)
            for future in retries:
                future.get(timeout=0)

    def _write_batch(self, partition: int, batch: PendingBatch) -> dict:
        """Shards, then the manifest, of one partition's batch; returns the manifest."""
        fresh, duplicates = [], collections.Counter()
        for row in batch.rows:
            known = self._known_ids(row["domain"])
            if row["id"] in known:  # stored before, or earlier in this batch
                duplicates[row["domain"]] += 1
                continue
            known.add(row["id"])
            fresh.append(row)
        name = shard_name(self.topic, partition, batch.first, batch.last, batch.fingerprint)
        try:
            shards = self.store.write_shard(fresh, name=name, schema=INGESTED_SCHEMA) if fresh else []
        except BaseException:
            for row in fresh:  # not stored after all
                self._known[row["domain"]].discard(row["id"])
            raise
        manifest = {
            "topic": self.topic, "partition": partition, "first_offset": batch.first, "last_offset": batch.last,
            "fingerprint": batch.fingerprint, "messages": batch.messages, "bytes": batch.bytes,
            "documents": dict(collections.Counter(row["domain"] for row in fresh)),
            "duplicates": sum(duplicates.values()), "duplicates_by_domain": dict(duplicates),
            "routed": sum(1 for row in fresh if row["assigned_by"] == "router"),
            "dead_letters": dict(collections.Counter(rejection.reason for rejection, _ in batch.rejected)),
            "shards": shards, "written_at": time.time(), "worker": self.worker,
        }
        self.ledger.write(manifest)
        return manifest

    def _known_ids(self, domain: str) -> set[str]:
        if domain not in self._known:
            self._known[domain] = self.store.ids(domain)
        return self._known[domain]

    def _commit(self, offsets: dict[int, int]) -> None:
        offsets = {**self.commit_due, **offsets}
        self.consumer.commit({TopicPartition(self.topic, p): OffsetAndMetadata(offset, "", -1)
                              for p, offset in offsets.items()}, timeout_ms=KAFKA_TIMEOUT_MS)
        self.commit_due = {}
        with self._lock:
            for partition, offset in offsets.items():
                self.committed[partition] = offset
                self.metrics.committed.set(offset, {"topic": self.topic, "partition": str(partition)})
                if self.position.get(partition) is not None:
                    self.metrics.position.set(self.position[partition], {"topic": self.topic, "partition": str(partition)})

    # ----------------------------------------------------------------- asked by the supervisor

    def status(self) -> dict:
        with self._lock:
            partitions = {}
            for p in self.partitions:
                position, highwater = self.position.get(p), self.highwater.get(p)
                partitions[p] = {"position": position, "committed": self.committed.get(p), "highwater": highwater,
                                 "lag": highwater - position if highwater is not None and position is not None else None,
                                 "worker": self.worker}
                record_ingest_lag(self.topic, p, partitions[p]["lag"])
            return {"worker": self.worker, "partitions": partitions, "state": self.state, "errors": self.errors,
                    "last_error": self.last_error, "batches": self.batches, "totals": dict(self.totals),
                    "documents": dict(self.documents), "dead_letters": dict(self.dead_letters),
                    "pending": sum(b.messages for b in self.pending.values()), "reading_since": self.reading_since,
                    "latencies_ms": list(self.latencies_ms)[-STATUS_LATENCIES:]}

    def ping(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 30.0) -> dict:
        """Write the pending batch, close the clients, and stop reading."""
        self._stop.set()
        self._thread.join(timeout_s)
        return self.status()
