"""`python -m bench [NAME ...]`: run the named benchmarks (default: all) one after another."""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = ["specialists", "serving", "ingest", "freshness", "routing", "reliability"]


def main() -> None:
    names = sys.argv[1:] or BENCHMARKS
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        print(f"==> bench.{name}", flush=True)
        sys.argv = [f"bench.{name}"]
        runpy.run_module(f"bench.{name}", run_name="__main__")


if __name__ == "__main__":
    main()
