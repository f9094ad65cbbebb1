"""The ingest bridge's numbers: Ray metrics for dashboards, and the status text for people.

`WorkerMetrics` holds the `ray.util.metrics` series an ingest actor updates (they reach
Prometheus through Ray's metrics agent like any Ray metric; Ray prefixes the names with
`ray_`). `format_ingest_status` turns the plain dict that `IngestSupervisor.status()` returns
into the lines `senmon status` prints.
"""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge


class WorkerMetrics:
    """Counters and gauges of one ingest actor, tagged by topic and partition or by specialist."""

    def __init__(self):
        by_partition = ("topic", "partition")
        self.messages = Counter("senmon_ingest_messages", "Kafka messages taken into the dataset or dead-lettered.",
                                tag_keys=by_partition)
        self.bytes = Counter("senmon_ingest_bytes", "Bytes of Kafka message values ingested.", tag_keys=by_partition)
        self.documents = Counter("senmon_ingest_documents", "New documents written to the dataset, per specialist.",
                                 tag_keys=("specialist",))
        self.duplicates = Counter("senmon_ingest_duplicates", "Documents skipped because their id is already stored.",
                                  tag_keys=("specialist",))
        self.dead_letters = Counter("senmon_ingest_dead_letters", "Messages sent to the dead-letter topic, per reason.",
                                    tag_keys=("reason",))
        self.position = Gauge("senmon_ingest_position", "Next offset the consumer reads, per partition.",
                              tag_keys=by_partition)
        self.committed = Gauge("senmon_ingest_committed_offset", "Committed offset (next to read after a restart).",
                               tag_keys=by_partition)


class SupervisorMetrics:
    def __init__(self):
        self.new_documents = Gauge("senmon_ingest_new_documents",
                                   "Documents ingested since the specialist's last retrain reset.", tag_keys=("specialist",))
        self.actor_restarts = Counter("senmon_ingest_actor_restarts", "Ingest actors replaced by the supervisor.")


def format_ingest_status(status: dict) -> str:
    """The supervisor's status dict as a few readable lines."""
    totals = status.get("totals", {})
    lines = [
        f"ingest: {status.get('state', '?')}, topic {status.get('topic')} -> {status.get('storage_root')}, "
        f"{len(status.get('workers', []))} actor(s), {status.get('restarts', 0)} restart(s)",
        f"  rate: {status.get('messages_per_s', 0.0):,.0f} msg/s, {status.get('bytes_per_s', 0.0) / 1e6:,.2f} MB/s; "
        f"since start: {totals.get('messages', 0):,} messages, {totals.get('documents', 0):,} new documents, "
        f"{totals.get('duplicates', 0):,} duplicates, {totals.get('dead_letters', 0):,} dead letters",
    ]
    if status.get("dead_letters_by_reason"):
        lines.append("  dead letters: " + ", ".join(f"{r} {n:,}" for r, n in sorted(status["dead_letters_by_reason"].items())))
    latency = status.get("latency_ms") or {}
    if latency.get("p50") is not None:
        lines.append(f"  produce-to-durable latency: p50 {latency['p50']:,.0f} ms, p99 {latency['p99']:,.0f} ms")
    for partition, info in sorted(status.get("partitions", {}).items(), key=lambda item: int(item[0])):
        lag = info.get("lag")
        lines.append(f"  partition {partition}: position {info.get('position')}, committed {info.get('committed')}"
                     + (f", lag {lag:,}" if lag is not None else "") + f" (actor {info.get('worker')})")
    for worker in status.get("workers", []):
        if worker.get("last_error"):
            lines.append(f"  actor {worker['worker']} ({worker.get('state')}): last error {worker['last_error']}")
    for name, info in sorted(status.get("specialists", {}).items()):
        lines.append(f"  {name}: {info['documents']:,} documents ingested, {info['new_documents']:,} new since "
                     f"last retrain (threshold {info['threshold']:,})")
    return "\n".join(lines)
