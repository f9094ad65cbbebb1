"""`senmon demo`: the main job, start to finish, on the embedded stack.

1. start local Ray and the embedded Kafka-protocol broker; seed the dataset store from the
   shipped corpus, holding back part of one domain's training documents ("the stream");
2. train the shared tokenizer, the generalist (the seed) and every specialist branched from it
   (Ray Train), register them, make the fallback (with `generalist.fallback: merged`, the average
   of the specialists, train/merge.py), and show each specialist's perplexity on its own domain
   next to the fallback's;
3. serve them (router + one vLLM engine per model on Ray Serve) and ask a question of each domain,
   showing which specialist answered and how sure the router was;
4. stream the held-back documents through Kafka; the ingest actors write them to the dataset,
   the scheduler retrains that specialist, the gate promotes it and the router swaps to it live,
   while other specialists keep answering requests (every failure is counted);
5. report versions and test perplexity before and after, and stop everything it started.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import ray

from senmon.config import SenmonConfig
from senmon.storage import filesystem, write_atomic

STREAM_FRACTION = 0.4  # of the stream domain's training documents, held back and sent through Kafka


def _step(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def held_back(corpus_dir: str, domain: str, fraction: float = STREAM_FRACTION) -> list[dict]:
    """A deterministic slice of `domain`'s training documents (by a hash of the id)."""
    path = Path(corpus_dir) / "train" / f"{domain}.jsonl"
    docs = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    bucket = lambda d: int(hashlib.sha256(f"stream:{d['id']}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF  # noqa: E731
    return [d for d in docs if bucket(d) < fraction]


def sample_questions(config: SenmonConfig, chars: int = 80) -> dict[str, str]:
    """One unseen prompt per domain: the opening of its first test document."""
    questions = {}
    for domain in config.domains:
        path = Path(config.corpus_dir) / "test" / f"{domain}.jsonl"
        first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
        questions[domain] = " ".join(first["text"].split())[:chars]
    return questions


def ask(url: str, prompt: str, model: str = "auto", max_tokens: int = 24, api_key: str | None = None,
        temperature: float = 0.8) -> dict:
    """One completion over HTTP; returns who answered (the router's headers) and the text.

    Sampled (with a fixed seed) rather than greedy: greedy decoding makes models this small repeat
    one token forever.
    """
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, "top_p": 0.95,
            "seed": 0}
    response = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    body = response.json()
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {body.get('error', {}).get('message', body)}")
    return {"specialist": response.headers.get("x-senmon-specialist"), "version": response.headers.get("x-senmon-version"),
            "confidence": float(response.headers.get("x-senmon-confidence", "nan")),
            "routing_ms": float(response.headers.get("x-senmon-routing-ms", "nan")), "text": body["choices"][0]["text"]}


class BackgroundLoad:
    """Requests to the given models, one after another per model, counting every failure per model.

    A steady trickle (`pause_s` between a model's requests), not saturation: on two cores a
    saturating load starves the retraining job it is meant to run beside."""

    def __init__(self, url: str, models: list[str], prompt: str = "The", api_key: str | None = None,
                 pause_s: float = 0.25):
        self.url, self.models, self.prompt, self.api_key, self.pause_s = url, models, prompt, api_key, pause_s
        self.sent = dict.fromkeys(models, 0)
        self.failed = dict.fromkeys(models, 0)
        self.errors: list[str] = []
        self.answered_by: dict[str, list[str]] = {m: [] for m in models}  # versions, in the order they answered
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(m,), daemon=True) for m in models]

    def _loop(self, model: str) -> None:
        while not self._stop.is_set():
            self.sent[model] += 1
            try:
                answer = ask(self.url, self.prompt, model=model, max_tokens=8, api_key=self.api_key)
                if not self.answered_by[model] or self.answered_by[model][-1] != answer["version"]:
                    self.answered_by[model].append(answer["version"])
            except Exception as error:  # counted, never hidden
                self.failed[model] += 1
                self.errors.append(f"{model}: {error}")
            self._stop.wait(self.pause_s)

    def __enter__(self) -> "BackgroundLoad":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=130)


def specialists_vs_fallback(config: SenmonConfig, registry) -> list[dict]:
    """Per specialist: its serving version's validation perplexity on its own domains next to the
    fallback model's on the same domains (both from the registry records, measured at training)."""
    from senmon.train.job import pooled_perplexity

    fallback = ray.get(registry.current.remote(config.generalist.name))
    rows = []
    for spec in config.specialists:
        record = ray.get(registry.current.remote(spec.name))
        by_domain = {d: {"perplexity": p, "tokens": fallback["metrics"]["val_tokens_by_domain"][d]}
                     for d, p in fallback["metrics"]["val_ppl_by_domain"].items()}
        fallback_ppl = pooled_perplexity(by_domain, spec.domains)
        rows.append({"specialist": spec.name, "version": record["version"], "start": record["data"].get("start"),
                     "specialist_ppl": record["metrics"]["val_ppl"], "fallback_version": fallback["version"],
                     "fallback_ppl": fallback_ppl, "ratio": record["metrics"]["val_ppl"] / fallback_ppl})
    return rows


def test_perplexity(config: SenmonConfig, record: dict, domain: str) -> float:
    from senmon.train.job import evaluate_checkpoint

    result = ray.get(evaluate_checkpoint.remote(record["path"], config.storage_root, [domain], "test",
                                                config.training.seq_len))
    return result[domain]["perplexity"]


def freshness_breakdown(first_produced_ts: float, answered_ts: float, run: dict, record: dict) -> dict[str, float]:
    """Where the seconds from the first produced document to the new version answering went.

    ingest: produced -> stored -> the threshold signal -> the scheduler starts the job;
    training: tokenizer, data packing, the training loop and saving (Ray Data and Ray Train on the
    full path, one task on the fast path); evaluation: validation perplexity; register + gate: the
    rest of the job (task start-up included); swap: weights reloaded and verified in place, or a new
    engine up, warmed, switched and the old drained; observed: until the demo saw the run end (its
    1 s poll).
    """
    timings = (record.get("data") or {}).get("timings") or {}
    swap_s = run.get("swap_s") or 0.0
    job_s = (run.get("ended_ts") or answered_ts) - run["started_ts"] - swap_s
    training_s = sum(timings.get(k, 0.0) for k in ("tokenizer_s", "data_s", "train_s", "save_s"))
    evaluation_s = timings.get("eval_s", 0.0)
    parts = {
        "ingest_s": run["started_ts"] - first_produced_ts,
        "training_s": training_s,
        "evaluation_s": evaluation_s,
        "register_gate_s": job_s - training_s - evaluation_s,
        "swap_s": swap_s,
        "observed_s": answered_ts - (run.get("ended_ts") or answered_ts),
    }
    parts["total_s"] = answered_ts - first_produced_ts
    return {k: round(v, 1) for k, v in parts.items()}


def wait_for_retrain(scheduler, name: str, after_runs: int, timeout_s: float, max_failures: int = 3) -> dict:
    """Block until a new run of `name` has ended (after its swap) with a version, or failed for good."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = ray.get(scheduler.history.remote(name))[after_runs:]
        ended = [r for r in runs if r["ended_at"] is not None]
        decided = [r for r in ended if r["outcome"] in ("serving", "rejected")]
        if decided:
            return decided[-1]
        if sum(r["outcome"] == "failed" for r in ended) >= max_failures:
            raise RuntimeError(f"retraining {name} failed: {ended[-1]['reason']}")
        time.sleep(1.0)
    raise TimeoutError(f"no retraining run of {name} ended within {timeout_s:.0f} s")


def run(config: SenmonConfig, stream_domain: str | None = None, timeout_s: float = 1800) -> dict:
    """The whole demo; returns the report (also printed). Raises if any step fails."""
    import ray.data

    from senmon.ingest.producer import produce_file
    from senmon.ingest.store import DatasetStore
    from senmon.system import start_system

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per background request otherwise
    began = time.monotonic()
    stream_domain = stream_domain or ("japanese" if "japanese" in config.domains else config.domains[0])
    stream_spec = next(s for s in config.specialists if stream_domain in s.domains)
    stream_docs = held_back(config.corpus_dir, stream_domain)
    report: dict = {"stream_domain": stream_domain, "specialist": stream_spec.name, "streamed": len(stream_docs)}

    _step("starting local Ray and the embedded Kafka-protocol broker" if config.kafka.embedded
          else "connecting to Ray and Kafka")
    store = DatasetStore(config.storage_root)
    if not store.domains():
        counts = store.seed_from_corpus(config.corpus_dir, config.domains, exclude_ids={d["id"] for d in stream_docs})
        print(f"    dataset store seeded: {sum(counts.values()):,} documents in {len(counts)} domains; "
              f"{len(stream_docs)} {stream_domain} training documents held back to stream through Kafka later")

    with start_system(config, say=lambda m: print("    " + m, flush=True)) as system:
        report["startup_s"] = {k: round(v, 1) for k, v in system.timings.items()}
        api_key = (config.http.resolved_keys()[0] or [None])[0]

        _step(f"each specialist on its own domain against the fallback ({config.generalist.name}): "
              "validation perplexity, lower is better")
        report["specialists_vs_fallback"] = specialists_vs_fallback(config, system.registry)
        for row in report["specialists_vs_fallback"]:
            print(f"    {row['specialist']:>10} v{row['version']} ({row['start']}): {row['specialist_ppl']:7.1f}   "
                  f"{config.generalist.name} v{row['fallback_version']}: {row['fallback_ppl']:7.1f}   "
                  f"ratio {row['ratio']:.2f}")

        _step("asking one question per domain (model: auto); the router picks the specialist")
        questions = sample_questions(config)
        asked = {}
        for domain, prompt in questions.items():
            answer = ask(system.url, prompt, api_key=api_key)
            asked[domain] = answer
            print(f"    [{domain:>10}] -> {answer['specialist']} v{answer['version']} "
                  f"(confidence {answer['confidence']:.2f}, routing {answer['routing_ms']:.1f} ms): "
                  f"{prompt[:40]!r} ... {answer['text'][:40]!r}")
        report["asked"] = {d: {k: a[k] for k in ("specialist", "version", "confidence")} for d, a in asked.items()}

        before = {m: ray.get(system.registry.current.remote(m)) for m in [s.name for s in config.specialists]}
        ppl_before = test_perplexity(config, before[stream_spec.name], stream_domain)
        runs_before = len(ray.get(system.scheduler.history.remote(stream_spec.name)))

        _step(f"streaming {len(stream_docs)} new {stream_domain} documents through Kafka "
              f"(retrain threshold: {stream_spec.schedule.min_new_documents}); the other specialists stay under load")
        stream_file = Path(config.storage_root) / "demo" / f"stream-{stream_domain}.jsonl"
        stream_file.parent.mkdir(parents=True, exist_ok=True)
        stream_file.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in stream_docs), encoding="utf-8")
        others = [s.name for s in config.specialists if s.name != stream_spec.name]
        first_produced, first_produced_ts = time.monotonic(), time.time()
        with BackgroundLoad(system.url, [stream_spec.name] + others, api_key=api_key) as load:
            produced = produce_file(config, stream_file)
            print(f"    produced {produced.sent} documents ({produced.bytes / 1e6:.2f} MB) in {produced.seconds:.1f} s")
            run_record = wait_for_retrain(system.scheduler, stream_spec.name, runs_before, timeout_s)
            freshness_s, answered_ts = time.monotonic() - first_produced, time.time()
            time.sleep(1.0)  # a last round of requests on the final state
        after = {m: ray.get(system.registry.current.remote(m)) for m in before}
        ppl_after = test_perplexity(config, after[stream_spec.name], stream_domain)
        check = ask(system.url, questions[stream_domain], model=stream_spec.name, api_key=api_key)
        ingest_status = ray.get(system.ingest.status.remote())

        report.update({
            "run": {k: run_record.get(k) for k in ("trigger", "outcome", "version", "reason", "swap_s", "val_ppl")},
            "version_before": before[stream_spec.name]["version"], "version_after": after[stream_spec.name]["version"],
            "test_ppl_before": ppl_before, "test_ppl_after": ppl_after, "answered_by_after": check["version"],
            "others_unchanged": all(before[m]["version"] == after[m]["version"] for m in others),
            "background_requests": sum(load.sent[m] for m in others),
            "background_failed": sum(load.failed[m] for m in others), "background_errors": load.errors[:5],
            "swapped_requests": load.sent[stream_spec.name], "swapped_failed": load.failed[stream_spec.name],
            "swapped_answered_by": load.answered_by[stream_spec.name],
            "freshness_s": freshness_s,
            "freshness": freshness_breakdown(first_produced_ts, answered_ts, run_record,
                                             ray.get(system.registry.get.remote(stream_spec.name, run_record["version"]))),
            "ingest": {k: ingest_status.get("totals", {}).get(k) for k in ("documents", "duplicates", "dead_letters")},
        })
        _step("report")
        print(f"    {stream_spec.name}: v{report['version_before']} -> v{report['version_after']} "
              f"({run_record['outcome']}: {run_record.get('reason')})")
        print(f"    {stream_domain} test perplexity: {ppl_before:.1f} -> {ppl_after:.1f}")
        print(f"    a request to {stream_spec.name} is now answered by v{check['version']}")
        print(f"    other specialists: {'unchanged' if report['others_unchanged'] else 'CHANGED'} "
              f"({', '.join(m + ' v' + str(after[m]['version']) for m in others)}); "
              f"{report['background_requests']} requests to them during the stream and swap, "
              f"{report['background_failed']} failed")
        print(f"    {stream_spec.name} itself: {report['swapped_requests']} requests during its retraining and swap, "
              f"{report['swapped_failed']} failed, answered by "
              + " then ".join(f"v{v}" for v in report["swapped_answered_by"]))
        print(f"    freshness: {freshness_s:.0f} s from the first produced document to the new version answering: "
              + ", ".join(f"{k[:-2].replace('_', ' + ')} {v:.0f} s" for k, v in report["freshness"].items()
                          if k != "total_s"))
    report["total_s"] = time.monotonic() - began
    fs, base = filesystem(config.storage_root)
    write_atomic(fs, f"{base}/demo/report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str).encode())
    print(f"\ndone in {report['total_s']:.0f} s; Serve, the scheduler, ingest, Ray and the broker are stopped; "
          f"report: {base}/demo/report.json", flush=True)
    return report
