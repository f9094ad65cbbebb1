"""Helpers of the fault tests (tests/test_faults.py): their figures, and hooks the scheduler actor imports.

Each fault test writes what it measured to `var/reliability/<test>.json` with `record_figure` (and
prints it, so `pytest -s` shows it); bench/results/reliability.json gathers these files. The hooks are
plain functions named as `module:function` in the scheduler's config, so the scheduler's own process
imports this module as `tests.reliability` (Ray puts the driver's working directory, the repository,
on its workers' path).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIGURES = REPO / "var" / "reliability"


def record_figure(test: str, figure: dict) -> Path:
    """Write `figure` (JSON-able) as var/reliability/<test>.json, with when and where it was measured."""
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{test}.json"
    payload = {"test": test, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "host": platform.node(), "cpus": os.cpu_count(),
               "load_average_1m": round(os.getloadavg()[0], 2), **figure}  # other work shares these cores
    path.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"\n{test}: {json.dumps(figure)}")
    return path


# --------------------------------------------------------------------------- scheduler hooks (test_faults.py)

HOOK_CALLS = "swap-hook-calls.jsonl"  # under the storage root


def swap_hook_calls(storage_root: str) -> list[dict]:
    path = Path(storage_root) / HOOK_CALLS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def blocking_swap_hook(config_data: dict, name: str, record: dict, registry_name: str = "",
                       namespace: str | None = None) -> dict:
    """A swap hook that hangs on its first call (the scheduler is killed during it) and returns at once later."""
    calls = swap_hook_calls(config_data["storage_root"])
    with open(Path(config_data["storage_root"]) / HOOK_CALLS, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"model": name, "version": record["version"], "run_id": record["run_id"],
                                 "pid": os.getpid(), "at": time.time()}) + "\n")
    if not calls:
        time.sleep(600)
    return {"kind": "test hook", "changed": True, "version": record["version"]}
