"""The README's first command, end to end: `senmon demo` on the embedded stack, as a real process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

from senmon.ingest.broker import free_port

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_and_leaves_nothing_running(tmp_path, embedded_config_data):
    port = free_port()
    data = dict(embedded_config_data, storage_root=str(tmp_path / "storage"), corpus_dir=str(REPO / "data" / "corpus"))
    data["kafka"] = dict(data["kafka"], bootstrap_servers=[f"127.0.0.1:{port}"])
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")

    result = subprocess.run([sys.executable, "-m", "senmon.cli", "--config", str(config), "demo"],
                            capture_output=True, text=True, timeout=600, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for domain in ("law", "code", "dictionary", "literature", "japanese"):
        assert f"\n{domain} " in out, out
    assert "round trip on senmon.documents" in out
    assert "Ray and the broker are stopped" in out
    with socket.socket() as sock:  # the broker is gone
        assert sock.connect_ex(("127.0.0.1", port)) != 0


def test_bad_config_is_one_line_not_a_traceback(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("specialists: 3\nstorage_root: x\ncorpus_dir: y\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "senmon.cli", "--config", str(config), "config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(f"senmon config: {config}: invalid configuration")
    assert "specialists" in result.stderr
