"""Reliability figures, gathered: what the fault tests measured, in one file.

The fault tests (tests/test_faults.py; tests/test_serve.py's schemathesis run, metrics scrape and the engine
and router replicas killed under load) each write their figures to
`var/reliability/<test>.json` when they run (tests/reliability.py). This collects the latest of each into
`bench/results/reliability.json` and prints one line per test, so the README's Reliability section has one
place to point to. It measures nothing itself: run the tests first (`make test`, or
`.venv/bin/python -m pytest tests/test_faults.py`).

    python -m bench reliability
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.common import table, write_results

FIGURES = Path(__file__).resolve().parents[1] / "var" / "reliability"
SKIP = {"test", "host", "cpus"}


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _small(value) -> bool:
    """A dict of a few numbers (a count by status, p50/p99): shown whole."""
    return isinstance(value, dict) and 0 < len(value) <= 8 and all(_number(v) for v in value.values())


def _compact(value: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"


def shown(figure: dict) -> list[str]:
    """A figure's headline: its scalars, small dicts of numbers whole, and the numbers (or small dicts) one level
    inside a larger dict of up to 8 entries; lists and longer dicts are left to the file."""
    parts = []
    for key, value in figure.items():
        if key in SKIP or key == "measured_at":
            continue
        if isinstance(value, list):
            continue
        if _small(value):
            parts.append(f"{key} {_compact(value)}")
        elif isinstance(value, dict):
            if len(value) <= 8:
                parts += [f"{key}.{k} {v if _number(v) else _compact(v)}" for k, v in value.items()
                          if _number(v) or _small(v)]
        else:
            parts.append(f"{key} {value}")
    return parts


def main() -> None:
    files = sorted(FIGURES.glob("*.json"))
    if not files:
        sys.exit(f"no figures under {FIGURES}: run the fault tests first (pytest tests/test_faults.py)")
    figures = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in files}
    rows = [[name, figure.get("measured_at", "-"), ", ".join(shown(figure))] for name, figure in figures.items()]
    print(table(["test", "measured", "figures"], rows))
    path = write_results("reliability", {"source": str(FIGURES), "figures": figures})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
