"""`senmon down` leaves nothing running: after an orderly stop, and after `senmon up` was SIGKILLed.

Each test starts `senmon up` as a real process (the same `run_up` the command runs, with the durable
embedded broker, local Ray, the registry and the ingest supervisor with its actor; no training and
no Serve, which would take minutes) in its own $HOME, then stops it and reads the process table:
no broker, no Ray process of that stack (GCS, raylet, workers, actors), no senmon process. The
processes are found the way `senmon down` finds them (senmon/stack.py: the SENMON_STACK tag in
their environment, a file open in the Ray session's directory), and, independently, as the
descendants of the `senmon up` process seen while it ran and by the broker's port. The SIGKILL test writes its figure to var/reliability/ (tests/reliability.py).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reliability import record_figure
from senmon.ingest.broker import free_port
from senmon.stack import STACK_ENV, tagged_processes
from test_cli import REPO, _descendants, _still_running, senmon, write_config

pytestmark = pytest.mark.slow

UP_WITH_BROKER = ("import sys; from senmon.cli import run_up; from senmon.config import load_config; "
                  "sys.exit(run_up(load_config(sys.argv[1]), train=False, serve=False, ingest=True, "
                  "schedule=False, seed=False))")


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _start_up(tmp_path: Path, embedded_config_data: dict) -> tuple[subprocess.Popen, Path, int, tuple[str, str]]:
    """`senmon up` (the UP_WITH_BROKER subset) in its own $HOME; returns it, its config, the broker port
    and the stack's tag and Ray session directory once its record says it is up."""
    kafka_port = free_port()
    kafka = dict(embedded_config_data["kafka"], bootstrap_servers=[f"127.0.0.1:{kafka_port}"])
    config = write_config(tmp_path, embedded_config_data, kafka=kafka,
                          http=dict(embedded_config_data["http"], port=free_port()))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS", STACK_ENV))}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    up = subprocess.Popen([sys.executable, "-c", UP_WITH_BROKER, str(config)], env=env, text=True, cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = tmp_path / ".senmon" / f"up-{embedded_config_data['name']}.json"
    deadline = time.monotonic() + 180
    while not record.exists() and up.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if not record.exists():
        up.kill()
        raise AssertionError(f"senmon up did not come up (exit status {up.poll()}):\n{up.communicate()[0]}")
    [stack] = [json.loads(p.read_text()) for p in (tmp_path / ".senmon" / "stacks").glob("*.json")]
    assert stack["pid"] == up.pid and stack["ray_session_dir"]
    return up, config, kafka_port, (stack["tag"], stack["ray_session_dir"])


def _kill_all(processes) -> None:
    for pid in processes:  # leave nothing behind, even when the test failed
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def test_down_stops_the_broker_and_every_process_of_up(tmp_path, embedded_config_data):
    up, config, kafka_port, tag = _start_up(tmp_path, embedded_config_data)
    started = _descendants(up.pid)
    tagged = tagged_processes(*tag)
    try:
        assert _port_open(kafka_port)
        assert any("tansu" in command for command in tagged.values()), tagged
        assert any("raylet" in command for command in tagged.values()), tagged
        untagged = set(_still_running(started)) - set(tagged_processes(*tag))
        assert not untagged, f"processes of senmon up without the stack's tag: {untagged}"
        t0 = time.monotonic()
        down = senmon("down", config=config, home=tmp_path, timeout=150)
        down_s = time.monotonic() - t0
        output, _ = up.communicate(timeout=1)  # `down` returned once `up` had exited, not as it began to stop
    finally:
        if up.poll() is None:
            up.kill()
        _kill_all(_still_running(started))
    # the stack's stop ends with a sweep of its tagged processes; it says what it had to stop
    outlived = re.search(r"stopped (\d+) processes that outlived the stack's stop: (.*)", output)
    record_figure("orderly_down", {"processes_of_up": len(tagged), "down_s": round(down_s, 2),
                                   "outlived_the_stop": outlived.group(2)[:500] if outlived else None})
    assert not outlived or "tansu" not in outlived.group(2), "the broker outlived the orderly stop"
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert "left by a senmon that was killed" not in down.stdout  # the orderly stop stopped everything itself
    assert up.returncode == 0 and "==> stopped" in output, output
    assert not _still_running(started) and not tagged_processes(*tag)
    assert not _port_open(kafka_port)
    assert not list((tmp_path / ".senmon").glob("up-*.json")) and not list((tmp_path / ".senmon" / "stacks").glob("*"))


def test_down_after_up_was_sigkilled_leaves_nothing_running(tmp_path, embedded_config_data):
    up, config, kafka_port, tag = _start_up(tmp_path, embedded_config_data)
    started = _descendants(up.pid)
    try:
        before = tagged_processes(*tag)
        up.send_signal(signal.SIGKILL)
        up.wait(timeout=30)
        time.sleep(2)  # what dies with it by itself (Ray's own fate sharing) has gone by now
        left = tagged_processes(*tag)
        # a process that is exiting has no command line left: counted, named "(exiting)"
        kinds = sorted({(command.split() or ["(exiting)"])[0].rsplit("/", 1)[-1] for command in left.values()})
        t0 = time.monotonic()
        down = senmon("down", config=config, home=tmp_path, timeout=150)
        down_s = time.monotonic() - t0
        after = tagged_processes(*tag)
        still = _still_running(started)
        broker_open = _port_open(kafka_port)
        record_figure("sigkill_up_then_down", {
            "processes_of_up": len(before), "left_after_sigkill": len(left), "left_kinds": kinds,
            "left_after_down": len(after) + len(set(still) - set(after)), "broker_port_open_after_down": broker_open,
            "down_s": round(down_s, 2)})
    finally:
        _kill_all(_still_running(started))
    assert before and _port_open(kafka_port) is False
    assert down.returncode == 0, down.stdout + down.stderr
    assert left, "nothing outlived the SIGKILL: the test would show nothing"
    assert "processes left by a senmon that was killed" in down.stdout, down.stdout
    assert not after and not still and not broker_open
    assert not list((tmp_path / ".senmon").glob("up-*.json")) and not list((tmp_path / ".senmon" / "stacks").glob("*"))
    again = senmon("down", config=config, home=tmp_path, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == "senmon is not up"
