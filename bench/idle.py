"""What a running senmon costs when nobody asks it anything: CPU per process group, beside the machine's own.

`python -m bench idle --models var/demo` copies that storage root (a `make demo` leaves one in var/demo), runs
`senmon up` on the copy with the embedded config (every model's serving version on its own vLLM engine, the
router, ingest and the scheduler; every schedule set 10 years out and a billion documents, so no retrain falls
due: the demo's 6 h / 1 d schedules would start one at once), waits until it is up and has settled, then reads the CPU time of every
process on the machine over a window, and the same for a window with nothing of senmon's running, in one run.
Writes `bench/results/idle.json` and prints the table (percent of one core; this machine has two).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from bench.common import table, write_results

REPO = Path(__file__).resolve().parents[1]
# a process's group, by its command line (Ray names its workers ray::<Class>, vLLM its engine core VLLM::EngineCore)
GROUPS = [
    (r"^ray::ServeReplica:[^ ]*:engine:", "vLLM engines: their Serve replicas"),
    (r"^VLLM::EngineCore", "vLLM engines: their engine cores"),
    (r"^ray::ServeReplica:[^ ]*:router", "the router replica"),
    (r"^ray::ServeController", "Serve's controller"),
    (r"^ray::ProxyActor", "Serve's HTTP proxy"),
    (r"^ray::ServingTable", "the serving table (senmon)"),
    (r"^ray::(IngestWorker|IngestSupervisor)", "ingest actors (senmon)"),
    (r"^ray::(Scheduler|ModelRegistry)", "scheduler and registry (senmon)"),
    (r"^ray::IDLE", "Ray's idle workers"),
    (r"gcs_server|raylet|log_monitor|dashboard|monitor\.py|ray::(DashboardAgent|RuntimeEnvAgent|TelemetryAgent)",
     "Ray's own processes"),
    (r"senmon(\.cli)? .*\bup\b", "the `senmon up` driver"),
    (r"tansu|calfkit", "the embedded broker"),
]


def group_of(command: str) -> str:
    for pattern, name in GROUPS:
        if re.search(pattern, command):
            return name
    return "everything else"


def cpu_by_group(window_s: float) -> tuple[dict[str, float], dict[str, int], float, list[tuple[float, str]]]:
    """Percent of one core each group used over `window_s`, how many processes each had, the window, and the
    busiest processes (percent, command line)."""
    import psutil

    def snapshot() -> dict[int, tuple[float, str]]:
        seen = {}
        for proc in psutil.process_iter(["cmdline", "name"]):
            if proc.pid == os.getpid():
                continue
            try:
                times = proc.cpu_times()
                seen[proc.pid] = (times.user + times.system, " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"]))
            except psutil.Error:
                continue
        return seen

    before, started = snapshot(), time.monotonic()
    time.sleep(window_s)
    after, elapsed = snapshot(), time.monotonic() - started
    used, count, busiest = collections.Counter(), collections.Counter(), []
    for pid, (cpu, command) in after.items():
        if pid in before:  # a process born in the window is left out rather than charged its whole start
            used[group_of(command)] += cpu - before[pid][0]
            count[group_of(command)] += 1
            busiest.append((round(100 * (cpu - before[pid][0]) / elapsed, 1), command[:160]))
    busiest = sorted(busiest, reverse=True)[:15]
    return {g: round(100 * s / elapsed, 1) for g, s in used.items()}, dict(count), elapsed, busiest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=str(REPO / "var" / "demo"), help="a storage root with serving versions")
    parser.add_argument("--config", default=str(REPO / "configs" / "embedded.yaml"))
    parser.add_argument("--window", type=float, default=60.0, help="seconds measured in each state")
    parser.add_argument("--settle", type=float, default=120.0, help="seconds waited after senmon is up")
    args = parser.parse_args()
    if not (Path(args.models) / "registry").is_dir():
        sys.exit(f"{args.models} holds no registry: run `make demo` first, or pass --models STORAGE_ROOT")

    baseline, baseline_count, _, _ = cpu_by_group(args.window)  # nothing of senmon's running yet
    work = Path(tempfile.mkdtemp(prefix="senmon-bench-idle-"))
    shutil.copytree(args.models, work / "storage")  # `senmon up` may merge, retrain or write: never on the original
    data = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    data.update(storage_root=str(work / "storage"), corpus_dir=str(REPO / "data" / "corpus"),
                routing_dir=str(REPO / "data" / "routing"))
    for spec in data["specialists"]:  # the scheduler runs, but nothing falls due: idle
        spec["schedule"] = {"interval": "3650d", "min_new_documents": 10**9}
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    senmon = [sys.executable, "-m", "senmon.cli", "--config", str(config)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    log = (work / "up.log").open("w")
    up = subprocess.Popen([*senmon, "up"], stdout=log, stderr=subprocess.STDOUT, env=env, text=True)
    started = time.monotonic()
    try:
        while "==> senmon is up" not in (work / "up.log").read_text(errors="replace"):
            if up.poll() is not None or time.monotonic() - started > 1200:
                sys.exit(f"senmon up did not come up; its log: {work / 'up.log'}")
            time.sleep(2)
        up_s = time.monotonic() - started
        time.sleep(args.settle)
        running, running_count, elapsed, busiest = cpu_by_group(args.window)
    finally:
        subprocess.run([*senmon, "down"], env=env, timeout=300)
        up.wait(timeout=60)
        log.close()

    groups = sorted(set(running) | set(baseline), key=lambda g: -running.get(g, 0.0))
    rows = [[g, running_count.get(g, 0), f"{running.get(g, 0.0):.1f}", f"{baseline.get(g, 0.0):.1f}"] for g in groups]
    total, base_total = sum(running.values()), sum(baseline.values())
    rows.append(["all processes", sum(running_count.values()), f"{total:.1f}", f"{base_total:.1f}"])
    print(f"senmon up on a copy of {args.models}: up after {up_s:.0f} s, then {args.settle:.0f} s to settle; "
          f"{elapsed:.0f} s measured in each state (percent of one core; {os.cpu_count()} cores)")
    print(table(["process group", "processes", "senmon up, idle", "before senmon"], rows))
    path = write_results("idle", {
        "models": args.models, "config": args.config, "window_s": round(elapsed, 1), "settle_s": args.settle,
        "up_s": round(up_s, 1), "percent_of_one_core": {"senmon_idle": running, "before": baseline},
        "processes": {"senmon_idle": running_count, "before": baseline_count},
        "total_percent_of_one_core": {"senmon_idle": round(total, 1), "before": round(base_total, 1)},
        "share_of_machine": round(total / (100 * (os.cpu_count() or 1)), 3),
        "busiest_processes": [{"percent_of_one_core": p, "command": c} for p, c in busiest]})
    print(f"results: {path}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
