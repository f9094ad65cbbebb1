"""The embedded broker: starts, answers the real Kafka protocol, round-trips documents, stops; the
durable one keeps its messages and committed offsets across a restart, the memory one does not."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.structs import OffsetAndMetadata

from senmon.ingest.broker import BrokerError, EmbeddedBroker, ensure_topics


def test_producer_consumer_round_trip(broker):
    topic = "roundtrip"
    ensure_topics({"bootstrap_servers": broker.bootstrap}, [topic], partitions=3)
    documents = [{"id": f"doc-{i}", "text": f"文書 {i} — text", "domain": "japanese"} for i in range(300)]

    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, value_serializer=lambda v: json.dumps(v).encode())
    for index, doc in enumerate(documents):
        producer.send(topic, doc, partition=index % 3)
    producer.flush(timeout=10)
    producer.close()

    # explicit assignment (Ray, not the group protocol, decides who reads what)
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, enable_auto_commit=False,
                             auto_offset_reset="earliest", consumer_timeout_ms=5000,
                             value_deserializer=lambda b: json.loads(b))
    consumer.assign([TopicPartition(topic, p) for p in range(3)])
    received = [message.value for message in consumer]
    consumer.close()
    assert sorted(received, key=lambda d: int(d["id"].split("-")[1])) == documents


def test_committed_offsets_resume_where_they_stopped(broker):
    topic = "resume"
    ensure_topics({"bootstrap_servers": broker.bootstrap}, [topic], partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(10):
        producer.send(topic, str(i).encode(), partition=0)
    producer.flush(timeout=10)
    producer.close()

    partition = TopicPartition(topic, 0)

    def consumer():
        c = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="resume-test", enable_auto_commit=False,
                          auto_offset_reset="earliest", consumer_timeout_ms=3000)
        c.assign([partition])
        return c

    first = consumer()
    taken = [next(first).value for _ in range(4)]
    first.commit()
    first.close()
    second = consumer()
    rest = [m.value for m in second]
    second.close()
    assert taken + rest == [str(i).encode() for i in range(10)]


def test_broker_stops_and_frees_its_port(tmp_path):
    broker = EmbeddedBroker(log_dir=tmp_path)
    broker.start()
    assert broker.running
    broker.stop()
    assert not broker.running
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", broker.port)) != 0


def test_port_in_use_is_a_clear_error(broker, tmp_path):
    with pytest.raises(BrokerError, match=f"port {broker.port} is already in use"):
        EmbeddedBroker(port=broker.port, log_dir=tmp_path).start()


def test_durable_broker_keeps_messages_and_offsets_across_a_restart(tmp_path):
    """Stopped and started again on the same port and directory (its object server too, reading the
    files back), the broker still has every message, its offsets and the group's committed offsets."""
    broker = EmbeddedBroker(data_dir=tmp_path / "broker")
    topic, partitions = "kept", [TopicPartition("kept", p) for p in range(2)]
    try:
        broker.start()
        ensure_topics({"bootstrap_servers": broker.bootstrap}, [topic], partitions=2)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        for i in range(200):
            producer.send(topic, f"m{i}".encode(), partition=i % 2)
        producer.flush(timeout=30)
        producer.close()
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="kept-group", enable_auto_commit=False)
        consumer.assign(partitions)
        consumer.commit({tp: OffsetAndMetadata(40, "", -1) for tp in partitions})
        consumer.close()
        port = broker.port

        broker.stop()
        assert not broker.running and (tmp_path / "broker" / "objects").is_dir()
        broker.start()
        assert broker.port == port

        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id="kept-group", enable_auto_commit=False,
                                 consumer_timeout_ms=3000)
        consumer.assign(partitions)
        assert [consumer.committed(tp) for tp in partitions] == [40, 40]
        for tp in partitions:
            consumer.seek(tp, 0)
        received = [(m.partition, m.offset, m.value) for m in consumer]
        consumer.close()
        assert sorted(received) == sorted((i % 2, i // 2, f"m{i}".encode()) for i in range(200))
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
        metadata = producer.send(topic, b"after", partition=0).get(timeout=30)
        producer.close()
        assert metadata.offset == 100  # the offsets go on from where they were, not from 0
    finally:
        broker.cleanup()
    assert not (tmp_path / "broker").exists()


def test_memory_broker_forgets_everything_when_it_stops(tmp_path):
    """The other setting, for comparison: a memory broker started again has no topics."""
    broker = EmbeddedBroker(log_dir=tmp_path)
    try:
        broker.start()
        ensure_topics({"bootstrap_servers": broker.bootstrap}, ["gone"], partitions=1)
        broker.stop()
        broker.start()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
        assert "gone" not in admin.list_topics()
        admin.close()
    finally:
        broker.stop()



def test_object_server_answers_the_s3_calls_the_broker_makes(tmp_path):
    """Conditional PUTs (the broker's coordination), ranges, pages of ListObjectsV2 with a delimiter,
    deletes, and the objects read back from the files by a new server."""
    import http.client
    import re

    from senmon.ingest.objectstore import ObjectStoreServer

    def call(server, method, path, body=b"", headers=None):
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        result = response.status, dict(response.getheaders()), response.read()
        connection.close()
        return result

    def list_all(server, query: str, pattern: str) -> list[str]:
        """Every match of `pattern` in a ListObjectsV2 of bucket b, page after page (continuation tokens)."""
        found, token = [], None
        while True:
            listing = call(server, "GET", "/b?list-type=2&" + query + (f"&continuation-token={token}" if token else ""))
            text = listing[2].decode()
            found += re.findall(pattern, text)
            if "<NextContinuationToken>" not in text:
                return found
            token = re.search(r"<NextContinuationToken>(.*?)</NextContinuationToken>", text).group(1)

    with ObjectStoreServer(tmp_path) as server:
        status, headers, _ = call(server, "PUT", "/b/meta.json", b"v1", {"If-None-Match": "*"})
        assert status == 200
        etag = headers["ETag"]
        assert call(server, "PUT", "/b/meta.json", b"v2", {"If-None-Match": "*"})[0] == 412  # exists
        assert call(server, "PUT", "/b/meta.json", b"v2", {"If-Match": '"not-it"'})[0] == 412  # changed meanwhile
        status, headers, _ = call(server, "PUT", "/b/meta.json", b"v2", {"If-Match": etag})
        assert status == 200 and headers["ETag"] != etag
        etag = headers["ETag"]
        assert call(server, "GET", "/b/meta.json")[2] == b"v2"
        assert call(server, "GET", "/b/meta.json", headers={"Range": "bytes=1-"})[::2] == (206, b"2")
        assert call(server, "GET", "/b/missing")[0] == 404
        for i in range(25):
            call(server, "PUT", f"/b/t/p{i % 3}/records/{i:020}.batch", b"x" * i)
        # pages of 7 and of 3, as a client pages through a long partition
        assert list_all(server, "prefix=t/&delimiter=/&max-keys=7", "<CommonPrefixes><Prefix>(.*?)</Prefix>") == [
            "t/p0/", "t/p1/", "t/p2/"]
        assert list_all(server, "prefix=t/p1/records/&max-keys=3", "<Key>(.*?)</Key>") == [
            f"t/p1/records/{i:020}.batch" for i in range(1, 25, 3)]
        assert call(server, "DELETE", "/b/t/p1/records/00000000000000000001.batch")[0] == 204
    with ObjectStoreServer(tmp_path) as again:  # a new server reads the files back
        assert call(again, "GET", "/b/meta.json")[::2] == (200, b"v2")
        assert call(again, "HEAD", "/b/meta.json")[1]["ETag"] == etag  # so the broker's next If-Match holds
        assert call(again, "GET", "/b/t/p1/records/00000000000000000001.batch")[0] == 404
        assert call(again, "GET", "/b/t/p2/records/00000000000000000023.batch")[2] == b"x" * 23


def test_durable_is_the_default_and_needs_a_local_storage_root(make_config):
    from senmon.config import ConfigError

    config = make_config()
    assert config.kafka.embedded_storage == "durable"
    assert config.broker_dir == Path(config.storage_root) / "broker"
    assert make_config(kafka={"embedded_storage": "memory"}).broker_dir is None
    with pytest.raises(ConfigError, match="embedded_storage: durable keeps the embedded broker's files under a local"):
        make_config(storage_root="s3://bucket/senmon")
    assert make_config(storage_root="s3://bucket/senmon", kafka={"embedded_storage": "memory"}).broker_dir is None
