"""`senmon demo`: the main job on the embedded stack.

Starts local Ray and the embedded broker, loads the shipped multi-domain corpus into the dataset
store, reads it back through Ray Data, passes a document through Kafka, prints a summary per
domain, and stops everything it started.
"""

from __future__ import annotations

import json
import time
from collections import Counter
import uuid

from senmon.config import SenmonConfig


def _step(message: str) -> float:
    print(f"==> {message}", flush=True)
    return time.monotonic()


def kafka_round_trip(kafka_kwargs: dict, topic: str) -> float:
    """Produce one document and read it back by explicit partition assignment; seconds taken."""
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    started = time.monotonic()
    document = {"id": f"demo-{uuid.uuid4().hex}", "text": "hello through Kafka", "domain": "literature"}
    producer = KafkaProducer(**kafka_kwargs, value_serializer=lambda v: json.dumps(v).encode())
    sent = producer.send(topic, document, partition=0).get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(**kafka_kwargs, enable_auto_commit=False, consumer_timeout_ms=10_000)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek(partition, sent.offset)
    received = next(iter(consumer))
    consumer.close()
    if json.loads(received.value) != document:
        raise RuntimeError("the document read back from Kafka differs from the one produced")
    return time.monotonic() - started


def run(config: SenmonConfig) -> int:
    import ray.data

    from senmon.cli import print_data_summary
    from senmon.ingest.store import DatasetStore
    from senmon.stack import start_stack

    ray.data.DataContext.get_current().enable_progress_bars = False
    began = time.monotonic()
    t0 = _step("starting the embedded stack (local Ray, Kafka-protocol broker)" if config.kafka.embedded
               else "connecting to Ray and Kafka")
    with start_stack(config) as stack:
        print(f"    Kafka answered in {stack.timings['kafka_s']:.1f} s, Ray in {stack.timings['ray_s']:.1f} s")

        t0 = _step(f"loading the corpus from {config.corpus_dir} into the dataset store {config.storage_root}")
        store = DatasetStore(config.storage_root)
        seeded = store.seed_from_corpus(config.corpus_dir, config.domains)
        print(f"    {sum(seeded.values()):,} documents, {len(seeded)} domains, {time.monotonic() - t0:.1f} s")

        t0 = _step("reading the training split back through Ray Data")
        dataset = store.ray_dataset(config.domains, "train")
        per_domain = Counter(dataset.select_columns(["domain"]).to_pandas()["domain"])
        print("    " + ", ".join(f"{d}: {n}" for d, n in sorted(per_domain.items())) + f" ({time.monotonic() - t0:.1f} s)")

        _step("a document through Kafka and back")
        print(f"    round trip on {config.kafka.topics.documents}: {kafka_round_trip(stack.kafka_kwargs, config.kafka.topics.documents) * 1000:.0f} ms")

        _step("corpus per domain")
        print_data_summary(config)
    print(f"done in {time.monotonic() - began:.0f} s; Ray and the broker are stopped")
    return 0
