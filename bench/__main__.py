"""`python -m bench [NAME ...]`: run the named benchmarks (default: all) one after another.

Options after the names go to each of them: `python -m bench soak --minutes 3`.
"""

from __future__ import annotations

import runpy
import sys

BENCHMARKS = ["specialists", "other_sources", "serving", "ingest", "freshness", "retrain_paths", "routing", "fallback",
              "routing_features", "routing_policies", "soak", "reliability", "idle"]


def main() -> None:
    args = sys.argv[1:]
    first_option = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    names, options = args[:first_option] or BENCHMARKS, args[first_option:]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in names:
        print(f"==> bench.{name}", flush=True)
        sys.argv = [f"bench.{name}", *options]
        runpy.run_module(f"bench.{name}", run_name="__main__")


if __name__ == "__main__":
    main()
