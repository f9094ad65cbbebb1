"""Fast or full retrain path: the same new documents, the same starting version, which answers better?

    python -m bench.retrain_paths [--seed-from ROOT]   # -> bench/results/retrain_paths.json

A data-triggered retrain continues the serving version on one of two paths (train/job.py
`train_and_register`): the fast path (train/fast.py: one Ray task, the new documents plus a
`scheduler.replay_share` sample of the older ones) or the full path (`scheduler.retrain_path: full`:
Ray Data and Ray Train over the specialist's whole dataset). Both run the same number of steps (one
branch's, for a branched specialist). This benchmark runs both from the same version on the same
documents, at the demo's sizes (the embedded config):

1. a fresh storage root (var/bench-retrain-paths), seeded from the corpus less the japanese training
   documents the demo holds back to stream (`senmon.demo.held_back`);
2. the seed: trained here from scratch without the held-back documents (the default, a few
   minutes), or the serving generalist of `--seed-from ROOT` registered as v1 here (quicker);
3. japanese v1, branched from the seed;
4. the held-back documents written as a new shard, as ingest writes them;
5. the fast path from v1 -> v2; the registry rolled back to v1; the full path from v1 -> v3.
   Rejected versions are evaluated too (the gate only decides what serves);
6. every version scored on japanese test (unseen), japanese validation (what the gate compares),
   the new documents themselves (learned?), the older japanese training documents (kept?), and
   the other domains' validation text (drift away from what the seed knew).

Wall seconds are each `train_and_register` call as the scheduler would make it (training,
evaluation, register and gate). On a shared 2-core machine they depend on the load: the JSON keeps
the load average before and after each path.

Caveat of `--seed-from`: a seed trained on the whole corpus (var/route-models, for one) has already
seen the "new" documents (`seed_saw_new_documents` in the JSON counts them); both paths start from
it, but what they gain from the new documents is understated. The default trains a clean seed.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from pathlib import Path

import ray
import ray.train

from bench.common import table, write_results
from senmon.config import load_config

REPO = Path(__file__).resolve().parents[1]
DOMAIN = "japanese"  # the demo's stream domain
SPECIALIST = "japanese"


@ray.remote(num_cpus=1)
def perplexities(checkpoint_path: str, texts_by_set: dict[str, list[str]], seq_len: int) -> dict[str, dict]:
    """Perplexity of one checkpoint on each named set of texts (train/evaluate.py)."""
    from senmon.train.evaluate import evaluate_directory

    with ray.train.Checkpoint(checkpoint_path).as_directory() as directory:
        results = evaluate_directory(directory, texts_by_set, seq_len)
    return {name: {"perplexity": r.perplexity, "tokens": r.tokens, "documents": r.documents}
            for name, r in results.items()}


def pooled(by_set: dict[str, dict], names: list[str]) -> float:
    """Token-weighted perplexity over several sets."""
    nll = sum(math.log(by_set[n]["perplexity"]) * by_set[n]["tokens"] for n in names)
    return math.exp(nll / sum(by_set[n]["tokens"] for n in names))


def load() -> list[float]:
    return [round(x, 1) for x in os.getloadavg()]


def seed_registry(config, registry, seed_from: Path | None, new_ids: set[str]) -> dict:
    """The generalist (the seed) as the registry's serving v1: reused from `seed_from`, or trained here."""
    from senmon.actors.registry import serving_records_from_file
    from senmon.ingest.store import DatasetStore
    from senmon.train.job import train_and_register

    name = config.generalist.name
    found = serving_records_from_file(str(seed_from), [name]).get(name) if seed_from else None
    if found is None:
        if seed_from:
            print(f"    no serving {name} under {seed_from}: training the seed here")
        started = time.monotonic()
        record = train_and_register(config, name, registry)
        return {"source": "trained", "wall_s": time.monotonic() - started, "record": record, "saw_new": 0}
    data = {**found["data"], "reused_from": {"root": str(seed_from), "version": found["version"]}}
    registered = ray.get(registry.register.remote(name, found["run_id"], found["path"], found["metrics"],
                                                  found["sizing"], data))
    record = ray.get(registry.promote.remote(name, registered["version"], config.training.promotion_margin))
    saw_new = len(DatasetStore(str(seed_from)).ids(DOMAIN) & new_ids)
    print(f"    {name}: reusing v{found['version']} of {seed_from} ({found['path']}); its store held "
          f"{saw_new} of the {len(new_ids)} new documents")
    return {"source": str(seed_from), "wall_s": None, "record": record, "saw_new": saw_new}


def write_new_shard(store, docs: list[dict]) -> list[str]:
    """The held-back documents as one new shard, as the ingest bridge writes them (INGESTED_SCHEMA)."""
    from senmon.ingest.store import INGESTED_SCHEMA

    rows = [{"id": d["id"], "domain": d["domain"], "text": d["text"], "source": d.get("source"),
             "assigned_by": "producer", "route_confidence": None} for d in docs]
    return store.write_shard(rows, name="bench-stream", schema=INGESTED_SCHEMA)


def retrain(config, registry, new_shards: list[str]) -> dict:
    """One data-triggered retrain of the specialist, as the scheduler makes it; the record (any status)."""
    from senmon.train.job import train_and_register

    before = load()
    started = time.monotonic()
    record = train_and_register(config, SPECIALIST, registry, init="current", new_shards=new_shards)
    wall = time.monotonic() - started
    print(f"    v{record['version']} ({config.scheduler.retrain_path} path): {record['status']} "
          f"({record['reason']}), {wall:.0f} s, load {before} -> {load()}")
    return {"record": record, "wall_s": wall, "load_before": before, "load_after": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed-from", default="none",
                        help="storage root whose serving generalist is reused as the seed (quicker, but it may have "
                             "seen the new documents); default 'none': train a seed here without them")
    parser.add_argument("--root", default=None, help="storage root for the run (default: var/bench-retrain-paths)")
    args = parser.parse_args()
    seed_from = None if args.seed_from.lower() in ("", "none") else Path(args.seed_from).resolve()

    import ray.data

    from senmon.actors.registry import get_or_create_registry
    from senmon.demo import held_back
    from senmon.ingest.store import DatasetStore
    from senmon.train.job import train_and_register

    base = load_config(None)
    root = Path(args.root).resolve() if args.root else Path(base.storage_root).parent / "bench-retrain-paths"
    shutil.rmtree(root, ignore_errors=True)
    config = base.model_copy(update={"storage_root": str(root)})
    full_config = config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"retrain_path": "full"})})
    began, load_start = time.monotonic(), load()

    new_docs = held_back(config.corpus_dir, DOMAIN)
    new_ids = {d["id"] for d in new_docs}
    store = DatasetStore(config.storage_root)
    counts = store.seed_from_corpus(config.corpus_dir, config.domains, exclude_ids=new_ids)
    print(f"==> store {root}: {sum(counts.values()):,} documents, {len(new_docs)} {DOMAIN} training documents "
          f"held back (load average {load_start})", flush=True)

    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)  # never a cluster of ray start
    ray.data.DataContext.get_current().enable_progress_bars = False
    registry = get_or_create_registry(config.storage_root)
    try:
        print("==> the seed", flush=True)
        seed = seed_registry(config, registry, seed_from, new_ids)

        print(f"==> {SPECIALIST} v1, branched from the seed", flush=True)
        started = time.monotonic()
        v1 = train_and_register(config, SPECIALIST, registry)
        v1_wall = time.monotonic() - started
        print(f"    v{v1['version']}: {v1['status']}, val ppl {v1['metrics']['val_ppl']:.1f}, {v1_wall:.0f} s")
        if v1["status"] != "serving":
            raise RuntimeError(f"{SPECIALIST} v1 is not serving: {v1['reason']}")

        new_shards = write_new_shard(store, new_docs)
        print(f"==> new shard(s): {', '.join(p.rsplit('/', 3)[-3] + '/' + p.rsplit('/', 1)[-1] for p in new_shards)}",
              flush=True)

        print(f"==> fast path from v{v1['version']}", flush=True)
        fast = retrain(config, registry, new_shards)
        if ray.get(registry.current.remote(SPECIALIST))["version"] != v1["version"]:
            ray.get(registry.rollback.remote(SPECIALIST, v1["version"]))
            print(f"    rolled back to v{v1['version']}")
        print(f"==> full path from v{v1['version']}", flush=True)
        full = retrain(full_config, registry, new_shards)

        print("==> scoring every version", flush=True)
        new_names = {p.rsplit("/", 1)[-1] for p in new_shards}
        sets = {
            "test": store.texts(DOMAIN, "test"),
            "validation": store.texts(DOMAIN, "validation"),
            "new": [d["text"] for d in new_docs],
            "old_train": _old_texts(store, new_names),
        }
        others = [d for d in config.domains if d != DOMAIN]
        sets.update({f"other:{d}": store.texts(d, "validation") for d in others})
        versions = {"v1 (start)": {"record": v1, "wall_s": v1_wall}, "fast": fast, "full": full}
        texts = ray.put(sets)
        scores = ray.get([perplexities.remote(v["record"]["path"], texts, config.training.seq_len)
                          for v in versions.values()])
        scored = dict(zip(versions, scores))
    finally:
        try:
            ray.kill(registry)
        finally:
            ray.shutdown()

    reference = scored["v1 (start)"]
    rows, quality, out = [], [], {}
    other_names = [f"other:{d}" for d in others]
    for label, run in versions.items():
        record, by_set = run["record"], scored[label]
        data = record.get("data") or {}
        row = {
            "version": record["version"], "status": record["status"], "reason": record["reason"],
            "path": data.get("path", "full" if data.get("start") == "current" else "branch"),
            "wall_s": run["wall_s"], "timings": data.get("timings"), "steps": data.get("steps"),
            "tokens_seen": data.get("tokens_seen"), "new_blocks": data.get("new_blocks"),
            "replay_blocks": data.get("replay_blocks"), "replay_share": data.get("replay_share"),
            "unique_tokens": data.get("unique_tokens"),
            "val_ppl_registry": record["metrics"]["val_ppl"],
            "ppl": {k: v["perplexity"] for k, v in by_set.items()},
            "tokens": {k: v["tokens"] for k, v in by_set.items()},
            "other_domains_val_ppl": pooled(by_set, other_names),
            "load_before": run.get("load_before"), "load_after": run.get("load_after"),
        }
        out[label] = row
        ratio = lambda key: by_set[key]["perplexity"] / reference[key]["perplexity"]  # noqa: E731
        rows.append([label, f"v{record['version']} {record['status']}", f"{run['wall_s']:.0f}", row["steps"],
                     f"{row['tokens_seen']:,}", f"{row['val_ppl_registry']:.1f}", f"{by_set['test']['perplexity']:.1f}",
                     f"{ratio('test'):.3f}"])
        quality.append([label, f"{by_set['new']['perplexity']:.1f} ({ratio('new'):.3f})",
                        f"{by_set['old_train']['perplexity']:.1f} ({ratio('old_train'):.3f})",
                        f"{row['other_domains_val_ppl']:.1f} "
                        f"({row['other_domains_val_ppl'] / pooled(reference, other_names):.3f})"])

    print()
    print(table(["run", "version", "wall s", "steps", "tokens seen", f"{DOMAIN} val ppl", f"{DOMAIN} test ppl",
                 "test vs v1"], rows))
    print()
    print(table(["run", "ppl on the new documents (vs v1)", f"on the older {DOMAIN} train docs (vs v1)",
                 "other domains' validation (vs v1)"], quality))
    print(f"\nseed: {seed['source']}; load average at the start {load_start}, at the end {load()}; "
          f"{time.monotonic() - began:.0f} s in all")
    path = write_results("retrain_paths", {
        "domain": DOMAIN, "specialist": SPECIALIST, "storage_root": str(root), "new_documents": len(new_docs),
        "new_shards": [p.rsplit("/", 1)[-1] for p in new_shards], "replay_share": config.scheduler.replay_share,
        "seed": {"source": seed["source"], "version": seed["record"]["version"], "path": seed["record"]["path"],
                 "wall_s": seed["wall_s"], "seed_saw_new_documents": seed["saw_new"]},
        "documents": {k: len(v) for k, v in sets.items()},
        "runs": out, "load_average": {"start": load_start, "end": load()}, "total_s": time.monotonic() - began,
    })
    print(f"results: {path}")


def _old_texts(store, new_names: set[str]) -> list[str]:
    """The specialist's training documents that were there before the new shard."""
    import pyarrow.parquet as pq

    return [t for p in store.shard_paths(DOMAIN, "train") if p.rsplit("/", 1)[-1] not in new_names
            for t in pq.read_table(p, filesystem=store.fs, columns=["text"]).column("text").to_pylist()]


if __name__ == "__main__":
    main()
