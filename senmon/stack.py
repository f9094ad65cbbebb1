"""Bring senmon's infrastructure up and down: Ray and the Kafka connection.

With the embedded default this starts a local Ray instance and the embedded Kafka-protocol
broker, both on loopback only (every port of that Ray listens on 127.0.0.1: `loopback_node`),
waits until both answer, creates the topics, and on exit stops both. With a production config
(`ray.address` set, `kafka.embedded: false`) it joins the existing Ray cluster and checks that
the configured Kafka answers; it starts and stops nothing of theirs.

A stack that starts processes on this machine tags them: before it starts anything it puts
`SENMON_STACK=<id>` in its environment, which every process it starts inherits (the broker, Ray's
GCS and raylet, every Ray worker, each vLLM engine process those workers start), and it writes a
record, `~/.senmon/stacks/<pid>.json`, naming the id, its own process and the session directory
of the Ray it started. Ray's agents get a cleaned environment and a process title that can
overwrite the one /proc shows, but every Ray process keeps log files open in that session
directory. When the stack's process is killed (SIGKILL leaves no time to stop anything; Ray's GCS,
raylet and workers die with it, its agents and the broker do not), `stop_leftovers` finds every
process with the tag, with a file open in the session directory, or below one of those, and stops
it: `senmon down` and `senmon up` call it. A stack's own `stop()` ends with the same sweep.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
import uuid
from contextlib import contextmanager
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
    tag: str | None = None  # the SENMON_STACK value of the processes this stack started
    record: Path | None = None
    ray_session_dir: str | None = None  # of the Ray instance this stack started

    @property
    def kafka_kwargs(self) -> dict:
        return self.config.kafka.client_kwargs()

    def stop(self) -> None:
        """Stop the broker and Ray (each even when the other fails), then any process left with the tag."""
        try:
            if self.broker is not None:
                self.broker.stop()
        finally:
            try:
                if self.started_ray and ray.is_initialized():
                    ray.shutdown()
            finally:
                if self.tag is not None:
                    if os.environ.get(STACK_ENV) == self.tag:
                        del os.environ[STACK_ENV]
                    if outlived := stop_tagged(self.tag, self.ray_session_dir):
                        log.warning("stopped %d processes that outlived the stack's stop: %s", len(outlived),
                                    "; ".join(command[:80] for command in outlived.values()))
                    self.tag = None
                if self.record is not None:
                    self.record.unlink(missing_ok=True)
                    self.record = None

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
    with loopback_node():
        init_local_ray(num_cpus=config.ray.num_cpus, namespace=config.ray.namespace, include_dashboard=False,
                       logging_level=logging.WARNING, log_to_driver=config.ray.log_to_driver)
    return True


def init_local_ray(**init_kwargs) -> None:
    """`ray.init(**init_kwargs)` for a new local instance, tried again (RAY_START_ATTEMPTS in all) when its node
    timed out registering.

    Ray gives a new node a fixed 30 s to register with its GCS (ray/_private/node.py); on a loaded host (two
    cores, another Ray starting beside it) that can pass. Each new try starts without the last one's processes.
    """
    for attempt in range(1, RAY_START_ATTEMPTS + 1):
        try:
            ray.init(**init_kwargs)
            return
        except Exception as error:
            if attempt == RAY_START_ATTEMPTS or RAY_START_TIMEOUT not in str(error):
                raise
            stopped = stop_ray_children()
            log.warning("Ray's node did not register within Ray's 30 s (an overloaded host?); stopped the %d "
                        "processes of that try, starting Ray again", len(stopped))


RAY_START_ATTEMPTS = 3
RAY_START_TIMEOUT = "timed out during startup"  # ray/_private/node.py's message when the raylet does not register


def stop_ray_children(grace_s: float = 5.0) -> dict[int, str]:
    """Stop (`_stop`) every descendant of this process that is one of Ray's (its command line runs through the ray
    package: GCS, raylet, monitors, agents, workers); the broker and others are left; returns what was found."""
    def ray_descendants() -> dict[int, str]:
        found = {}
        for pid in _descendants([os.getpid()], _process_children()):
            command = _cmdline(pid)
            if command is not None and ("/ray/" in command or command.startswith(("ray::", "raylet"))):
                found[pid] = command
        return found

    return _stop(ray_descendants, grace_s, "of a Ray start that timed out")


@contextmanager
def loopback_node():
    """While it lasts, a Ray instance that `ray.init()` starts takes 127.0.0.1 as its node address.

    Each Ray process binds its ports to the node address when that is loopback and to every
    interface otherwise (the GCS, the raylet, every worker's gRPC port, the dashboard agent's gRPC,
    HTTP and Prometheus metrics ports, the runtime-env agent). `ray.init(_node_ip_address="127.0.0.1")`
    does not help: Ray turns a loopback address into the machine's reachable one. It picks loopback
    itself only where it disables clusters (macOS and Windows, `ray_constants.ENABLE_RAY_CLUSTER`),
    so this turns that flag off for the start and back on after. For the embedded stack only: a
    cluster's head must listen on its network.
    """
    from ray._private import ray_constants

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


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


# --------------------------------------------------------------------------- what a killed stack leaves

STACK_ENV = "SENMON_STACK"


def stacks_dir() -> Path:
    return Path.home() / ".senmon" / "stacks"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot; tells a reused pid apart), None when it is gone."""
    try:
        fields = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def wait_gone(pid: int, timeout_s: float) -> bool:
    """Wait until the process has exited (a zombie counts as gone); True if it did in time."""
    deadline = time.monotonic() + timeout_s
    while _start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _opens_under(pid: int, directory: str) -> bool:
    """True when one of the process's open files is under `directory`."""
    try:
        for fd in os.scandir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(fd.path).startswith(directory):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def tagged_processes(tag: str, ray_session_dir: str | None = None) -> dict[int, str]:
    """{pid: command line} of every live process (not this one) of the stack tagged `tag`.

    That is: each process whose environment carries SENMON_STACK=`tag`; with `ray_session_dir`,
    each process with a file open in that Ray session's directory (Ray's agents and workers log
    there; a long process title can overwrite the environment that /proc shows); and every
    descendant of those.
    """
    marker = f"{STACK_ENV}={tag}".encode()
    session = ray_session_dir.rstrip("/") + "/" if ray_session_dir else None
    children, roots = _process_children(), []
    for pid in {child for kids in children.values() for child in kids}:
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if marker in environ or (session and _opens_under(pid, session)):
            roots.append(pid)
    found = {}
    for pid in {*roots, *_descendants(roots, children)}:
        if (command := _cmdline(pid)) is not None:
            found[pid] = command
    return found


def _process_children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every live process (not zombies) but this one."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def _descendants(roots: list[int], children: dict[int, list[int]]) -> set[int]:
    found, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str | None:
    try:
        command = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return command.replace(b"\0", b" ").decode(errors="replace").strip()


def stop_tagged(tag: str, ray_session_dir: str | None = None, grace_s: float = 10.0) -> dict[int, str]:
    """SIGTERM every process of the stack (`tagged_processes`), SIGKILL what is left after `grace_s`;
    returns what was found."""
    return _stop(lambda: tagged_processes(tag, ray_session_dir), grace_s, "of a senmon stack")


def _stop(find, grace_s: float, what: str) -> dict[int, str]:
    """SIGTERM what `find()` returns ({pid: command line}), SIGKILL what it still returns after `grace_s`, wait up
    to 10 s more for it to be gone; returns what was found first."""
    found = find()
    for pid in found:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace_s
    while (alive := find()) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        log.warning("stopping pid %s %s with SIGKILL: %s", pid, what, alive[pid][:120])
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while find() and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def stop_leftovers(config_name: str | None = None) -> dict:
    """Stop the processes of every recorded stack (of `config_name`, or all) whose own process is gone.

    Returns {"stacks": [ids], "processes": {pid: command line}, "seconds": s}.
    """
    t0, stacks, processes = time.monotonic(), [], {}
    directory = stacks_dir()
    for path in sorted(directory.glob("*.json")) if directory.exists() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if config_name is not None and record.get("config") != config_name:
            continue
        if _start_time(record["pid"]) == record.get("pid_start"):
            continue  # its owner is alive: its own stop() will do
        # its Ray died with it (the GCS and raylet share its fate); what is left is orphaned: a short grace
        processes.update(stop_tagged(record["tag"], record.get("ray_session_dir"), grace_s=3.0))
        stacks.append(record["tag"])
        path.unlink(missing_ok=True)
    return {"stacks": stacks, "processes": processes, "seconds": time.monotonic() - t0}


def _tag_this_stack(stack: Stack) -> None:
    """Tag what this process starts from now on, and record the tag (see the module docstring)."""
    stack.tag = f"{stack.config.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.environ[STACK_ENV] = stack.tag
    directory = stacks_dir()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    stack.record = directory / f"{os.getpid()}.json"
    _write_record(stack)


def _write_record(stack: Stack) -> None:
    write_private(stack.record, json.dumps({
        "tag": stack.tag, "config": stack.config.name, "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
        "ray_session_dir": stack.ray_session_dir, "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}))


def start_stack(config: SenmonConfig, kafka: bool = True) -> Stack:
    """Start the broker (embedded only) and Ray, wait until both answer, create the topics.

    `kafka=False` brings up Ray alone, for commands that never touch the stream bus.
    """
    stack = Stack(config)
    try:
        if (kafka and config.kafka.embedded) or (not config.ray.address and not ray.is_initialized()):
            _tag_this_stack(stack)
        t0 = time.monotonic()
        if kafka and config.kafka.embedded:
            stack.broker = EmbeddedBroker(port=config.kafka.port, data_dir=config.broker_dir).start()
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
        if stack.started_ray and stack.record is not None:  # Ray's own processes log in its session directory
            stack.ray_session_dir = ray._private.worker._global_node.get_session_dir_path()
            _write_record(stack)
        ray.get(ray.remote(lambda: True).remote(), timeout=60)  # a task round-trip: Ray schedules work
        stack.timings["ray_s"] = time.monotonic() - t0
        return stack
    except BaseException:
        stack.stop()
        raise
