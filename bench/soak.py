"""Soak: mixed load for minutes, with a promotion and a rollback in the middle; failed requests and memory.

Deploys what `senmon up` deploys for three models (law, japanese and the generalist: tiny random Llamas with the
shared tokenizer, like bench/serving.py) behind the router, with API keys, on a Ray instance of its own. Then
`--clients` clients send back to back for `--minutes`, each its own kind of request: model "auto" and named,
completions and chat, streamed and not. Halfway through, law is promoted to a new version through
`POST /admin/promote` (an in-place swap), and a tenth of the run later rolled back through `POST /admin/rollback`.

Measured:
- every request's status (a stream counts as failed when it ends in an error event or without `[DONE]`): the goal
  is 0 failed;
- every `--sample-s` seconds, the resident memory (RSS) of every senmon process this run started, each with its
  children (router replicas, engine replicas with their vLLM engine processes, the registry, the serving table,
  Serve's proxy and controller): the goal is flat memory, the mean of the last minute within 10% of the mean of
  the first minute after the warm-up (`--warmup-s`), per process and in total.

Usage: python -m bench.soak [--minutes 10] [--clients 4] [--sample-s 5]
Writes bench/results/soak.json (the figures, the swaps, and every memory sample).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx
import ray
import yaml

from bench.common import table, write_results
from senmon.config import DEFAULT_CONFIG, parse_config

REPO = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_KEY = "soak-key", "soak-admin-key"
MAX_LEN = 128
FLAT = 0.10  # the goal: the last minute's memory within 10% of the first minute's after the warm-up

LAW = "This program is free software; you can redistribute it under the terms of the GNU General Public License."
JAPANESE = "吾輩は猫である。名前はまだ無い。どこで生れたかとんと見当がつかぬ。"
CODE = "import os\nfor root, dirs, files in os.walk('.'):\n    print(root)"  # code has no serving version: generalist


def clients(count: int) -> list[tuple[str, str, dict]]:
    """`count` clients, cycling through the kinds of request: (label, path, body)."""
    chat, completions = "/v1/chat/completions", "/v1/completions"

    def messages(text: str) -> list[dict]:
        return [{"role": "user", "content": text}]

    kinds = [("auto chat law", chat, {"model": "auto", "messages": messages(LAW), "max_tokens": 8}),
             ("named completions japanese stream", completions,
              {"model": "japanese", "prompt": JAPANESE, "max_tokens": 8, "stream": True}),
             ("auto completions code->generalist", completions, {"model": "auto", "prompt": CODE, "max_tokens": 8}),
             ("named chat law stream", chat, {"model": "law", "messages": messages(LAW), "max_tokens": 8, "stream": True}),
             ("auto chat japanese stream", chat,
              {"model": "auto", "messages": messages(JAPANESE), "max_tokens": 8, "stream": True}),
             ("named completions generalist", completions, {"model": "generalist", "prompt": LAW, "max_tokens": 8})]
    return [kinds[i % len(kinds)] for i in range(count)]


# --------------------------------------------------------------------------- memory


_REPLICA = re.compile(r"^ServeReplica:(?P<app>[^:]+):(?P<deployment>.+?)(?:\.\w+)?$")  # then ".<method running>"


def kind_of(title: str) -> str | None:
    """The senmon process a Ray worker's title names (None: not one, e.g. an idle worker)."""
    title = title.strip().removeprefix("ray::")  # Ray pads the process title with spaces
    replica = _REPLICA.match(title)
    if replica:
        deployment = replica["deployment"]
        return f"engine {deployment.split(':', 1)[1]}" if deployment.startswith("engine:") else deployment
    for name, kind in (("ProxyActor", "Serve proxy"), ("ServeController", "Serve controller"),
                       ("ModelRegistry", "registry"), ("ServingTable", "serving table")):
        if title.startswith(name):
            return kind
    return None


def sample_memory() -> dict[str, dict]:
    """RSS (MiB) of every senmon process under this driver, each with its children, keyed by kind (a second
    replica of the same kind gets '#2'); with its pid and how many children it has."""
    import psutil

    found: dict[str, dict] = {}
    for process in psutil.Process(os.getpid()).children(recursive=True):
        try:
            title = " ".join(process.cmdline())
            kind = kind_of(title) if title.startswith("ray::") else None
            if kind is None:
                continue
            children = process.children(recursive=True)
            rss = process.memory_info().rss + sum(c.memory_info().rss for c in children if c.is_running())
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        key, n = kind, 1
        while key in found:
            n += 1
            key = f"{kind} #{n}"
        found[key] = {"pid": process.pid, "children": len(children), "rss_mib": round(rss / 2**20, 1)}
    return found


class Sampler:
    """Samples the memory every `every_s` seconds in a thread; `samples` holds (t, {kind: {...}})."""

    def __init__(self, every_s: float, origin: float):
        self.every_s, self.origin, self.samples, self.stop = every_s, origin, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((round(time.monotonic() - self.origin, 1), sample_memory()))
            self.stop.wait(self.every_s)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(60)


def window_mean(samples, kind: str | None, start: float, end: float) -> float | None:
    """Mean RSS (MiB) of `kind` (None: all of them together) over the samples taken in [start, end]."""
    values = [sum(v["rss_mib"] for v in found.values()) if kind is None else found[kind]["rss_mib"]
              for t, found in samples if start <= t <= end and (kind is None or kind in found)]
    return statistics.fmean(values) if values else None


def summarize_memory(samples, first: tuple[float, float], last: tuple[float, float]) -> dict[str, dict]:
    """Per kind of process and in total: the mean RSS over each window, the change, and whether it is flat."""
    kinds = sorted({k for _, found in samples for k in found})
    memory = {}
    for kind in [*kinds, None]:
        before, after = window_mean(samples, kind, *first), window_mean(samples, kind, *last)
        change = (after - before) / before if before and after is not None else None
        pids = sorted({found[kind]["pid"] for _, found in samples if kind in found}) if kind else []
        memory[kind or "total"] = {"first_minute_mib": before, "last_minute_mib": after, "change": change,
                                   "flat": change is not None and abs(change) <= FLAT, "pids": pids}
    return memory


# --------------------------------------------------------------------------- the run


def pct(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else None


def admin(url: str, action: str, body: dict) -> dict:
    started = time.monotonic()
    response = httpx.post(f"{url}/admin/{action}", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                          timeout=600)
    answer = response.json()
    swap = answer.get("swap") or {}
    return {"action": action, "status": response.status_code, "seconds": round(time.monotonic() - started, 2),
            "kind": swap.get("kind"), "swap_s": swap.get("total_s"), "version": (answer.get("record") or {}).get("version"),
            "error": None if response.status_code == 200 else response.text[:500]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (warm-up included)")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="load before the first memory window")
    parser.add_argument("--sample-s", type=float, default=5.0, help="seconds between memory samples")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--storage", default=str(REPO / "var" / "bench-soak"))
    args = parser.parse_args()
    duration = args.minutes * 60
    if duration < args.warmup_s + 120:
        parser.error(f"--minutes {args.minutes}: the run needs the warm-up ({args.warmup_s:.0f} s) and two minutes")

    from senmon.actors.registry import get_or_create_registry
    from senmon.ingest.store import DatasetStore
    from senmon.serve.app import deploy, shutdown
    from senmon.serve.testing import Traffic, tiny_checkpoint, tiny_serving_data
    from senmon.train.job import tokenizer_json
    from senmon.train.routing import train_router

    shutil.rmtree(args.storage, ignore_errors=True)
    root = Path(args.storage)
    data = tiny_serving_data(yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8")), root, MAX_LEN, API_KEY,
                             ADMIN_KEY)
    data["serve"] = dict(data["serve"], app_name="senmon-soak")
    config = parse_config(data, source="bench soak", base_dir=REPO / "configs")
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False)

    store = DatasetStore(config.storage_root)
    store.seed_from_corpus(config.corpus_dir, config.domains)
    train_router(config, store)
    tokenizer = tokenizer_json(config)
    registry = get_or_create_registry(config.storage_root, name=f"soak-registry-{uuid.uuid4().hex[:6]}")
    for seed, model in enumerate(("law", "japanese", "generalist")):
        path = tiny_checkpoint(root / "models" / f"{model}-1", tokenizer, max_len=MAX_LEN, seed=seed)
        ray.get(registry.register.remote(model, "soak-1", path, {"val_ppl": 50.0}, {}, {}))
        ray.get(registry.promote.remote(model, 1, config.training.promotion_margin))
    law_v2 = tiny_checkpoint(root / "models" / "law-2", tokenizer, max_len=MAX_LEN, seed=11)
    new = ray.get(registry.register.remote("law", "soak-2", law_v2, {"val_ppl": 10.0}, {}, {}))

    print("deploying law, japanese and the generalist behind the router", flush=True)
    served = deploy(config, registry)
    specs = clients(args.clients)
    print(f"{args.minutes:g} minutes of load from {len(specs)} clients: " + "; ".join(s[0] for s in specs), flush=True)
    origin = time.monotonic()
    sampler = Sampler(args.sample_s, origin)
    load = Traffic(served.url, specs, API_KEY)
    sampler.start()
    load.start()
    swaps, promote_at, rollback_at = [], duration * 0.5, duration * 0.6
    try:
        while (elapsed := time.monotonic() - origin) < duration:
            if not swaps and elapsed >= promote_at:
                swaps.append({"at_s": round(elapsed, 1), **admin(served.url, "promote",
                                                                  {"specialist": "law", "version": new["version"]})})
                print(f"  {elapsed:5.0f} s promote law v{new['version']}: {swaps[-1]}", flush=True)
            elif len(swaps) == 1 and elapsed >= rollback_at:
                swaps.append({"at_s": round(elapsed, 1), **admin(served.url, "rollback", {"specialist": "law", "version": 1})})
                print(f"  {elapsed:5.0f} s rollback law to v1: {swaps[-1]}", flush=True)
            time.sleep(1.0)
            if int(elapsed) % 60 == 0 and sampler.samples:
                t, found = sampler.samples[-1]
                print(f"  {elapsed:5.0f} s: {len(load.results)} requests, "
                      f"{sum(r[3] != 200 for r in load.results)} failed, "
                      f"RSS {sum(v['rss_mib'] for v in found.values()):,.0f} MiB", flush=True)
    finally:
        load.finish()
        sampler.finish()
    ended = time.monotonic() - origin
    shutdown(config)
    ray.kill(registry)

    results = load.results
    failed = [r for r in results if r[3] != 200]
    by_status: dict[str, int] = {}
    for r in results:
        by_status[str(r[3])] = by_status.get(str(r[3]), 0) + 1
    per_client = {}
    for label, *_ in specs:
        rows = [r for r in results if r[0] == label]
        latencies = [r[2] - r[1] for r in rows]
        per_client[label] = {"requests": len(rows), "failed": sum(r[3] != 200 for r in rows),
                             "p50_s": pct(latencies, 50), "p99_s": pct(latencies, 99)}
    first = (args.warmup_s, args.warmup_s + 60)
    last = (ended - 60, ended)
    samples = sampler.samples
    memory = summarize_memory(samples, first, last)
    flat = all(m["flat"] for m in memory.values())

    print(f"\nSoak: {ended / 60:.1f} minutes, {len(specs)} clients, law promoted at {promote_at:.0f} s and rolled "
          f"back at {rollback_at:.0f} s")
    print(table(["client", "requests", "failed", "p50 s", "p99 s"],
                [[label, c["requests"], c["failed"], f"{c['p50_s']:.3f}", f"{c['p99_s']:.3f}"]
                 for label, c in per_client.items()]))
    print(f"requests {len(results)}, failed {len(failed)} (goal 0), by status {by_status}")
    print(table(["swap", "at s", "status", "kind", "swap s"],
                [[s["action"], s["at_s"], s["status"], s["kind"], s["swap_s"]] for s in swaps]))
    print(f"\nResident memory (RSS with children, MiB), first minute after the {args.warmup_s:.0f} s warm-up "
          f"vs the last minute; goal: within {FLAT:.0%}")
    print(table(["process", "pids", "first minute", "last minute", "change", "flat"],
                [[kind, ",".join(map(str, m["pids"])) or "-", f"{m['first_minute_mib']:,.0f}" if m["first_minute_mib"] else "-",
                  f"{m['last_minute_mib']:,.0f}" if m["last_minute_mib"] else "-",
                  f"{m['change']:+.1%}" if m["change"] is not None else "-", "yes" if m["flat"] else "NO"]
                 for kind, m in memory.items()]))
    path = write_results("soak", {
        "minutes": round(ended / 60, 2), "clients": [s[0] for s in specs], "max_tokens": 8,
        "requests": len(results), "failed": len(failed), "by_status": by_status, "per_client": per_client,
        "failures": [{"label": r[0], "at_s": round(r[1] - origin, 1), "status": str(r[3])} for r in failed[:50]],
        "swaps": swaps, "memory": memory, "memory_flat": flat, "flat_within": FLAT,
        "windows_s": {"first": first, "last": [round(x, 1) for x in last]}, "sample_s": args.sample_s,
        "load_average_1m": os.getloadavg()[0], "deploy_timings": served.timings, "samples": samples})
    print(f"\nresults: {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
