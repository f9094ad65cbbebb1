"""Serving, measured: router overhead, routing accuracy and latency, and a live swap under load.

(1) Overhead: the same engine (one specialist application, a random-init Llama with the shared
    tokenizer) driven at the same concurrency with the same prompts, once through the router over
    HTTP (OpenAI JSON, API key, routing by name and by content) and once directly through the
    engine's Serve handle (no HTTP, no router; first and again last, because one run of it varies by more than
    the gap measured), and once through a bare Serve HTTP ingress that only forwards (the floor of any HTTP front
    door on Serve; `deploy_bare_ingress`). Tokens/s, p50/p99 latency, the ratio to direct (the goal's measure,
    against the mean of the two direct runs) and to bare, and CPU milliseconds per request of each process on the path.
(2) Routing: the routing model trained on the full corpus; accuracy per domain on the test split
    (whole documents and 100-character snippets), on hand-written prompts it never saw
    (Japanese included), and its latency per prompt.
(3) Swaps under load, side by side in one run: concurrent clients on the specialist while it is
    promoted in place (weights reloaded in the running engine, verified), rolled back in place,
    and promoted blue/green (a new engine started beside the old, the cold-start path); for each,
    the swap's duration, requests sent and failed, and p50/p99 latency before / during / after.
Usage: python -m bench.serving [--concurrency 1,8,32] [--only overhead[,routing,swaps]] [--label NAME]
       (or python -m bench serving --only overhead)
       --label NAME writes bench/results/serving_NAME.json (dashes as underscores) instead of serving.json, for a run
       under other settings, e.g. Ray Serve's throughput-optimised mode:
       RAY_SERVE_THROUGHPUT_OPTIMIZED=1 python -m bench serving --only overhead --label throughput-mode
       (set it before the bench starts: its own local Ray passes the driver's environment to every Ray process). With
       Serve's direct ingress on (that mode's default), each ingress replica serves HTTP on a port of its own and the
       HTTP paths are driven there, not through Serve's proxy (`--http-via proxy` keeps the proxy). Ray's HAProxy
       ingress, which serves the configured port itself (docs/serving.md has both measured):
       RAY_SERVE_ENABLE_HA_PROXY=1 python -m bench serving --only overhead --label haproxy --http-via proxy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import statistics
import threading
import time
import uuid
from pathlib import Path

import httpx
import ray
import yaml

from bench.common import RESULTS, table, write_results
from senmon.config import DEFAULT_CONFIG, parse_config

REPO = Path(__file__).resolve().parents[1]
API_KEY = "bench-key"
DIRECT = "engine handle (direct)"
DIRECT_AGAIN = "engine handle (direct), again"
MAX_TOKENS = 64

# Prompts written for this benchmark, not taken from the corpus: the router has never seen them.
UNSEEN = {
    "law": ["Can I sell a product that includes code under the GPL without publishing my changes?",
            "THE SOFTWARE IS PROVIDED AS IS, WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.",
            "Does the Apache License grant a patent licence to users of the work?",
            "Redistributions of source code must retain the above copyright notice.",
            "What obligations does a licensee have when distributing modified copies?"],
    "code": ["How do I sort a list of dictionaries by a key in Python?",
             "def parse(path):\n    with open(path) as f:\n        return json.load(f)",
             "What does the asyncio.gather function return when one task raises?",
             "Explain the difference between a tuple and a list, with examples of slicing.",
             "import os\nfor root, dirs, files in os.walk('.'):\n    print(root)"],
    "dictionary": ["Quixotic (adj.): exceedingly idealistic; unrealistic and impractical.",
                   "What is the etymology of the word 'salary'?",
                   "Define 'ephemeral' and give its part of speech.",
                   "Lugubrious, a. Mournful; very sad or gloomy, especially in an exaggerated way.",
                   "Ostentation, n. A pretentious display meant to attract notice."],
    "literature": ["A man walks into a bar and asks the bartender for a glass of moonlight.",
                   "Never trust a cat that quotes Shakespeare before breakfast.",
                   "The rain fell softly on the old harbour, and the poet wrote of ships that never came home.",
                   "Knock knock. Who's there? Interrupting cow.",
                   "He who laughs last has probably not understood the joke."],
    "japanese": ["日本の首都はどこですか？", "今日はとても良い天気ですね。散歩に行きましょう。",
                 "この文章を英語に翻訳してください。", "吾輩は猫である。名前はまだ無い。",
                 "東京から大阪まで新幹線で何時間かかりますか？"],
}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


# --------------------------------------------------------------------------- (1) overhead


def _processes(app: str, engine_app: str) -> dict[int, str]:
    """pid -> part, for the processes a request can pass through on this host (Linux /proc; empty elsewhere):
    Serve's HTTP proxy, the router replica, the bare ingress, the engine (its replica and vLLM's engine core and
    worker processes under it), this driver, and the rest of Ray (controller, GCS, raylet, agents, log monitor)."""
    def read(pid: str, name: str) -> str:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")

    parents, commands = {}, {}
    try:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                commands[pid] = read(pid, "cmdline")
                parents[pid] = read(pid, "stat").rsplit(")", 1)[1].split()[1]
            except (OSError, IndexError):
                continue
    except OSError:
        return {}
    me = str(os.getpid())

    def ours(pid: str) -> bool:  # started by this driver's Ray instance (the driver starts GCS and the raylet)
        for _ in range(6):
            pid = parents.get(pid)
            if pid is None or pid == "0":
                return False
            if pid == me:
                return True
        return False

    parts = {}
    for pid, command in commands.items():
        if pid != me and not ours(pid):
            continue  # another engineer's Ray or engines on a shared host
        part = None
        if command.startswith("ray::ProxyActor"):
            part = "proxy"
        elif command.startswith(f"ray::ServeReplica:{app}:router"):
            part = "router"
        elif command.startswith(f"ray::ServeReplica:{app}-bare:"):
            part = "bare ingress"
        elif command.startswith(f"ray::ServeReplica:{engine_app}:"):
            part = "engine"
        elif pid == me:
            part = "driver (client)"
        elif command.startswith("VLLM::"):  # the engine core is the replica's child, its worker the core's child
            ancestors = [parents.get(pid), parents.get(parents.get(pid, ""), "")]
            part = "engine" if any(commands.get(a or "", "").startswith(f"ray::ServeReplica:{engine_app}:")
                                   for a in ancestors) else "rest of Ray"
        elif command.startswith("ray::") or "/ray/" in command:
            part = "rest of Ray"
        if part:
            parts[int(pid)] = part
    return parts


def _cpu_seconds(pids) -> dict[int, float]:
    tick, seconds = os.sysconf("SC_CLK_TCK"), {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            seconds[pid] = (int(fields[11]) + int(fields[12])) / tick  # utime + stime, all threads
        except (OSError, IndexError, ValueError):
            pass
    return seconds


class CpuMeter:
    """CPU milliseconds per request spent by each part of the path (and in all) while a path is driven: where the
    router path's extra cost lands. On a shared host other work shows up only in `host_busy_ms`."""

    def __init__(self, app: str, engine_app: str):
        self.parts = _processes(app, engine_app)

    @staticmethod
    def _host() -> float:
        try:
            with open("/proc/stat") as f:
                values = [int(v) for v in f.readline().split()[1:]]
            return (sum(values) - values[3] - values[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return float("nan")

    def start(self) -> None:
        self.before, self.host_before = _cpu_seconds(self.parts), self._host()

    def stop(self, requests: int) -> dict[str, float]:
        after, per_part = _cpu_seconds(self.parts), {}
        for pid, part in self.parts.items():
            if pid in after and pid in self.before:
                per_part[part] = per_part.get(part, 0.0) + after[pid] - self.before[pid]
        result = {part: round(1000 * value / max(requests, 1), 2) for part, value in sorted(per_part.items())}
        result["host_busy_ms"] = round(1000 * (self._host() - self.host_before) / max(requests, 1), 2)
        return result


async def drive(call, prompts: list[str], concurrency: int) -> dict:
    """Run `call(prompt) -> completion tokens` over prompts with `concurrency` workers."""
    queue = list(prompts)
    latencies, tokens, failures = [], 0, 0

    async def worker():
        nonlocal tokens, failures
        while queue:
            prompt = queue.pop()
            started = time.perf_counter()
            try:
                produced = await call(prompt)  # not `tokens += await ...`: that reads `tokens` before awaiting
                tokens += produced
                latencies.append(time.perf_counter() - started)
            except Exception:
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - started
    return {"requests": len(prompts), "failed": failures, "tokens": tokens, "wall_s": wall,
            "tokens_per_s": tokens / wall, "p50_ms": pct(latencies, 50) * 1000, "p99_ms": pct(latencies, 99) * 1000}


BARE = "engine, HTTP, bare ingress"
BARE_ROUTE = "/bare"


def deploy_bare_ingress(name: str, model: str, engine_app: str) -> None:
    """A second baseline: the same engine behind the least a Serve HTTP ingress can do (Serve's HTTP proxy and one
    replica that parses the body into vLLM's request, calls the engine's handle and answers its JSON; no FastAPI,
    keys, checks, routing, metrics or `senmon` field), at `BARE_ROUTE`. Against the router it isolates what
    senmon's router itself costs; against the direct handle, what any HTTP front door on Serve costs here."""
    from ray import serve

    @serve.deployment(name="bare", max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
    class Bare:
        def __init__(self):
            from senmon.serve.specialist import ENGINE_PREFIX

            self.engine = serve.get_deployment_handle(ENGINE_PREFIX + model, engine_app).options(stream=True)

        async def __call__(self, request):  # Serve hands a plain (non-FastAPI) deployment starlette's Request
            from ray.serve.llm.openai_api_models import CompletionRequest
            from starlette.responses import JSONResponse

            body = CompletionRequest.model_validate(json.loads(await request.body()))
            async for item in self.engine.completions.remote(body):
                return JSONResponse(item.model_dump(mode="json"))

    serve.run(Bare.bind(), name=name, route_prefix=BARE_ROUTE)


def serve_mode() -> dict:
    """The Serve settings this driver's Ray runs with (the driver's environment, which its local Ray passes on)."""
    from ray.serve._private import constants as c

    return {"haproxy": c.RAY_SERVE_ENABLE_HA_PROXY, "RAY_SERVE_THROUGHPUT_OPTIMIZED": c.RAY_SERVE_THROUGHPUT_OPTIMIZED,
            "direct_ingress": c.RAY_SERVE_ENABLE_DIRECT_INGRESS, "grpc_between_deployments": c.RAY_SERVE_USE_GRPC_BY_DEFAULT,
            "user_code_in_separate_thread": c.RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD,
            "router_in_separate_loop": c.RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP,
            "freeze_gc_on_startup": c.RAY_SERVE_FREEZE_GC_ON_STARTUP,
            "request_path_log_buffer_size": c.RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE}


def replica_url(app_name: str, proxy_url: str, timeout_s: float = 60) -> str:
    """With Serve's direct ingress: `http://127.0.0.1:PORT/prefix` of the app's ingress replica's own HTTP server
    (one replica here), from the controller's target groups; `proxy_url` when Serve reports only its proxy."""
    from ray.serve._private.common import RequestProtocol
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    prefix = client.get_serve_details()["applications"][app_name]["route_prefix"] or ""
    proxy_port = int(proxy_url.rsplit(":", 1)[1].split("/")[0])
    deadline = time.monotonic() + timeout_s
    while True:
        groups = ray.get(client._controller.get_target_groups.remote(app_name))
        ports = [t.port for g in groups if g.protocol == RequestProtocol.HTTP for t in g.targets]
        ports = [p for p in ports if p != proxy_port]
        if ports or time.monotonic() > deadline:
            break
        time.sleep(1)
    if not ports:
        return proxy_url.rstrip("/") + prefix.rstrip("/")
    return f"http://127.0.0.1:{ports[0]}{prefix.rstrip('/')}"


def front_door_check(urls: dict[str, str], model: str) -> dict:
    """The router's answers through each front door (e.g. Serve's proxy and the replica's own port): status codes
    with and without a key and for an unknown model, the response's header names and whether the `senmon` field
    is there. Whether the router works unchanged behind a different ingress."""
    body = {"model": model, "prompt": "The licence", "max_tokens": 4, "temperature": 0}
    checks = {}
    with httpx.Client(timeout=120) as http:
        for door, url in urls.items():
            key = {"Authorization": f"Bearer {API_KEY}"}
            ok = http.post(url + "/v1/completions", json=body, headers=key)
            no_key = http.post(url + "/v1/completions", json=body)
            bad_key = http.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
            unknown = http.post(url + "/v1/completions", json=dict(body, model="no-such-model"), headers=key)
            health = http.get(url + "/health")
            checks[door] = {"url": url, "ok_status": ok.status_code, "senmon_field": "senmon" in ok.json(),
                            "headers": sorted(k for k in ok.headers.keys() if k not in ("date", "content-length")),
                            "no_key_status": no_key.status_code, "bad_key_status": bad_key.status_code,
                            "unknown_model_status": unknown.status_code, "unknown_model_body": unknown.json(),
                            "health_status": health.status_code}
    return checks


def overhead(url: str, model: str, app: str, prompts: list[str], auto_prompts: list[str],
             levels: list[int], bare: bool = True, router_app: str = "senmon-bench", bare_url: str | None = None) -> list[dict]:
    """Tokens/s per path and concurrency. `bare`: also the engine behind a bare Serve HTTP ingress (the second
    baseline; see `deploy_bare_ingress`, which must have been deployed), at `bare_url` (default: `url` + its
    route prefix, through Serve's proxy)."""
    from ray import serve
    from ray.serve.llm.openai_api_models import CompletionRequest

    from senmon.serve.specialist import ENGINE_PREFIX

    engine = serve.get_deployment_handle(ENGINE_PREFIX + model, app).options(stream=True)
    # Ray's driver logging puts httpx at INFO: one formatted log line per request, which only the HTTP paths paid
    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def direct(prompt: str) -> int:
        request = CompletionRequest(model=model, prompt=prompt, max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0)
        async for item in engine.completions.remote(request):
            return item.usage.completion_tokens

    async def run_all() -> list[dict]:
        rows = []
        async with httpx.AsyncClient(timeout=300, headers={"Authorization": f"Bearer {API_KEY}"},
                                     limits=httpx.Limits(max_connections=256)) as http:
            def via_router(name: str, prefix: str = url):
                async def call(prompt: str) -> int:
                    r = await http.post(prefix + "/v1/completions", json={
                        "model": name, "prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0})
                    r.raise_for_status()
                    return r.json()["usage"]["completion_tokens"]
                return call

            await drive(direct, prompts[:8], 4)  # warm both paths
            await drive(via_router(model), prompts[:8], 4)
            if bare:
                await drive(via_router(model, bare_url or url + BARE_ROUTE), prompts[:8], 4)
            for level in levels:
                count = max(4 * level, 32)
                batch = (prompts * (count // len(prompts) + 1))[:count]
                auto_batch = (auto_prompts * (count // len(auto_prompts) + 1))[:count]
                # the direct path first and again last: one direct run's spread between rounds was larger than the
                # gap the goal measures (28 Nov: 3,113-4,560 tokens/s), so the ratio is against the mean of the two
                paths = [(DIRECT, direct, batch)]
                if bare:
                    paths.append((BARE, via_router(model, bare_url or url + BARE_ROUTE), batch))
                paths += [("router, HTTP, named", via_router(model), batch),
                          ("router, HTTP, auto", via_router("auto"), auto_batch), (DIRECT_AGAIN, direct, batch)]
                level_rows = []
                for path, call, texts in paths:
                    meter = CpuMeter(router_app, app)
                    meter.start()
                    result = await drive(call, texts, level)
                    result["cpu_ms_per_request"] = meter.stop(len(texts))
                    level_rows.append({"path": path, "concurrency": level, "load_average_1m": os.getloadavg()[0],
                                       **result})
                directs = [r["tokens_per_s"] for r in level_rows if r["path"] in (DIRECT, DIRECT_AGAIN)]
                bare_tps = next((r["tokens_per_s"] for r in level_rows if r["path"] == BARE), None)
                for row in level_rows:
                    row["ratio_vs_direct"] = row["tokens_per_s"] / statistics.mean(directs)
                    row["direct_runs_tokens_per_s"] = directs
                    if bare_tps and row["path"] not in (DIRECT, DIRECT_AGAIN, BARE):
                        row["ratio_vs_bare"] = row["tokens_per_s"] / bare_tps
                    versus_bare = f", {row['ratio_vs_bare']:.2f}x bare" if "ratio_vs_bare" in row else ""
                    print(f"  {row['path']:27s} c={level:3d}: {row['tokens_per_s']:8.0f} tok/s "
                          f"({row['ratio_vs_direct']:.2f}x direct{versus_bare}), p50 {row['p50_ms']:.0f} ms, "
                          f"p99 {row['p99_ms']:.0f} ms, failed {row['failed']}", flush=True)
                print(f"  direct, first and last run c={level}: {directs[0]:,.0f} and {directs[1]:,.0f} tok/s; "
                      "ratios are against their mean", flush=True)
                rows += level_rows
        return rows

    return asyncio.run(run_all())


# --------------------------------------------------------------------------- (2) routing


def routing(config, store) -> dict:
    from senmon.train.routing import train_router

    started = time.monotonic()
    model = train_router(config, store)
    train_s = time.monotonic() - started
    test = {s.name: [t for d in s.domains for t in store.texts(d, "test")] for s in config.specialists}
    per_domain = {name: {"documents": len(docs)} for name, docs in test.items()}
    for name, value in model.accuracy(test).items():
        per_domain[name]["test_documents"] = value
    for name, value in model.accuracy(test, snippet_chars=100).items():
        per_domain[name]["test_snippets_100"] = value
    unseen_rows = []
    for name, prompts in UNSEEN.items():
        routed = model.route(prompts)
        per_domain[name]["unseen_prompts"] = sum(r.specialist == name for r in routed) / len(prompts)
        unseen_rows += [{"domain": name, "prompt": p, "routed": r.specialist, "confidence": r.confidence}
                        for p, r in zip(prompts, routed)]
    single = [p for prompts in UNSEEN.values() for p in prompts] * 40
    latencies = []
    for prompt in single:
        t = time.perf_counter()
        model.route([prompt])
        latencies.append((time.perf_counter() - t) * 1000)
    return {"train_s": train_s, "per_domain": per_domain, "unseen": unseen_rows,
            "latency_ms": {"p50": pct(latencies, 50), "p99": pct(latencies, 99), "samples": len(latencies)}}


# --------------------------------------------------------------------------- (3) swap under load


def swap_under_load(url: str, config, model: str, record: dict, clients: int, quiet_s: float = 10) -> dict:
    from senmon.serve.swap import swap

    results: list[tuple[float, float, int]] = []
    stop = threading.Event()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # as in `overhead`: no log line per request in the driver

    def load(prompt: str) -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = http.post(url + "/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": 16})
                    results.append((sent, time.monotonic() - sent, r.status_code))
                except httpx.HTTPError:
                    results.append((sent, time.monotonic() - sent, 0))

    threads = [threading.Thread(target=load, args=(f"The licence {i}",)) for i in range(clients)]
    for thread in threads:
        thread.start()
    time.sleep(quiet_s)
    started = time.monotonic()
    timings = swap(config, model, record)
    ended = time.monotonic()
    time.sleep(quiet_s)
    stop.set()
    for thread in threads:
        thread.join()

    def phase(rows):
        lat = [r[1] * 1000 for r in rows]
        return {"requests": len(rows), "failed": sum(r[2] != 200 for r in rows), "p50_ms": pct(lat, 50),
                "p99_ms": pct(lat, 99)}

    return {"clients": clients, "swap": timings, "before": phase([r for r in results if r[0] < started]),
            "during": phase([r for r in results if started <= r[0] <= ended]),
            "after": phase([r for r in results if r[0] > ended]), "total": phase(results)}


# --------------------------------------------------------------------------- main

SECTIONS = ["overhead", "routing", "swaps"]
# the results keys each section writes; a run of some sections keeps the others' last results
SECTION_KEYS = {"overhead": ("model", "max_tokens", "overhead", "load_average_1m", "auto_prompts_routed_to_law",
                             "serve_mode"),
                "routing": ("routing",), "swaps": ("swaps",)}


def merge_previous(results: dict, sections: list[str], name: str = "serving") -> dict:
    """This run's results, plus the last results file's keys of the sections not run now (each with its date)."""
    previous_path = RESULTS / f"{name}.json"
    if set(sections) == set(SECTIONS) or not previous_path.exists():
        return results
    previous = json.loads(previous_path.read_text(encoding="utf-8"))
    merged, kept = dict(results), dict(previous.get("section_dates") or {})
    for section in SECTIONS:
        if section in sections:
            kept[section] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            continue
        kept.setdefault(section, previous.get("when"))
        for key in SECTION_KEYS[section]:
            if key in previous and key not in merged:
                merged[key] = previous[key]
    if "deploy_timings" not in merged and "deploy_timings" in previous:
        merged["deploy_timings"] = previous["deploy_timings"]
    merged["section_dates"] = kept  # when each section's results were measured
    return merged


def overhead_table(over: list[dict]) -> str:
    rows = [[r["path"], r["concurrency"], f"{r['tokens_per_s']:,.0f}", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
             f"{r['ratio_vs_direct']:.2f}" if "ratio_vs_direct" in r else "-",
             f"{r['ratio_vs_bare']:.2f}" if "ratio_vs_bare" in r else "-", r["failed"]] for r in over]
    lines = [table(["path", "concurrency", "tokens/s", "p50 ms", "p99 ms",
                    "ratio vs direct (the goal; the mean of both direct runs)", "ratio vs bare", "failed"], rows)]
    parts = ["engine", "proxy", "router", "bare ingress", "driver (client)", "rest of Ray", "host_busy_ms"]
    cpu_rows = [[r["path"], r["concurrency"], *[f"{r['cpu_ms_per_request'].get(p, 0.0):.1f}" for p in parts]]
                for r in over if r.get("cpu_ms_per_request")]
    if cpu_rows:
        lines += ["", "CPU ms per request, by process (an idle process's background work included)",
                  table(["path", "concurrency", *parts[:-1], "whole host"], cpu_rows)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=str(REPO / "var" / "bench-serving"))
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size of the served model")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to run: overhead, routing, swaps (default: all); results of "
                             "sections not run are kept from the last results file")
    parser.add_argument("--label", default=None,
                        help="name of this run's settings (e.g. throughput-mode): results go to "
                             "bench/results/serving_LABEL.json instead of serving.json")
    parser.add_argument("--http-via", choices=["auto", "proxy", "replica"], default="auto",
                        help="where the HTTP paths send requests: Serve's proxy (the configured port), or the ingress "
                             "replica's own port (direct ingress only); auto: the replica's when direct ingress is on")
    args = parser.parse_args()
    results_name = "serving" if not args.label else "serving_" + args.label.replace("-", "_")
    levels = [int(x) for x in args.concurrency.split(",")]
    sections = SECTIONS if args.only is None else [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown or not sections:
        parser.error(f"--only: choose from {', '.join(SECTIONS)} (got {args.only!r})")

    from ray import serve

    from senmon.actors.registry import get_or_create_registry
    from senmon.ingest.store import DatasetStore
    from senmon.serve.app import deploy, shutdown
    from senmon.serve.testing import tiny_checkpoint
    from senmon.train.job import tokenizer_json

    shutil.rmtree(args.storage, ignore_errors=True)
    data = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    data.update(storage_root=args.storage, corpus_dir=str(REPO / "data" / "corpus"))
    data["http"] = {"host": "127.0.0.1", "port": args.port, "api_keys": [API_KEY], "api_keys_env": None,
                    "admin_keys_env": None}
    data["serve"] = dict(data["serve"], app_name="senmon-bench", confidence_threshold=0.0)
    for spec in data["specialists"]:
        spec["serving"] = {"max_model_len": 256}
    config = parse_config(data, source="bench", base_dir=REPO / "configs")
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    store = DatasetStore(config.storage_root)
    store.seed_from_corpus(config.corpus_dir, config.domains)

    results: dict = {}
    if "routing" in sections:
        print("(2) routing model on the full corpus", flush=True)
        results["routing"] = routing(config, store)

    tokenizer = tokenizer_json(config)
    registry = get_or_create_registry(config.storage_root, name=f"bench-registry-{uuid.uuid4().hex[:6]}")
    for seed, ppl in ((1, 50.0), (2, 40.0), (3, 30.0)):
        path = tiny_checkpoint(Path(args.storage) / f"law-{seed}", tokenizer, hidden_size=args.hidden, layers=2,
                               max_len=256, seed=seed)
        ray.get(registry.register.remote("law", f"bench-{seed}", path, {"val_ppl": ppl}, {}, {}))
    ray.get(registry.promote.remote("law", 1, 0.01))
    shape = {"hidden_size": args.hidden, "num_hidden_layers": 2, "vocab_size": config.training.vocab_size}

    if "overhead" in sections or "swaps" in sections:
        print("deploying law v1 behind the router", flush=True)
        served = deploy(config, registry)
        results["deploy_timings"] = served.timings
    if "overhead" in sections:
        law_prompts = [t[:200] for t in store.texts("law", "test")][:32]
        # only law is deployed here: "auto" is driven with the law prompts the router sends to law
        from senmon.train.routing import load_router

        router_model = load_router(config.storage_root)
        auto_prompts = [p for p, r in zip(law_prompts, router_model.route(law_prompts)) if r.specialist == "law"]
        load_before = os.getloadavg()
        print(f"(1) overhead (load average {load_before[0]:.1f})", flush=True)
        deploy_bare_ingress(config.serve.app_name + "-bare", "law", "senmon-bench-law-v1")
        mode = serve_mode()
        router_url, bare_url = served.url, served.url + BARE_ROUTE
        if args.http_via == "replica" or (args.http_via == "auto" and mode["direct_ingress"]):
            router_url = replica_url(config.serve.app_name, served.url)
            bare_url = replica_url(config.serve.app_name + "-bare", served.url)
        mode.update(label=args.label, http_via=args.http_via, router_url=router_url, bare_url=bare_url,
                    proxy_url=served.url)
        print(f"serve mode: {mode}", flush=True)
        doors = {"proxy": served.url}
        if router_url != served.url:
            doors["replica"] = router_url
        try:
            mode["front_door_check"] = front_door_check(doors, "law")
        except Exception as error:  # noqa: BLE001 - a failed check is a result, the section goes on
            mode["front_door_check"] = {"error": repr(error)}
        print(f"front door check: {json.dumps(mode['front_door_check'], ensure_ascii=False)}", flush=True)
        over = overhead(router_url, "law", "senmon-bench-law-v1", law_prompts, auto_prompts, levels,
                        router_app=config.serve.app_name, bare_url=bare_url)
        serve.delete(config.serve.app_name + "-bare")
        load_after = os.getloadavg()
        results.update(model=shape, max_tokens=MAX_TOKENS, overhead=over,
                       load_average_1m={"before_overhead": load_before[0], "after_overhead": load_after[0],
                                        "cores": os.cpu_count()},
                       auto_prompts_routed_to_law=f"{len(auto_prompts)}/{len(law_prompts)}", serve_mode=mode)
    if "swaps" in sections:
        print("(3) swaps under load: in place, rollback in place, blue/green", flush=True)
        swaps = {"in_place": swap_under_load(served.url, config, "law",
                                             ray.get(registry.promote.remote("law", 2, 0.01)), clients=8),
                 "rollback_in_place": swap_under_load(served.url, config, "law",
                                                      ray.get(registry.rollback.remote("law", 1)), clients=8)}
        blue_green = config.model_copy(update={"serve": config.serve.model_copy(update={"in_place_swap": False})})
        swaps["blue_green"] = swap_under_load(served.url, blue_green, "law",
                                              ray.get(registry.promote.remote("law", 3, 0.01)), clients=8)
        results["swaps"] = swaps
        results["swaps_serve_mode"] = dict(serve_mode(), label=args.label)
    shutdown(config)
    ray.kill(registry)

    if "overhead" in sections:
        print("\nServing overhead: the same engine, same prompts, max_tokens 64 (ignore_eos)")
        print(overhead_table(results["overhead"]))
    if "routing" in sections:
        routed = results["routing"]
        print("\nRouting accuracy per domain")
        print(table(["domain", "test docs", "test documents", "test snippets (100 chars)", "unseen prompts"],
                    [[d, v["documents"], f"{v['test_documents']:.3f}", f"{v['test_snippets_100']:.3f}",
                      f"{v['unseen_prompts']:.2f}"] for d, v in routed["per_domain"].items()]))
        print(f"routing latency per prompt: p50 {routed['latency_ms']['p50']:.3f} ms, "
              f"p99 {routed['latency_ms']['p99']:.3f} ms")
    if "swaps" in sections:
        print("\nSwaps under load (8 clients): law v1 -> v2 in place, v2 -> v1 rolled back in place, v1 -> v3 blue/green")
        rows = []
        for kind, result in swaps.items():
            for phase in ("before", "during", "after"):
                r = result[phase]
                rows.append([kind, f"{result['swap']['total_s']:.2f}", phase, r["requests"], r["failed"],
                             f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                             f"{r['p99_ms'] / max(result['before']['p99_ms'], 1e-9):.2f}"])
        print(table(["swap", "swap s", "phase", "requests", "failed", "p50 ms", "p99 ms", "p99 / before"], rows))
        print(f"in place vs blue/green swap time: {swaps['in_place']['swap']['total_s']:.2f} s vs "
              f"{swaps['blue_green']['swap']['total_s']:.1f} s "
              f"(ratio {swaps['in_place']['swap']['total_s'] / swaps['blue_green']['swap']['total_s']:.3f})")
    path = write_results(results_name, merge_previous(results, sections, results_name))
    print(f"\nresults: {path}")
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
