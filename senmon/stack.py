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
from pathlib import Path

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


# Ray's token authentication (on by default for a cluster that ray.init() starts): the mode is the
# RAY_AUTH_MODE variable, the token is RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH, else
# $HOME/.ray/auth_token (ray.init() creates that file for a new local cluster when there is no token).
AUTH_MODE_ENV, AUTH_TOKEN_ENV, AUTH_TOKEN_PATH_ENV = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by this user only (0600), whatever the umask or an older file's mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode("utf-8"))
    finally:
        os.close(fd)


def ray_auth_for_others(token_copy: Path) -> tuple[dict, list[Path]]:
    """How another process of this user authenticates to the Ray this process is connected to.

    Call after `start_ray`. Ray sets RAY_AUTH_MODE=token in this process when it turns token
    authentication on (a cluster ray.init() started, or one ray.init(address="auto") joined with a
    token at hand). A second process that connects to an explicit address, as `senmon status` does,
    sends no token unless it sets that mode itself, and then only the token its own environment
    points to. So this returns the mode and the token *file* to use: RAY_AUTH_TOKEN_PATH or
    ~/.ray/auth_token; a token given only as RAY_AUTH_TOKEN is copied to `token_copy` (0600), which
    is then listed in the second value, for the caller to remove when it stops.
    """
    if os.environ.get(AUTH_MODE_ENV, "").lower() != "token":
        return {"mode": "disabled"}, []
    if os.environ.get(AUTH_TOKEN_ENV):
        write_private(token_copy, os.environ[AUTH_TOKEN_ENV])
        return {"mode": "token", "token_path": str(token_copy)}, [token_copy]
    if os.environ.get(AUTH_TOKEN_PATH_ENV):
        return {"mode": "token", "token_path": str(Path(os.environ[AUTH_TOKEN_PATH_ENV]).expanduser().resolve())}, []
    return {"mode": "token", "token_path": str(Path.home() / ".ray" / "auth_token")}, []


def use_ray_auth(auth: dict | None) -> None:
    """Before `ray.init(address=...)`: authenticate as `auth` (from `ray_auth_for_others`) says.

    Without a record (a state file written before senmon recorded it), do what Ray does for an
    address it finds itself (`ray.init(address="auto")`): use token authentication when a token
    is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    if auth is None:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available)

        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
        return
    if auth.get("mode") != "token":
        return
    # the token the running system uses, not one this terminal's environment may name for another cluster
    os.environ.pop(AUTH_TOKEN_ENV, None)
    os.environ[AUTH_TOKEN_PATH_ENV] = auth["token_path"]
    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")  # Ray read its config (RAY_AUTH_MODE included) when it was imported: read it again
    AuthenticationTokenLoader.instance().reset_cache()


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
