"""Reliability figures, gathered: what the fault tests measured, in one file.

The fault tests (tests/test_faults.py, tests/test_serve.py's schemathesis run) each write their figures to
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


def main() -> None:
    files = sorted(FIGURES.glob("*.json"))
    if not files:
        sys.exit(f"no figures under {FIGURES}: run the fault tests first (pytest tests/test_faults.py)")
    figures = {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in files}
    rows = []
    for name, figure in figures.items():
        shown = {k: v for k, v in figure.items() if k not in SKIP and not isinstance(v, (list, dict))}
        rows.append([name, figure.get("measured_at", "-"), ", ".join(f"{k} {v}" for k, v in shown.items()
                                                                    if k != "measured_at")])
    print(table(["test", "measured", "figures"], rows))
    path = write_results("reliability", {"source": str(FIGURES), "figures": figures})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
