"""The `senmon` command line as a user meets it: real processes, one-line errors, no tracebacks.

`senmon demo` itself runs end to end in tests/test_system.py (the same `demo.run`, at CI sizes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from senmon.ingest.broker import free_port

REPO = Path(__file__).resolve().parents[1]


def senmon(*args: str, config: Path | None = None, home: Path | None = None, timeout: int = 120):
    argv = [sys.executable, "-m", "senmon.cli", *(["--config", str(config)] if config else []), *args]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", **({"HOME": str(home)} if home else {}))
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)


def write_config(tmp_path: Path, data: dict, **overrides) -> Path:
    data = dict(data, storage_root=str(tmp_path / "storage"), corpus_dir=str(REPO / "data" / "corpus"), **overrides)
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
