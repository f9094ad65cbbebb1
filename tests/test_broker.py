"""The embedded broker: starts, answers the real Kafka protocol, round-trips documents, stops."""

from __future__ import annotations

import json
import socket

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

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
