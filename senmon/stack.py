"""Bring senmon's infrastructure up and down: Ray and the Kafka connection.

With the embedded default this starts a local Ray instance and the embedded Kafka-protocol
broker on loopback, waits until both answer, creates the topics, and on exit stops both. With
a production config (`ray.address` set, `kafka.embedded: false`) it joins the existing Ray
cluster and checks that the configured Kafka answers; it starts and stops nothing of theirs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import ray

from senmon.config import SenmonConfig
from senmon.ingest.broker import BrokerError, EmbeddedBroker, ensure_topics

log = logging.getLogger(__name__)


@dataclass
class Stack:
    """What `start_stack` brought up; `stop()` undoes exactly that."""

    config: SenmonConfig
    broker: EmbeddedBroker | None = None
    started_ray: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def kafka_kwargs(self) -> dict:
        return self.config.kafka.client_kwargs()

    def stop(self) -> None:
        if self.started_ray and ray.is_initialized():
            ray.shutdown()
        if self.broker is not None:
            self.broker.stop()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


QUIET_LOGGERS = ("ray.serve", "ray.data", "ray.train", "ray.llm", "vllm")


def quiet_driver_logs() -> None:
    """Keep this terminal to senmon's own lines and warnings.

    Serve LLM prints each deployment's options, Ray Data each dataset's plan and vLLM its platform
    checks at INFO in the driver; every process's log stays in the Ray session's logs directory.
    Serve LLM gives its module loggers their own handlers, so each one already created is quieted
    too (call again after importing more of them).
    """
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    for name in [*QUIET_LOGGERS, *logging.root.manager.loggerDict]:
        if name.startswith(QUIET_LOGGERS):
            logging.getLogger(name).setLevel(logging.WARNING)


def start_ray(config: SenmonConfig) -> bool:
    """Connect to (or start) Ray; True when this call started a local instance."""
    if not config.ray.log_to_driver:
        quiet_driver_logs()
    if ray.is_initialized():
        return False
    if config.ray.address:
        ray.init(address=config.ray.address, namespace=config.ray.namespace,
                 logging_level=logging.WARNING, log_to_driver=config.ray.log_to_driver)
        return False
    ray.init(num_cpus=config.ray.num_cpus, namespace=config.ray.namespace, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=config.ray.log_to_driver)
    return True


def start_stack(config: SenmonConfig, kafka: bool = True) -> Stack:
    """Start the broker (embedded only) and Ray, wait until both answer, create the topics.

    `kafka=False` brings up Ray alone, for commands that never touch the stream bus.
    """
    stack = Stack(config)
    try:
        t0 = time.monotonic()
        if kafka and config.kafka.embedded:
            stack.broker = EmbeddedBroker(port=config.kafka.port).start()
        if kafka:
            topics = config.kafka.topics
            try:
                ensure_topics(stack.kafka_kwargs, [topics.documents, topics.dead_letter], topics.partitions,
                              topics.replication_factor)
            except Exception as error:  # kafka-python raises several unrelated types for "no broker"
                raise BrokerError(f"Kafka at {', '.join(config.kafka.bootstrap_servers)} did not answer: {error}") from None
            stack.timings["kafka_s"] = time.monotonic() - t0

        t0 = time.monotonic()
        stack.started_ray = start_ray(config)
        ray.get(ray.remote(lambda: True).remote(), timeout=60)  # a task round-trip: Ray schedules work
        stack.timings["ray_s"] = time.monotonic() - t0
        return stack
    except BaseException:
        stack.stop()
        raise
