"""Freshness at the demo's sizes: seconds from the first new document produced to Kafka until the
retrained specialist answers, split across ingest, training, evaluation, register + gate and swap.

It runs the main job (`senmon.demo.run`, the embedded config, all five specialists and the
generalist served) in its own fresh storage root, so it takes as long as `make demo`. The table
puts each phase beside the total (its share), from the one run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.common import table, write_results
from senmon import demo
from senmon.config import load_config

PHASES = ["ingest_s", "training_s", "evaluation_s", "register_gate_s", "swap_s", "observed_s"]


def main() -> None:
    config = load_config(None)
    root = Path(config.storage_root).parent / "bench-freshness"
    shutil.rmtree(root, ignore_errors=True)
    report = demo.run(config.model_copy(update={"storage_root": str(root)}))
    parts = report["freshness"]
    rows = [[phase[:-2].replace("_", " + "), f"{parts[phase]:.1f}", f"{parts[phase] / parts['total_s']:.2f}"]
            for phase in PHASES]
    rows.append(["total", f"{parts['total_s']:.1f}", "1.00"])
    print(table(["phase", "seconds", "share of total"], rows))
    keep = ("stream_domain", "streamed", "version_before", "version_after", "test_ppl_before", "test_ppl_after",
            "background_requests", "background_failed", "swapped_requests", "swapped_failed", "startup_s", "total_s",
            "run", "ingest")
    path = write_results("freshness", {"freshness": parts, **{k: report.get(k) for k in keep}})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
