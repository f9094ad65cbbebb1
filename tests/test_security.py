"""What senmon exposes: the embedded stack listens on loopback only, and nothing it reads from a
request or a Kafka message is unpickled.

The loopback test starts a real `senmon up` (the same subset as tests/test_cleanup.py: local Ray, the
durable embedded broker with its object server, the registry and the ingest supervisor; no training
and no Serve, whose HTTP port is `http.host`'s, checked by `test_bind_host_without_keys_is_loopback`)
and reads the listening sockets of every process of that stack. The pickle tests hand a pickle whose
loading would leave a file behind to the two places untrusted bytes come in: the router's JSON
parser and the ingest's message check. That API keys never reach a response or a log is
tests/test_serve.py's `test_keys_never_in_responses_or_ray_logs`.
"""

from __future__ import annotations

import ipaddress
import pickle
import time

import psutil
import pytest

from senmon.ingest.contract import Rejection, Routing, check_message
from senmon.serve.errors import ApiError
from senmon.serve.validation import parse_json


class _Trap:
    """Unpickling this creates the file at `path`: proof that something was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _pickles(tmp_path) -> list[bytes]:
    trap = tmp_path / "unpickled"
    payload = {"id": "doc-1", "text": "pickled", "domain": "law", "trap": _Trap(str(trap))}
    return [pickle.dumps(payload, protocol=protocol) for protocol in (0, 2, pickle.HIGHEST_PROTOCOL)]


def test_ingest_rejects_a_pickled_message_as_invalid_json_without_unpickling_it(tmp_path):
    routing = Routing(frozenset({"law"}), {"law": "law"})
    for value in _pickles(tmp_path):
        rejected = check_message(value, 1 << 20, routing)
        assert isinstance(rejected, Rejection) and rejected.reason == "invalid_json", (value[:20], rejected)
    assert not (tmp_path / "unpickled").exists()
    assert check_message(b'{"id": "doc-1", "text": "json", "domain": "law"}', 1 << 20, routing)["id"] == "doc-1"


def test_router_answers_a_pickled_body_400_invalid_json_without_unpickling_it(tmp_path):
    for value in _pickles(tmp_path):
        with pytest.raises(ApiError) as refused:
            parse_json(value, 64)
        assert refused.value.status == 400 and refused.value.code == "invalid_json"
    assert not (tmp_path / "unpickled").exists()


# --------------------------------------------------------------------------- loopback


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 (Ray's gRPC)
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _listening(pids) -> dict[int, list[tuple[str, str, int]]]:
    """{pid: [(process name, address, port)]} of every listening TCP socket of these processes."""
    found = {}
    for pid in pids:
        try:
            process = psutil.Process(pid)
            name = " ".join(process.cmdline())[:100] or process.name()
            sockets = [(name, c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="inet")
                       if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # gone meanwhile
            continue
        if sockets:
            found[pid] = sockets
    return found


@pytest.mark.slow
def test_embedded_stack_listens_on_loopback_only(tmp_path, embedded_config_data):
    """Every port of `senmon up`'s embedded stack (Ray's GCS, raylet, workers, dashboard and runtime-env
    agents with the metrics export port, the broker and its object server) is bound to loopback."""
    from senmon.stack import tagged_processes
    from test_cleanup import _kill_all, _start_up
    from test_cli import _descendants, _still_running, senmon

    up, config, kafka_port, tag = _start_up(tmp_path, embedded_config_data)
    started = _descendants(up.pid)
    try:
        time.sleep(3)  # the agents open their last ports after the node registers
        pids = {up.pid, *_descendants(up.pid), *tagged_processes(*tag)}
        listening = _listening(pids)
        down = senmon("down", config=config, home=tmp_path, timeout=150)
    finally:
        if up.poll() is None:
            up.kill()
        _kill_all(_still_running(started))
    sockets = [s for found in listening.values() for s in found]
    print("listening:", *sorted({(name.split()[0].rsplit("/", 1)[-1], address, port) for name, address, port in sockets}),
          sep="\n  ")
    names = " ".join(name for name, _, _ in sockets)
    for part in ("gcs_server", "raylet", "tansu", "DashboardAgent", "RuntimeEnvAgent"):
        assert part in names, f"no listening socket of {part}: the test would show nothing about it\n{listening}"
    assert any(port == kafka_port for _, _, port in sockets)
    exposed = [s for s in sockets if not _loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert down.returncode == 0, down.stdout + down.stderr
