"""The Kafka ingest bridge: the message contract, shard names, the retrain count, and the real thing.

The slow tests run real ingest actors under a real supervisor on the local Ray instance against
the embedded broker: they kill actors mid-stream, feed every kind of bad message, and cut every
Kafka connection with a TCP proxy, and then check the dataset store file by file.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import threading
import time
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from senmon.ingest.broker import EmbeddedBroker, ensure_topics, free_port
from senmon.ingest.contract import Rejection, Routing, check_message, read_dead_letter, route
from senmon.ingest.ledger import Ledger, parse_shard_name, shard_name
from senmon.ingest.metrics import format_ingest_status
from senmon.ingest.split import SPLITS
from senmon.ingest.store import INGESTED_SCHEMA, DatasetStore, read_jsonl
from senmon.ingest.supervisor import RetrainCounter, spread, start_ingest

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"


# --------------------------------------------------------------------------- helpers


def corpus_documents(count: int, seed: int = 0) -> list[dict]:
    """Real documents from the shipped corpus, all domains mixed, in a fixed order."""
    docs = [doc for split in SPLITS for path in sorted((CORPUS / split).glob("*.jsonl")) for doc in read_jsonl(path)]
    random.Random(seed).shuffle(docs)
    assert len(docs) >= count
    return docs[:count]


def ingest_config(make_config, bootstrap: str, **ingest):
    """A config on `bootstrap` with fresh topic and group names, small batches, fast checks."""
    tag = uuid.uuid4().hex[:8]
    settings = {"actors": 2, "group_id": f"test-{tag}", "batch_max_documents": 200, "flush_interval_s": 0.3,
                "check_interval_s": 0.3, "retry_backoff_s": 0.2, "retry_backoff_max_s": 1.0, **ingest}
    config = make_config(
        kafka={"embedded": True, "bootstrap_servers": [bootstrap],
               "topics": {"documents": f"docs-{tag}", "dead_letter": f"dead-{tag}", "partitions": 3}},
        ingest=settings)
    topics = config.kafka.topics
    ensure_topics(config.kafka.client_kwargs(), [topics.documents, topics.dead_letter], topics.partitions)
    return config


def produce(config, values: list[bytes], keys: list[bytes | None] | None = None) -> None:
    producer = KafkaProducer(**config.kafka.client_kwargs(), linger_ms=5, max_request_size=8 * 2**20)
    for value, key in zip(values, keys or [None] * len(values)):
        producer.send(config.kafka.topics.documents, value=value, key=key)
    producer.flush(timeout=30)
    producer.close()


def encode(docs: list[dict]) -> tuple[list[bytes], list[bytes]]:
    return [json.dumps(d, ensure_ascii=False).encode() for d in docs], [d["id"].encode() for d in docs]


def stored_rows(config) -> list[dict]:
    """Every row of every shard, read file by file (no deduplication on read)."""
    store = DatasetStore(config.storage_root)
    return [row for domain in store.domains() for split in SPLITS for path in store.shard_paths(domain, split)
            for row in pq.read_table(path).to_pylist()]


def ledger_messages(config) -> int:
    return sum(m["messages"] for m in Ledger(config.storage_root).manifests()
               if m["topic"] == config.kafka.topics.documents)


def wait_until(condition, timeout_s: float, what: str, poll_s: float = 0.2, explain=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f"; {explain()}" if explain else ""))


def read_topic(config, topic: str, expected: int, timeout_s: float = 60.0) -> list:
    """Every message of `topic` from offset 0 (an explicit seek: no ListOffsets round trip, which the
    embedded broker answers unreliably), until `expected` arrived or the time is up."""
    consumer = KafkaConsumer(**config.kafka.client_kwargs(), enable_auto_commit=False, auto_offset_reset="earliest")
    partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(partitions)
    for tp in partitions:
        consumer.seek(tp, 0)
    messages, deadline = [], time.monotonic() + timeout_s
    while len(messages) < expected and time.monotonic() < deadline:
        for batch in consumer.poll(timeout_ms=500).values():
            messages += batch
    consumer.close()
    return messages


def assert_exactly_once(config, docs: list[dict]) -> None:
    rows = stored_rows(config)
    ids = [row["id"] for row in rows]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} duplicate rows in the shards"
    assert sorted(ids) == sorted(d["id"] for d in docs)
    by_id = {d["id"]: d for d in docs}
    assert all(row["text"] == by_id[row["id"]]["text"] and row["domain"] == by_id[row["id"]]["domain"]
               and row["assigned_by"] == "producer" for row in rows)


@pytest.fixture()
def supervisor(ray_local):
    """Start supervisors with unique names; stop whatever a test started."""
    started = []

    def start(config, listener=None):
        handle = start_ingest(config, listener=listener, name=f"ingest-{uuid.uuid4().hex[:8]}", detached=False)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        try:
            ray_local.get(handle.stop.remote(), timeout=30)
        except Exception:
            pass
        ray_local.kill(handle)


# --------------------------------------------------------------------------- plain logic


ROUTING = Routing(frozenset({"law", "code"}), {"law": "law", "code": "code"})


@pytest.mark.parametrize("value, reason", [
    (None, "invalid_json"),
    (b"{not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"text": "no id"}', "missing_id"),
    (b'{"id": "", "text": "empty id"}', "missing_id"),
    (b'{"id": "a"}', "missing_text"),
    (b'{"id": "a", "text": "   "}', "missing_text"),
    (b'{"id": "a", "text": 5}', "missing_text"),
    (b'{"id": "a", "text": "t", "domain": 3}', "bad_field"),
    (b'{"id": "a", "text": "t", "domain": "cooking"}', "unknown_domain"),
    (b'{"id": "a", "text": "' + b"x" * 300 + b'"}', "oversize"),
])
def test_invalid_messages_are_rejected_with_their_reason(value, reason):
    result = check_message(value, max_bytes=256, routing=ROUTING)
    assert isinstance(result, Rejection) and result.reason == reason


def test_valid_message_becomes_a_row():
    row = check_message(json.dumps({"id": "d1", "text": "GPL v3", "domain": "law", "ts": 1}).encode(), 1000, ROUTING)
    assert row == {"id": "d1", "domain": "law", "text": "GPL v3", "source": "kafka", "assigned_by": "producer",
                   "route_confidence": None}


def test_documents_without_domain_are_routed_or_rejected():
    from senmon.train.routing import RoutingModel

    law = [d["text"] for d in read_jsonl(CORPUS / "train" / "law.jsonl")][:15]
    code = [d["text"] for d in read_jsonl(CORPUS / "train" / "code.jsonl")][:15]
    router = RoutingModel.train({"law": law, "code": code})
    rows = [check_message(json.dumps({"id": str(i), "text": text}).encode(), 10**6, ROUTING)
            for i, text in enumerate([law[0], code[0]])]
    assert [r["domain"] for r in rows] == [None, None]
    law_row, code_row = route(rows, ROUTING, router)
    assert (law_row["domain"], law_row["assigned_by"], code_row["domain"]) == ("law", "router", "code")
    assert 0.5 < law_row["route_confidence"] <= 1.0
    assert [r.reason for r in route(rows, ROUTING, None)] == ["no_router", "no_router"]


def test_a_document_the_routing_model_puts_in_no_domain_is_a_dead_letter_not_training_text():
    """With a `none` class (data/routing's Debian handbook), a document without a domain that the model puts in no
    specialist's domain is rejected as `no_domain` (naming the numbers), so no specialist trains on it; the
    configured domains' documents are routed as before, and without the threshold (above 1) nothing is rejected."""
    from senmon.config import NO_DOMAIN
    from senmon.ingest.routing_texts import read_routing_texts
    from senmon.train.routing import RoutingModel

    law = [d["text"] for d in read_jsonl(CORPUS / "train" / "law.jsonl")][:40]
    code = [d["text"] for d in read_jsonl(CORPUS / "train" / "code.jsonl")][:40]
    handbook = read_routing_texts(CORPUS.parent / "routing", {NO_DOMAIN}, leave_out={"debian-reference-en"})[NO_DOMAIN]
    router = RoutingModel.train({"law": law, "code": code, NO_DOMAIN: handbook[:80]})
    admin = ("To upgrade a Debian system, run apt update and then apt full-upgrade as root. The installer sets up the "
             "network interfaces, the package mirror and the boot loader; later changes go in /etc/network/interfaces.")
    rows = [check_message(json.dumps({"id": str(i), "text": text}).encode(), 10**6, ROUTING)
            for i, text in enumerate([law[0], admin])]
    strict = Routing(ROUTING.domains, ROUTING.domain_of_specialist, none_threshold=0.3)
    law_row, rejected = route(rows, strict, router)
    assert law_row["domain"] == "law" and law_row["assigned_by"] == "router"
    assert isinstance(rejected, Rejection) and rejected.reason == "no_domain" and "(at least 0.30)" in rejected.detail
    assert [r["domain"] for r in route(rows, ROUTING, router)] == ["law", router.route([admin])[0].specialist]


def test_shard_names_are_deterministic_and_parse_back():
    name = shard_name("senmon.documents", 2, 100, 199, "ab12cd34ef56")
    assert name == shard_name("senmon.documents", 2, 100, 199, "ab12cd34ef56")
    assert parse_shard_name(name) == ("senmon.documents", 2, 100, 199, "ab12cd34ef56")
    assert parse_shard_name("seed") is None
    assert spread([0, 1, 2, 3, 4], 2) == [[0, 2, 4], [1, 3]]
    assert spread([0, 1], 5) == [[0], [1]]


def test_a_write_cut_short_leaves_nothing_readers_trip_on(tmp_path):
    store = DatasetStore(str(tmp_path))
    [path] = store.write_shard([{"id": "a", "domain": "law", "text": "GPL", "source": "s"}], name="kafka-t-p0-x")
    Path(path).with_name(".tmp-0123.parquet").write_bytes(b"")  # an actor killed inside pq.write_table
    assert store.shard_paths("law", "train") == [path]
    assert store.ids("law") == {"a"} and store.read_table("law", "train").num_rows == 1


def test_retrain_count_survives_a_restart_and_resets(tmp_path):
    root = str(tmp_path)

    def manifest(first, docs, written_at):
        return {"topic": "t", "partition": 0, "first_offset": first, "last_offset": first + 9, "documents": docs,
                "shards": [f"/x/datasets/{d}/train/s{first}.parquet" for d in docs], "written_at": written_at}

    manifests = [manifest(0, {"law": 6, "code": 4}, 10.0), manifest(10, {"law": 7}, 20.0)]
    counter = RetrainCounter(root, {"law": ["law"], "code": ["code"]}, {"law": 5, "code": 5})
    counts = counter.counts(manifests)
    assert (counts["law"]["new_documents"], counts["code"]["new_documents"]) == (13, 4)
    assert counts["law"]["offsets"] == {"t/0": 20}
    assert counter.due(counts) == {"law": 2}
    counter.mark_notified("law", 2)
    counter.reset("code", now=15.0)
    again = RetrainCounter(root, {"law": ["law"], "code": ["code"]}, {"law": 5, "code": 5})  # a new supervisor
    counts = again.counts(manifests + [manifest(20, {"law": 2, "code": 5}, 30.0)])
    assert (counts["law"]["new_documents"], counts["code"]["new_documents"]) == (15, 5)
    assert counts["code"]["shards"] == ["/x/datasets/code/train/s20.parquet"]
    assert again.due(counts) == {"code": 1, "law": 3}  # law crossed 15 = 3 x 5; 2 was told before the restart
    assert again.due({**counts, "law": {**counts["law"], "new_documents": 14}}) == {"code": 1}


def test_status_text_names_rates_partitions_and_specialists():
    text = format_ingest_status({
        "state": "running", "topic": "senmon.documents", "storage_root": "/s", "workers": [{"worker": 0}],
        "restarts": 1, "messages_per_s": 1500.0, "bytes_per_s": 2.5e6,
        "totals": {"messages": 10, "documents": 8, "duplicates": 1, "dead_letters": 1},
        "dead_letters_by_reason": {"invalid_json": 1}, "latency_ms": {"p50": 300.0, "p99": 900.0},
        "partitions": {"0": {"position": 10, "committed": 10, "lag": 0, "worker": 0}},
        "specialists": {"law": {"documents": 8, "new_documents": 8, "threshold": 200}}})
    assert "1,500 msg/s, 2.50 MB/s" in text and "invalid_json 1" in text
    assert "partition 0: position 10, committed 10, lag 0" in text and "law: 8 documents" in text


# --------------------------------------------------------------------------- real actors, real broker


@pytest.mark.slow
def test_killed_actors_lose_and_duplicate_nothing(broker, ray_local, make_config, supervisor):
    config = ingest_config(make_config, broker.bootstrap, batch_max_documents=50)
    docs = corpus_documents(2400)
    values, keys = encode(docs)
    produce(config, values[:600], keys[:600])
    handle = supervisor(config)
    wait_until(lambda: ledger_messages(config) > 0, 120, "the first batch")
    stored_at_kill = []
    for kill, start in enumerate(range(600, len(docs), 600)):  # more documents, then kill an actor at once
        produce(config, values[start:start + 600], keys[start:start + 600])
        workers = ray_local.get(handle.worker_handles.remote())
        ray_local.kill(workers[kill % len(workers)])  # the actors in turn; the second time, a replacement
        stored_at_kill.append((ledger_messages(config), start + 600))
        wait_until(lambda: ray_local.get(handle.status.remote())["restarts"] == kill + 1, 120, "a replaced actor")
    assert all(stored < produced for stored, produced in stored_at_kill), stored_at_kill  # killed mid-stream
    wait_until(lambda: ledger_messages(config) == len(docs), 120, "every message in the ledger",
               explain=lambda: format_ingest_status(ray_local.get(handle.status.remote())))
    assert_exactly_once(config, docs)
    wait_until(lambda: sum(i["committed"] or 0 for i in ray_local.get(handle.status.remote())["partitions"].values())
               == len(docs), 120, "committed offsets past every message")


@pytest.mark.slow
def test_bad_messages_go_to_the_dead_letter_topic(broker, ray_local, make_config, supervisor):
    config = ingest_config(make_config, broker.bootstrap, actors=1, max_document_bytes=4096)
    good = corpus_documents(200, seed=1)
    good = [d for d in good if len(json.dumps(d).encode()) < 4000][:120]
    bad = {
        b"{this is not json": "invalid_json",
        json.dumps({"id": "no-text"}).encode(): "missing_text",
        json.dumps({"id": "empty-text", "text": "", "domain": "law"}).encode(): "missing_text",
        json.dumps({"id": "big", "text": "x" * 5000, "domain": "law"}).encode(): "oversize",
        json.dumps({"id": "where", "text": "a recipe", "domain": "cooking"}).encode(): "unknown_domain",
        json.dumps({"id": "unrouted", "text": "no domain given"}).encode(): "no_router",
        json.dumps(["a", "list"]).encode(): "not_an_object",
    }
    values, keys = encode(good)
    mixed_values, mixed_keys = [], []
    bad_items = list(bad)
    for index, (value, key) in enumerate(zip(values, keys)):  # bad messages between good ones
        mixed_values.append(value)
        mixed_keys.append(key)
        if index % 15 == 0 and bad_items:
            mixed_values.append(bad_items.pop())
            mixed_keys.append(None)
    duplicate = values[0]  # the same document sent again: stored once, not a dead letter
    produce(config, mixed_values + [duplicate], mixed_keys + [keys[0]])
    total = len(mixed_values) + 1
    handle = supervisor(config)
    wait_until(lambda: ledger_messages(config) == total, 120, "every message in the ledger")
    dead = read_topic(config, config.kafka.topics.dead_letter, len(bad))
    letters = [read_dead_letter(list(m.headers), m.value) for m in dead]
    assert sorted((l["original"], l["reason"]) for l in letters) == sorted(bad.items())
    assert all(l["topic"] == config.kafka.topics.documents and isinstance(l["offset"], int) for l in letters)
    assert_exactly_once(config, good)
    # the supervisor's totals are its actors' statuses as of its last check, which may be a round behind the ledger
    wait_until(lambda: ray_local.get(handle.status.remote())["totals"]["messages"] == total, 30,
               "the supervisor's totals to catch up with the ledger")
    status = ray_local.get(handle.status.remote())
    assert status["totals"]["dead_letters"] == len(bad) and status["totals"]["duplicates"] == 1
    assert status["totals"]["documents"] == len(good) and status["totals"]["messages"] == total
    assert collections.Counter(bad.values()) == collections.Counter(status["dead_letters_by_reason"])


@pytest.mark.slow
def test_retrain_listener_hears_each_threshold(broker, ray_local, make_config, supervisor):
    import ray

    @ray.remote(num_cpus=0)
    class Listener:
        def __init__(self):
            self.calls = []

        def data_ready(self, specialist, info):
            self.calls.append((specialist, info))

        def seen(self):
            return self.calls

    config = ingest_config(make_config, broker.bootstrap, actors=1)
    data = config.model_dump()
    data["specialists"] = [{**s, "schedule": {**s["schedule"], "min_new_documents": 20}} for s in data["specialists"]]
    config = type(config).model_validate(data)
    law = [d for d in read_jsonl(CORPUS / "train" / "law.jsonl")][:50]
    listener = Listener.remote()
    handle = supervisor(config, listener)
    produce(config, *encode(law[:30]))
    wait_until(lambda: len(ray.get(listener.seen.remote())) == 1, 120, "the first data_ready")
    produce(config, *encode(law[30:45]))
    calls = wait_until(lambda: (c := ray.get(listener.seen.remote())) and len(c) == 2 and c, 120, "the second data_ready")
    assert [c[0] for c in calls] == ["law", "law"]
    # each call fires when the count crosses a multiple of 20; a worker may write the second batch as several
    # shards, so the second call can come at 40 with the last 5 still to land (CI saw that, 28 Nov)
    first, second = calls[0][1], calls[1][1]
    assert 20 <= first["new_documents"] < 40 and 40 <= second["new_documents"] <= 45
    assert sum(second["offsets"].values()) == second["new_documents"] and second["shards"]
    wait_until(lambda: ray.get(handle.new_data.remote())["law"]["new_documents"] == 45, 60, "all 45 counted")
    assert len(ray.get(listener.seen.remote())) == 2, "45 crosses no further multiple of 20"
    reset = ray.get(handle.reset_new_data.remote("law"))
    assert reset["new_documents_before"] == 45
    assert ray.get(handle.new_data.remote())["law"]["new_documents"] == 0
    # a new supervisor on the same storage: the reset and the counts are still there
    ray.get(handle.stop.remote())
    again = supervisor(config)
    new_data = ray.get(again.new_data.remote())
    assert (new_data["law"]["new_documents"], new_data["law"]["documents"]) == (0, 45)


@pytest.mark.slow
def test_lost_commits_and_orphan_shards_are_repaired_on_restart(broker, ray_local, make_config, supervisor):
    config = ingest_config(make_config, broker.bootstrap, actors=1)
    docs = corpus_documents(400, seed=3)
    produce(config, *encode(docs))
    first = supervisor(config)
    wait_until(lambda: ledger_messages(config) == len(docs), 120, "every message in the ledger")
    ray_local.get(first.stop.remote())
    manifests = len(Ledger(config.storage_root).manifests())

    # a crash after the manifests but before the commits: the group's offsets go back to 0 ...
    consumer = KafkaConsumer(**config.kafka.client_kwargs(), group_id=config.ingest.group_id, enable_auto_commit=False)
    partitions = [TopicPartition(config.kafka.topics.documents, p) for p in range(3)]
    consumer.assign(partitions)
    consumer.commit({tp: OffsetAndMetadata(0, "", -1) for tp in partitions})
    consumer.close()
    # ... and a crash in the middle of writing a batch: a shard that no manifest vouches for
    store = DatasetStore(config.storage_root)
    orphan = store.write_shard([{**docs[0], "id": "orphan-1", "assigned_by": "producer", "route_confidence": None}],
                               name=shard_name(config.kafka.topics.documents, 1, 10_000, 10_099, "0123456789ab"),
                               schema=INGESTED_SCHEMA)

    second = supervisor(config)
    wait_until(lambda: sum(i["committed"] or 0 for i in ray_local.get(second.status.remote())["partitions"].values())
               == len(docs), 120, "the commits repaired")
    status = ray_local.get(second.status.remote())
    assert status["totals"]["messages"] == 0 and status["totals"]["duplicates"] == 0  # nothing was read twice
    assert len(Ledger(config.storage_root).manifests()) == manifests
    assert not any(store.fs.get_file_info(path).is_file for path in orphan)
    assert_exactly_once(config, docs)


class CuttableProxy:
    """A loopback TCP proxy in a thread; `cut()` closes it and every connection, `restore()` reopens it."""

    def __init__(self, listen_port: int, target_port: int):
        self.listen_port, self.target_port = listen_port, target_port
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.writers: set = set()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _pipe(self, reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self.writers |= {client_writer, server_writer}
        await asyncio.gather(self._pipe(client_reader, server_writer), self._pipe(server_reader, client_writer))

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    def restore(self) -> None:
        async def start():
            self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port, reuse_address=True)
        self._run(start())

    def cut(self) -> None:
        async def stop():
            self.server.close()
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()
            await self.server.wait_closed()
        self._run(stop())


@pytest.mark.slow
def test_ingest_stalls_while_kafka_is_unreachable_and_resumes_without_loss(ray_local, make_config, supervisor, tmp_path):
    isolated = EmbeddedBroker(log_dir=tmp_path / "broker", advertised_port=free_port())  # clients only see the proxy
    proxy = CuttableProxy(isolated.advertised_port, isolated.port)
    proxy.restore()
    try:
        with isolated:
            _run_through_outages(ray_local, make_config, supervisor, proxy, isolated.bootstrap)
    finally:
        proxy.cut()
        proxy.loop.call_soon_threadsafe(proxy.loop.stop)


def _run_through_outages(ray, make_config, supervisor, proxy, bootstrap):
    config = ingest_config(make_config, bootstrap, actors=1, flush_interval_s=3.0,  # batches flush by time:
                           batch_max_documents=10_000)  # a wide window to cut the connections in
    docs = corpus_documents(900, seed=2)
    values, keys = encode(docs)
    handle = supervisor(config)
    produce(config, values[:300], keys[:300])
    wait_until(lambda: ledger_messages(config) == 300, 120, "the first 300 documents")

    proxy.cut()  # Kafka unreachable: nothing moves, nothing breaks
    stalled_at = ledger_messages(config)
    time.sleep(3)
    assert ledger_messages(config) == stalled_at == 300
    proxy.restore()

    produce(config, values[300:600], keys[300:600])
    wait_until(lambda: ray.get(handle.status.remote())["workers"][0]["pending"] > 0, 120, "a batch being gathered",
               explain=lambda: ray.get(handle.status.remote()))
    proxy.cut()  # cut again with a batch in hand: its commit cannot reach Kafka
    time.sleep(3)
    proxy.restore()
    produce(config, values[600:], keys[600:])
    wait_until(lambda: ledger_messages(config) == len(docs), 120, "every document after the outages",
               explain=lambda: format_ingest_status(ray.get(handle.status.remote())))
    assert_exactly_once(config, docs)
    wait_until(lambda: sum(i["committed"] or 0 for i in ray.get(handle.status.remote())["partitions"].values())
               == len(docs), 120, "committed offsets past every message")
    assert ray.get(handle.status.remote())["restarts"] == 0  # the actor rode it out by itself


def test_cli_ingest_produces_every_line_and_reports_one_line(broker, make_config, tmp_path, capsys, monkeypatch):
    import yaml

    from senmon.cli import main
    from senmon.ingest import producer

    monkeypatch.setattr(producer, "CONNECT_TIMEOUT_S", 2.0)

    config = ingest_config(make_config, broker.bootstrap)
    docs = corpus_documents(50, seed=4)
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs) + "\n{broken\n", encoding="utf-8")
    config_file = tmp_path / "senmon.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    assert main(["--config", str(config_file), "ingest", str(source)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "51 of 51 documents" in out[0] and "1 without an id" in out[0]
    messages = read_topic(config, config.kafka.topics.documents, 51)
    assert sorted(m.value for m in messages) == sorted([json.dumps(d, ensure_ascii=False).encode() for d in docs]
                                                       + [b"{broken"])
    assert {m.key for m in messages if m.value != b"{broken"} == {d["id"].encode() for d in docs}

    down = config.model_dump(mode="json")
    down["kafka"]["bootstrap_servers"] = [f"127.0.0.1:{free_port()}"]
    config_file.write_text(yaml.safe_dump(down), encoding="utf-8")
    assert main(["--config", str(config_file), "ingest", str(source)]) == 2
    assert "did not answer" in capsys.readouterr().err
