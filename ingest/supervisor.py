"""The ingest supervisor: decides which actor reads which partition, keeps them alive, counts new data.

`IngestSupervisor` is a named Ray actor (`start_ingest` creates it, detached by default). It
learns the partition count of the documents topic (`partitions_for_topic`), spreads the
partitions over `ingest.actors` ingest actors, and checks them every `check_interval_s`: an
actor that died, or stopped answering, is killed and replaced by a new one for the same
partitions, which resumes from the committed offsets. Ray, through this actor, decides who reads
what; the Kafka group protocol is never used.

It also turns the batch manifests into the retrain signal. Per specialist it counts the
documents ingested since the last `reset_new_data(specialist)` (the scheduler calls that when it
starts a job); each time the count crosses a further multiple of the specialist's
`schedule.min_new_documents` it calls `listener.data_ready.remote(specialist, info)` on the
retrain listener, a Ray actor handle or the name of a named actor. Both the counts (from the
manifests in the store) and the reset times and notifications (`{storage_root}/ingest/retrain.json`)
survive a restart of the supervisor. `status()` returns everything as a plain dict.
"""

from __future__ import annotations

import collections
import json
import logging
import threading
import time

import ray
from ray.exceptions import GetTimeoutError, RayActorError

from senmon.storage import filesystem, read_bytes, write_atomic

from .ledger import Ledger
from .metrics import SupervisorMetrics
from .worker import IngestWorker

log = logging.getLogger(__name__)

SUPERVISOR_ACTOR = "senmon-ingest"
STATUS_TIMEOUT_S = 10.0
MISSED_CHECKS_BEFORE_REPLACING = 3
RATE_WINDOW_S = 10.0


def spread(partitions: list[int], actors: int) -> list[list[int]]:
    """Partitions dealt round-robin over at most `actors` actors (never an actor with none)."""
    partitions = sorted(partitions)
    count = max(1, min(actors, len(partitions)))
    return [partitions[i::count] for i in range(count)]


class RetrainCounter:
    """New documents per specialist since its last reset, from the batch manifests; plain Python."""

    def __init__(self, storage_root: str, domains_of: dict[str, list[str]], thresholds: dict[str, int]):
        self.fs, base = filesystem(storage_root)
        self.path = f"{base}/ingest/retrain.json"
        self.domains_of, self.thresholds = domains_of, thresholds
        raw = read_bytes(self.fs, self.path)
        self.state: dict[str, dict] = json.loads(raw) if raw else {}

    def _entry(self, specialist: str) -> dict:
        return self.state.get(specialist, {"reset_at": 0.0, "notified": 0})

    def save(self) -> None:
        write_atomic(self.fs, self.path, json.dumps(self.state, indent=2, sort_keys=True).encode())

    def reset(self, specialist: str, now: float | None = None) -> None:
        self.state[specialist] = {"reset_at": time.time() if now is None else now, "notified": 0}
        self.save()

    def mark_notified(self, specialist: str, multiple: int) -> None:
        self.state[specialist] = {**self._entry(specialist), "notified": multiple}
        self.save()

    def counts(self, manifests: list[dict]) -> dict[str, dict]:
        """Per specialist: all documents ingested, new since reset, their shards and offsets, thresholds."""
        result = {}
        for specialist, domains in self.domains_of.items():
            entry = self._entry(specialist)
            total = new = 0
            shards, offsets = [], {}
            for manifest in manifests:
                count = sum(manifest["documents"].get(d, 0) for d in domains)
                total += count
                if manifest["written_at"] > entry["reset_at"] and count:
                    new += count
                    shards += [s for s in manifest["shards"] if s.split("/")[-3] in domains]
                    key = f"{manifest['topic']}/{manifest['partition']}"
                    offsets[key] = max(offsets.get(key, 0), manifest["last_offset"] + 1)
            result[specialist] = {"documents": total, "new_documents": new, "threshold": self.thresholds[specialist],
                                  "notified": entry["notified"], "reset_at": entry["reset_at"], "shards": shards,
                                  "offsets": offsets}
        return result

    def due(self, counts: dict[str, dict]) -> dict[str, int]:
        """Specialists whose count crossed a multiple of the threshold not yet notified: {name: multiple}."""
        due = {}
        for specialist, info in counts.items():
            multiple = info["new_documents"] // info["threshold"]
            if multiple > info["notified"]:
                due[specialist] = multiple
        return due


class IngestSupervisor:
    """Create with `start_ingest`; runs its checks in a background thread from construction."""

    def __init__(self, config, listener=None):
        self.config, self.settings = config, config.ingest
        self.topic = config.kafka.topics.documents
        self.listener = listener
        self.ledger = Ledger(config.storage_root)
        self.retrain = RetrainCounter(config.storage_root, {s.name: list(s.domains) for s in config.specialists},
                                      {s.name: s.schedule.min_new_documents for s in config.specialists})
        self.metrics = SupervisorMetrics()
        self.state, self.last_error = "starting", None
        self.slots: list[dict] = []  # {"partitions", "handle", "restarts", "status", "missed"}
        self.retired_totals: collections.Counter = collections.Counter()
        self.retired_by: dict[str, collections.Counter] = {"documents": collections.Counter(),
                                                           "dead_letters": collections.Counter()}
        self.rate_samples: collections.deque = collections.deque()
        self.counts: dict[str, dict] = {}
        self._lock = threading.RLock()
        self._retrain_lock = threading.Lock()  # the monitor and reset_new_data both count and notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._monitor, name="senmon-ingest-supervisor", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- the checks

    def _monitor(self) -> None:
        while not self._stop.is_set():
            try:
                if not self.slots:
                    self._start_workers()
                self._check_workers()
                self._check_retrain()
                self.last_error = None
            except Exception as error:  # Kafka not there yet, storage hiccup: try again next round
                self.last_error = f"{type(error).__name__}: {error}"[:300]
                log.warning("ingest supervisor: %s", self.last_error)
            self._stop.wait(self.settings.check_interval_s)

    def _partitions(self) -> list[int]:
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(**self.config.kafka.client_kwargs(), enable_auto_commit=False)
        try:
            partitions = consumer.partitions_for_topic(self.topic)
        finally:
            consumer.close(autocommit=False)
        if not partitions:
            raise RuntimeError(f"topic {self.topic} does not exist (or has no partitions) yet")
        return sorted(partitions)

    def _new_worker(self, index: int, partitions: list[int]):
        return ray.remote(IngestWorker).options(
            num_cpus=self.settings.actor_num_cpus, max_restarts=0, name=None,
        ).remote(self.config, partitions, index)

    def _start_workers(self) -> None:
        self.state = "waiting for Kafka"
        assignment = spread(self._partitions(), self.settings.actors)
        with self._lock:
            self.slots = [{"partitions": parts, "handle": self._new_worker(i, parts), "restarts": 0, "status": None,
                           "missed": 0} for i, parts in enumerate(assignment)]
        self.state = "running"
        log.info("ingest supervisor: partitions %s over %d actor(s)", assignment, len(assignment))

    def _replace(self, index: int, why: str) -> None:
        slot = self.slots[index]
        log.warning("ingest supervisor: actor %d (partitions %s) %s; starting a new one", index, slot["partitions"], why)
        ray.kill(slot["handle"], no_restart=True)
        with self._lock:
            last = slot["status"]
            if last:  # keep the dead actor's totals in the supervisor's totals
                self.retired_totals.update(last["totals"])
                self.retired_by["documents"].update(last["documents"])
                self.retired_by["dead_letters"].update(last["dead_letters"])
            slot.update(handle=self._new_worker(index, slot["partitions"]), status=None, missed=0,
                        restarts=slot["restarts"] + 1)
        self.metrics.actor_restarts.inc()

    def _check_workers(self) -> None:
        refs = {index: slot["handle"].status.remote() for index, slot in enumerate(self.slots)}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=STATUS_TIMEOUT_S)
        ready = set(ready)
        for index, ref in refs.items():
            slot = self.slots[index]
            if ref not in ready:
                slot["missed"] += 1
                if slot["missed"] >= MISSED_CHECKS_BEFORE_REPLACING:
                    self._replace(index, f"did not answer {slot['missed']} checks")
                continue
            try:
                status = ray.get(ref, timeout=0)
            except (RayActorError, GetTimeoutError) as error:
                self._replace(index, f"died ({type(error).__name__})")
                continue
            with self._lock:
                slot["status"], slot["missed"] = status, 0
        totals = self._totals()
        now = time.monotonic()
        with self._lock:
            self.rate_samples.append((now, totals["messages"], totals["bytes"]))
            while len(self.rate_samples) > 2 and now - self.rate_samples[1][0] > RATE_WINDOW_S:
                self.rate_samples.popleft()

    def _check_retrain(self) -> None:
        with self._retrain_lock:
            self._count_and_notify()

    def _count_and_notify(self) -> None:
        counts = self.retrain.counts(self.ledger.manifests())
        with self._lock:
            self.counts = counts
        for specialist, info in counts.items():
            self.metrics.new_documents.set(info["new_documents"], {"specialist": specialist})
        listener = self._listener()
        if listener is None:
            return
        for specialist, multiple in self.retrain.due(counts).items():
            info = counts[specialist]
            payload = {"new_documents": info["new_documents"], "threshold": info["threshold"],
                       "shards": info["shards"], "offsets": info["offsets"]}
            try:
                ray.get(listener.data_ready.remote(specialist, payload), timeout=STATUS_TIMEOUT_S)
            except Exception as error:  # the listener is busy or gone: tell it again next round
                log.warning("ingest supervisor: retrain listener did not take %s: %s", specialist, error)
                continue
            self.retrain.mark_notified(specialist, multiple)
            counts[specialist]["notified"] = multiple

    def _listener(self):
        if isinstance(self.listener, str):
            try:
                return ray.get_actor(self.listener)
            except ValueError:  # not started yet
                return None
        return self.listener

    def _totals(self) -> collections.Counter:
        with self._lock:
            totals = collections.Counter(self.retired_totals)
            for slot in self.slots:
                if slot["status"]:
                    totals.update(slot["status"]["totals"])
            for key in ("messages", "bytes", "documents", "duplicates"):
                totals.setdefault(key, 0)
            return totals

    # ----------------------------------------------------------------- the interface

    def set_retrain_listener(self, listener) -> None:
        """The scheduler: an actor handle or a named actor's name with `data_ready(specialist, info)`."""
        self.listener = listener

    def reset_new_data(self, specialist: str) -> dict:
        """Start counting the specialist's new documents from zero (call when a retrain job starts)."""
        self.config.specialist(specialist)  # KeyError for an unknown name
        with self._retrain_lock:
            before = self.counts.get(specialist, {}).get("new_documents", 0)
            self.retrain.reset(specialist)
            self._count_and_notify()
        return {"specialist": specialist, "reset_at": self.retrain.state[specialist]["reset_at"],
                "new_documents_before": before}

    def new_data(self) -> dict:
        """{specialist: {"new_documents", "threshold", "notified", "documents", "shards", "offsets"}}, fresh."""
        self._check_retrain()
        return {name: dict(info) for name, info in self.counts.items()}

    def status(self) -> dict:
        with self._lock:
            totals = self._totals()
            documents = collections.Counter(self.retired_by["documents"])
            dead = collections.Counter(self.retired_by["dead_letters"])
            workers, partitions, latencies = [], {}, []
            for index, slot in enumerate(self.slots):
                status = slot["status"] or {}
                documents.update(status.get("documents", {}))
                dead.update(status.get("dead_letters", {}))
                latencies += status.get("latencies_ms", [])
                for partition, info in status.get("partitions", {}).items():
                    partitions[str(partition)] = info
                workers.append({"worker": index, "partitions": slot["partitions"], "restarts": slot["restarts"],
                                "state": status.get("state", "starting"), "errors": status.get("errors", 0),
                                "last_error": status.get("last_error"), "batches": status.get("batches", 0),
                                "pending": status.get("pending", 0), "reading_since": status.get("reading_since")})
            (t0, m0, b0), (t1, m1, b1) = (self.rate_samples[0], self.rate_samples[-1]) if self.rate_samples else ((0, 0, 0),) * 2
            elapsed = t1 - t0
            latencies.sort()
            return {
                "state": self.state, "topic": self.topic, "dead_letter_topic": self.config.kafka.topics.dead_letter,
                "group_id": self.settings.group_id, "storage_root": self.config.storage_root,
                "listener": self.listener if isinstance(self.listener, str) or self.listener is None else "actor handle",
                "last_error": self.last_error, "restarts": sum(s["restarts"] for s in self.slots),
                "workers": workers, "partitions": partitions,
                "totals": {**{k: totals[k] for k in ("messages", "bytes", "documents", "duplicates")},
                           "dead_letters": sum(dead.values())},
                "documents_by_domain": dict(documents), "dead_letters_by_reason": dict(dead),
                "messages_per_s": (m1 - m0) / elapsed if elapsed > 0 else 0.0,
                "bytes_per_s": (b1 - b0) / elapsed if elapsed > 0 else 0.0,
                "latency_ms": {"p50": _percentile(latencies, 0.50), "p99": _percentile(latencies, 0.99),
                               "samples": len(latencies)},
                "specialists": {name: {k: info[k] for k in ("documents", "new_documents", "threshold", "notified")}
                                for name, info in self.counts.items()},
            }

    def worker_handles(self) -> list:
        """The current ingest actors (tests kill them to show that nothing is lost)."""
        return [slot["handle"] for slot in self.slots]

    def stop(self, timeout_s: float = 30.0) -> dict:
        """Stop checking, let every actor write its pending batch, and stop them."""
        self._stop.set()
        self._thread.join(timeout_s)
        for slot in self.slots:
            try:
                slot["status"] = ray.get(slot["handle"].stop.remote(), timeout=timeout_s)
            except Exception as error:
                log.warning("ingest supervisor: an actor did not stop cleanly: %s", error)
            ray.kill(slot["handle"], no_restart=True)
        self.state = "stopped"
        return self.status()


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return float(sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))])


def start_ingest(config, listener=None, name: str = SUPERVISOR_ACTOR, detached: bool = True):
    """The named ingest supervisor (created if missing); it starts its actors by itself."""
    return ray.remote(IngestSupervisor).options(
        name=name, get_if_exists=True, lifetime="detached" if detached else None, max_restarts=-1,
        num_cpus=0, max_concurrency=4,
    ).remote(config, listener)


def get_ingest_supervisor(name: str = SUPERVISOR_ACTOR):
    """The running supervisor's handle, or None."""
    try:
        return ray.get_actor(name)
    except ValueError:
        return None


def stop_ingest(name: str = SUPERVISOR_ACTOR, timeout_s: float = 60.0) -> dict | None:
    """Stop the supervisor and its actors after they wrote what they hold; returns the last status."""
    supervisor = get_ingest_supervisor(name)
    if supervisor is None:
        return None
    status = ray.get(supervisor.stop.remote(), timeout=timeout_s)
    ray.kill(supervisor, no_restart=True)
    return status
