"""The ingest bridge's speed, against the ceiling: a bare kafka-python loop that only reads.

One run, one embedded broker, one topic filled once with real corpus documents (unique ids):
(1) a bare consumer assigned every partition reads them all and does nothing else (the ceiling,
with the actors' fetch settings);
(2) the ingest supervisor with one actor, then (3) with two, each with a fresh consumer group and
a fresh storage root, ingests the same backlog into Parquet shards (validate, dedupe, split,
write, manifest, commit), timed from the first message an actor takes to the last manifest;
(4) produce-to-durable latency: one actor keeps up with a producer at a steady rate and every
document's time from its Kafka timestamp to its batch's commit is recorded (p50, p99).
The machine is shared, so (1) to (3) run interleaved `--rounds` times and each reports its best.
Usage: python -m bench.ingest [--documents N] [--rounds R] [--rate DOCS_PER_S]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import uuid
from pathlib import Path

import ray
import yaml
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from bench.common import table, write_results
from senmon.config import DEFAULT_CONFIG, parse_config
from senmon.ingest.broker import EmbeddedBroker, ensure_topics
from senmon.ingest.ledger import Ledger
from senmon.ingest.split import SPLITS
from senmon.ingest.store import read_jsonl
from senmon.ingest.supervisor import start_ingest
from senmon.ingest.worker import fetch_sizes

REPO = Path(__file__).resolve().parents[1]
BARE = "bare kafka-python read loop"


def documents(corpus: Path, count: int) -> list[bytes]:
    """`count` JSON messages cycling through the corpus, each with its own id."""
    base = [doc for split in SPLITS for path in sorted((corpus / split).glob("*.jsonl")) for doc in read_jsonl(path)]
    return [json.dumps({**base[i % len(base)], "id": f"bench-{i}-{base[i % len(base)]['id']}"},
                       ensure_ascii=False).encode("utf-8") for i in range(count)]


def produce(bootstrap: str, topic: str, values: list[bytes], rate: float | None = None) -> float:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, batch_size=2**20, acks="all")
    started = time.monotonic()
    for index, value in enumerate(values):
        if rate and index % 100 == 0:
            time.sleep(max(0.0, started + index / rate - time.monotonic()))
        producer.send(topic, value=value, key=value[:40])
    producer.flush()
    producer.close()
    return time.monotonic() - started


def bare_read(bootstrap: str, topic: str, expected: int, settings) -> dict:
    """Read every message and do nothing else, with the ingest actors' fetch settings."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_poll_records=settings.max_poll_records, **fetch_sizes(settings))
    consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))])
    consumer.seek_to_beginning()
    count = size = 0
    started = None
    while count < expected:
        for batch in consumer.poll(timeout_ms=500).values():
            started = started or time.monotonic()
            count += len(batch)
            size += sum(len(m.value) for m in batch)
    seconds = time.monotonic() - started
    consumer.close()
    return {"documents": count, "bytes": size, "seconds": seconds}


def make_config(data: dict, bootstrap: str, topic: str, storage: Path, actors: int):
    data = json.loads(json.dumps(data))
    data.update(storage_root=str(storage), corpus_dir=str(REPO / "data" / "corpus"))
    data["kafka"].update(bootstrap_servers=[bootstrap], topics={"documents": topic, "dead_letter": f"{topic}-dead",
                                                                  "partitions": 3})
    data["ingest"].update(actors=actors, group_id=f"bench-{uuid.uuid4().hex[:8]}")
    return parse_config(data, source="bench", base_dir=REPO / "configs")


def run_ingest(config, expected: int, timeout_s: float = 600) -> dict:
    """Start a supervisor, wait until the ledger holds `expected` messages, return rate and status."""
    supervisor = start_ingest(config, name=f"bench-ingest-{uuid.uuid4().hex[:6]}", detached=False)
    ledger = Ledger(config.storage_root)
    deadline = time.monotonic() + timeout_s
    while sum(m["messages"] for m in ledger.manifests()) < expected:
        if time.monotonic() > deadline:
            raise TimeoutError(f"ingest did not finish within {timeout_s:.0f} s")
        time.sleep(0.2)
    manifests = ledger.manifests()
    status = ray.get(supervisor.status.remote())
    while any(w["reading_since"] is None for w in status["workers"]) or status["totals"]["messages"] < expected:
        time.sleep(0.5)
        status = ray.get(supervisor.status.remote())
    ray.get(supervisor.stop.remote())
    ray.kill(supervisor)
    began = min(w["reading_since"] for w in status["workers"])
    seconds = max(m["written_at"] for m in manifests) - began
    return {"documents": sum(m["messages"] for m in manifests), "stored": sum(sum(m["documents"].values()) for m in manifests),
            "bytes": sum(m["bytes"] for m in manifests), "seconds": seconds, "batches": len(manifests),
            "shards": sum(len(m["shards"]) for m in manifests)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=100_000, help="backlog size for the throughput runs")
    parser.add_argument("--rate", type=float, default=500.0, help="documents/s produced in the latency run")
    parser.add_argument("--latency-seconds", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3, help="each reader's best of this many runs is reported")
    parser.add_argument("--storage", default=str(REPO / "var" / "bench-ingest"))
    args = parser.parse_args()

    base = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    storage = Path(args.storage)
    shutil.rmtree(storage, ignore_errors=True)
    values = documents(REPO / "data" / "corpus", args.documents)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    with EmbeddedBroker(log_dir=storage / "broker") as broker:
        topic = "bench.documents"
        ensure_topics({"bootstrap_servers": broker.bootstrap}, [topic, f"{topic}-dead"], partitions=3)
        produce_s = produce(broker.bootstrap, topic, values)
        print(f"backlog: {len(values):,} documents, {sum(map(len, values)) / 1e6:.1f} MB produced in {produce_s:.1f} s",
              flush=True)
        try:
            # rounds of all three, interleaved, so that load from elsewhere on the machine hits them alike
            attempts: dict[str, list[dict]] = {}
            for round_ in range(args.rounds):
                settings = make_config(base, broker.bootstrap, topic, storage, 1).ingest
                attempts.setdefault(BARE, []).append(bare_read(broker.bootstrap, topic, len(values), settings))
                print(f"  round {round_ + 1}: bare read {attempts[BARE][-1]['seconds']:.1f} s", flush=True)
                for actors in (1, 2):
                    config = make_config(base, broker.bootstrap, topic, storage / f"r{round_}-actors-{actors}", actors)
                    result = run_ingest(config, len(values))
                    attempts.setdefault(f"ingest, {actors} actor{'s' if actors > 1 else ''}", []).append(result)
                    print(f"  round {round_ + 1}: {actors} actor(s) {result['seconds']:.1f} s, {result['batches']} batches",
                          flush=True)
            runs = {name: min(results, key=lambda r: r["seconds"]) for name, results in attempts.items()}

            live_topic = "bench.live"
            ensure_topics({"bootstrap_servers": broker.bootstrap}, [live_topic, f"{live_topic}-dead"], partitions=3)
            config = make_config(base, broker.bootstrap, live_topic, storage / "latency", 1)
            live = values[: int(args.rate * args.latency_seconds)]
            supervisor = start_ingest(config, name="bench-latency", detached=False)
            while [w["state"] for w in ray.get(supervisor.status.remote())["workers"]] != ["running"]:
                time.sleep(0.2)  # the actor is up and polling before the first document is produced
            produce(broker.bootstrap, live_topic, live, rate=args.rate)
            ledger = Ledger(config.storage_root)
            while sum(m["messages"] for m in ledger.manifests()) < len(live):
                time.sleep(0.2)
            time.sleep(2 * config.ingest.check_interval_s)
            latency = ray.get(supervisor.status.remote())["latency_ms"]
            ray.get(supervisor.stop.remote())
            ray.kill(supervisor)
        finally:
            ray.shutdown()

    ceiling = runs[BARE]
    rows = []
    for name, run in runs.items():
        docs_s, mb_s = run["documents"] / run["seconds"], run["bytes"] / 1e6 / run["seconds"]
        run.update(documents_per_s=docs_s, mb_per_s=mb_s, of_bare=docs_s / (ceiling["documents"] / ceiling["seconds"]))
        rows.append([name, f"{run['documents']:,}", f"{run['seconds']:.1f}", f"{docs_s:,.0f}", f"{mb_s:.1f}",
                     f"{run['of_bare']:.0%}"])
    print()
    print(table(["reader", "documents", "seconds", "documents/s", "MB/s", "of bare read"], rows))
    print(f"\nproduce-to-durable latency, 1 actor, {args.rate:,.0f} documents/s for {args.latency_seconds:.0f} s, "
          f"flush_interval_s {config.ingest.flush_interval_s}: p50 {latency['p50']:,.0f} ms, "
          f"p99 {latency['p99']:,.0f} ms ({latency['samples']:,} documents)")
    path = write_results("ingest", {
        "documents": len(values), "megabytes": sum(map(len, values)) / 1e6, "partitions": 3,
        "ingest_settings": config.ingest.model_dump(), "rounds": args.rounds, "runs": runs,
        "all_attempts_seconds": {name: [round(r["seconds"], 2) for r in results] for name, results in attempts.items()},
        "latency": {"rate_documents_per_s": args.rate, "seconds": args.latency_seconds, **latency},
        "one_actor_of_bare": runs["ingest, 1 actor"]["of_bare"],
    })
    print(f"results: {path}")
    shutil.rmtree(storage, ignore_errors=True)


if __name__ == "__main__":
    main()
