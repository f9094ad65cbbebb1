"""The `senmon` command line as a user meets it: real processes, one-line errors, no tracebacks.

`senmon demo` itself runs end to end in tests/test_system.py (the same `demo.run`, at CI sizes).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from senmon.ingest.broker import free_port

REPO = Path(__file__).resolve().parents[1]


def senmon(*args: str, config: Path | None = None, home: Path | None = None, timeout: int = 120):
    argv = [sys.executable, "-m", "senmon.cli", *(["--config", str(config)] if config else []), *args]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **({"HOME": str(home)} if home else {}))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def write_config(tmp_path: Path, data: dict, **overrides) -> Path:
    data = dict(data, storage_root=str(tmp_path / "storage"), corpus_dir=str(REPO / "data" / "corpus"),
                routing_dir=str(REPO / "data" / "routing"), **overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_bad_config_is_one_line_not_a_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("specialists: 3\nstorage_root: x\ncorpus_dir: y\n", encoding="utf-8")
    result = senmon("config", config=config)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"senmon config: {config}: invalid configuration")
    assert "specialists" in result.stderr


def test_a_bad_eval_file_is_refused_before_torch_loads(tmp_path):
    """`senmon eval` checks its file first, in a module that loads neither torch nor transformers (seconds
    here), so a bad line is named at once; tests/test_train.py runs the whole command on a good file."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine", "domain": "law"}\n{"text": "no domain"}\n', encoding="utf-8")
    probe = ("import sys; from senmon.train.eval_input import EvalInputError, read_eval_file\n"
             "try:\n    read_eval_file(sys.argv[1])\nexcept EvalInputError as error:\n    print(error)\n"
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe, str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{bad}:2: needs a string 'domain'", "[]"], out.stdout


def test_data_loads_and_summarises_every_domain(tmp_path, embedded_config_data):
    result = senmon("data", config=write_config(tmp_path, embedded_config_data))
    assert result.returncode == 0, result.stderr
    for domain in ("law", "code", "dictionary", "literature", "japanese"):
        assert f"\n{domain} " in result.stdout, result.stdout
    assert (tmp_path / "storage" / "datasets" / "japanese" / "train" / "seed.parquet").exists()


def test_status_ask_and_down_when_nothing_runs(tmp_path, embedded_config_data):
    port = free_port()  # nothing listens there
    config = write_config(tmp_path, embedded_config_data, http=dict(embedded_config_data["http"], port=port))
    status = senmon("status", config=config, home=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "senmon is not up" in status.stdout and "generalist" in status.stdout

    ask = senmon("ask", "What does the GPL say?", config=config, home=tmp_path)
    assert ask.returncode == 2 and "Traceback" not in ask.stderr
    assert ask.stderr.startswith(f"senmon ask: no senmon server answers at http://127.0.0.1:{port}")

    down = senmon("down", config=config, home=tmp_path)
    assert down.returncode == 0 and down.stdout.strip() == "senmon is not up"


def test_a_stale_up_record_is_not_taken_for_a_running_system(tmp_path, embedded_config_data):
    config = write_config(tmp_path, embedded_config_data, http=dict(embedded_config_data["http"], port=free_port()))
    record = tmp_path / ".senmon" / f"up-{embedded_config_data['name']}.json"
    record.parent.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.write_text(json.dumps({"pid": int(dead.stdout), "url": "http://127.0.0.1:1"}))
    assert "senmon is not up" in senmon("status", config=config, home=tmp_path).stdout


def test_unknown_specialist_is_one_line(tmp_path, embedded_config_data):
    result = senmon("train", "astronomy", config=write_config(tmp_path, embedded_config_data))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip() == ("senmon train: no specialist named 'astronomy' "
                                     "(configured: law, code, dictionary, literature, japanese, generalist)")


# `senmon up` with its Ray and registry only (the same run_up: start_system, state file, wait for SIGTERM)
UP_WITHOUT_SERVING = ("import sys; from senmon.cli import run_up; from senmon.config import load_config; "
                      "sys.exit(run_up(load_config(sys.argv[1]), train=False, serve=False, ingest=False, "
                      "schedule=False, seed=False))")


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state, ppid, ...), or None when it is gone."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> dict[int, str]:
    """Every process below `pid`, each with its start time (so a reused pid is not taken for it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = {}, list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if (fields := _stat(child)) is not None:
            found[child] = fields[19]
            todo += children.get(child, [])
    return found


def _still_running(processes: dict[int, str]) -> list[int]:
    return [pid for pid, start in processes.items()
            if (fields := _stat(pid)) is not None and fields[19] == start and fields[0] != "Z"]


def test_status_from_another_terminal_passes_ray_token_auth(tmp_path, embedded_config_data):
    """`senmon up` in one process, `senmon status` in another, as in two terminals of one user, with
    Ray's token authentication on (its default): status connects to the recorded address with the
    recorded token and reads the serving versions from the running registry; `down` stops it all."""
    from senmon.actors.registry import RegistryState

    config = write_config(tmp_path, embedded_config_data, http=dict(embedded_config_data["http"], port=free_port()))
    registry = RegistryState()  # one serving version in the registry's file; the registry actor reads it back
    registry.register("japanese", "run-1", str(tmp_path / "checkpoint"), {"val_ppl": 123.4}, {}, {})
    registry.promote("japanese", 1, 0.01)
    (tmp_path / "storage" / "registry").mkdir(parents=True)
    (tmp_path / "storage" / "registry" / "registry.json").write_text(
        json.dumps({"format": 1, "written_at": "2026-01-01T00:00:00Z", "specialists": registry.records}))

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")  # Ray's token goes to $HOME/.ray/auth_token
    up = subprocess.Popen([sys.executable, "-c", UP_WITHOUT_SERVING, str(config)], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    record = tmp_path / ".senmon" / f"up-{embedded_config_data['name']}.json"
    started: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 180  # as tests/test_cleanup.py: it ran past 60 s once under the suite's load
        while not record.exists() and up.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert record.exists(), f"senmon up did not come up (exit status {up.poll()}); its output is below"
        started = _descendants(up.pid)  # Ray's processes, to check they go
        state = json.loads(record.read_text())
        assert state["ray_auth"] == {"mode": "token", "token_path": str(tmp_path / ".ray" / "auth_token")}
        assert (tmp_path / ".ray" / "auth_token").exists() and record.stat().st_mode & 0o777 == 0o600

        # about 5 s on an idle machine; CI killed it at 60 s once, with its table printed, beside the suite's
        # training and engine starts on two cores, so the bound is the same hang guard as `senmon up`'s above
        status = senmon("status", config=config, home=tmp_path, timeout=180)
        assert status.returncode == 0, status.stderr
        assert "InvalidAuthToken" not in status.stderr
        assert f"senmon is up since {state['started_at']}" in status.stdout, status.stdout
        # this `senmon up` serves nothing, so Serve runs no proxy (tests/test_serve.py and test_ray_up.py name theirs)
        assert "front door: none (Serve runs no proxy) (serve.ingress: proxy)\n" in status.stdout, status.stdout
        [line] = [line for line in status.stdout.splitlines() if line.startswith("japanese ")]
        assert line.split()[1:3] == ["v1", "123.4"], status.stdout
    finally:
        started = started or _descendants(up.pid)
        down = senmon("down", config=config, home=tmp_path, timeout=90)
        try:
            output, _ = up.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
            output, _ = up.communicate()
        print(output)  # pytest shows it when the test fails
        deadline = time.monotonic() + 15
        while (alive := _still_running(started)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in alive:  # leave nothing behind, even when the test failed
            os.kill(pid, signal.SIGKILL)
    assert down.returncode == 0, down.stderr
    assert up.returncode == 0 and "==> stopped" in output, output
    assert not record.exists()
    assert not alive, f"left running: {alive}"


def test_the_recorded_ray_token_is_a_file_another_process_can_read(tmp_path, monkeypatch):
    """Each way Ray 2.60 takes a token; one given only in the environment is copied, for this user alone."""
    from senmon.stack import ray_auth_for_others

    copy = tmp_path / "ray-auth-token-test"
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ray_auth_for_others(copy) == ({"mode": "disabled"}, [])

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # what ray.init() sets when it turns authentication on
    assert ray_auth_for_others(copy) == ({"mode": "token", "token_path": str(tmp_path / ".ray" / "auth_token")}, [])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "tokens/ray")  # relative to where `senmon up` ran: made absolute
    assert ray_auth_for_others(copy) == ({"mode": "token", "token_path": str(tmp_path / "tokens" / "ray")}, [])

    monkeypatch.setenv("RAY_AUTH_TOKEN", "s3cret")  # Ray prefers it to any file
    copy.write_text("an older token")
    copy.chmod(0o644)
    assert ray_auth_for_others(copy) == ({"mode": "token", "token_path": str(copy)}, [copy])
    assert copy.read_text() == "s3cret" and copy.stat().st_mode & 0o777 == 0o600
