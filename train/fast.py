"""The fast retrain path: a data-triggered retrain as one Ray task, new documents plus a replay sample.

When new documents push a serving specialist over its retrain threshold, the job continues that
version (same shape, same tokenizer, so the swap can happen in place). The full path
(train/job.py: Ray Data packs the tokens, Ray Train starts a worker group, a separate task
evaluates every domain) pays fixed costs that dwarf the training itself at these sizes: at demo
size under serving load, 46 s of Ray Data, 200 s of Ray Train for 35 optimizer steps and 40 s of
evaluation (japanese v2 in a `make demo` from a fresh clone). This path runs the same loop
(`train/loop.py`'s `train_steps`) in one task:

1. read the specialist's train shards with pyarrow; the shards named by the trigger are the new
   documents, the others are replayed;
2. tokenize with the serving version's own tokenizer and pack `seq_len` blocks;
3. each batch holds `scheduler.replay_share` of old blocks and the rest new ones (new blocks are
   each seen before any repeats), for the steps and schedule the full path would run (one
   branch's steps at the branch's schedule for a branched specialist);
4. save with `save_pretrained` plus the tokenizer and the probe reference (train/reference.py)
   into the storage root's checkpoints;
5. evaluate on the specialist's own domains' validation split (what the gate compares).

It returns the same `TrainResult` as the full path, so registration and the gate do not change.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np
import pyarrow.parquet as pq
import ray

from senmon.config import SenmonConfig
from senmon.ingest.store import DatasetStore

from .data import pack


def mixed_batches(new: np.ndarray, old: np.ndarray, batch_size: int, replay_share: float, seed: int):
    """Endless batches: `replay_share` of each from `old` (when there is any), the rest from `new`;
    each side walks a fresh permutation before repeating a block."""
    import torch

    rng = np.random.default_rng(seed)
    n_old = min(batch_size - 1, round(batch_size * replay_share)) if len(old) else 0
    n_new = batch_size - n_old

    def walk(blocks: np.ndarray):
        while True:
            yield from rng.permutation(len(blocks))

    new_order, old_order = walk(new), walk(old) if n_old else None
    while True:
        rows = [new[next(new_order)] for _ in range(n_new)] + [old[next(old_order)] for _ in range(n_old)]
        yield torch.from_numpy(np.stack(rows))


def _texts(store: DatasetStore, paths: list[str]) -> list[str]:
    return [t for p in paths for t in pq.read_table(p, filesystem=store.fs, columns=["text"]).column("text").to_pylist()]


def fast_retrain(config: SenmonConfig, name: str, start, new_shards: list[str], run_id: str, progress_board=None):
    """Continue `start` (a 'current' Start) on `new_shards` plus replay; returns a TrainResult.
    `progress_board`: a driver's `senmon.progress.Relay` board, where this retrain shows its bar."""
    import torch
    from transformers import LlamaForCausalLM

    from senmon.progress import training_progress

    from .branch import branch_schedule
    from .evaluate import evaluate_directory
    from .job import TrainResult, _continued_sizing, model_target, pooled_perplexity, saved_checkpoint
    from .loop import Schedule, train_steps
    from .tokenizer import load_tokenizer

    training, settings = config.training, config.scheduler
    target = model_target(config, name)
    store = DatasetStore(config.storage_root)
    timings: dict[str, float] = {}
    torch.manual_seed(training.seed)

    t0 = time.monotonic()
    new_names = {s.rsplit("/", 1)[-1] for s in new_shards}
    all_shards = [p for d in target.domains for p in store.shard_paths(d, "train")]
    new_paths = [p for p in all_shards if p.rsplit("/", 1)[-1] in new_names]
    old_paths = [p for p in all_shards if p not in new_paths]
    with ray.train.Checkpoint(start.checkpoint).as_directory() as directory:
        tokenizer = load_tokenizer(directory)
        model = LlamaForCausalLM.from_pretrained(directory, torch_dtype=torch.float32)
    new = pack(tokenizer, _texts(store, new_paths), training.seq_len)
    old = pack(tokenizer, _texts(store, old_paths), training.seq_len)
    timings["data_s"] = time.monotonic() - t0
    if len(new) == 0:
        raise ValueError(f"{name}: the new documents make no block of {training.seq_len} tokens")

    plan = start.plan
    if plan is not None:  # a branched specialist: one branch's steps at the branch's schedule
        schedule = branch_schedule(plan["branch_steps"], training.learning_rate, training.branch.learning_rate_scale,
                                   training.branch.warmup_fraction)
    else:  # `epochs` passes over what the full path would read
        steps = max(1, (len(new) + len(old)) // training.batch_size) * training.epochs
        schedule = Schedule(steps, training.learning_rate)
    t0 = time.monotonic()
    torch.set_num_threads(max(1, int(training.cpus_per_worker)))
    final = train_steps(model, mixed_batches(new, old, training.batch_size, settings.replay_share, training.seed),
                        schedule, progress=training_progress(progress_board, f"{name} (fast retrain)", schedule.steps))
    timings["train_s"] = time.monotonic() - t0

    texts = {d: store.texts(d, "validation") for d in target.domains}
    with saved_checkpoint(model, tokenizer, config.storage_root, run_id, timings) as (local, checkpoint_path):
        t0 = time.monotonic()
        results = evaluate_directory(local, texts, training.seq_len)
    timings["eval_s"] = time.monotonic() - t0
    by_domain = {d: {"perplexity": r.perplexity, "tokens": r.tokens, "documents": r.documents} for d, r in results.items()}

    tokens_seen = final["tokens_seen"]
    vocab_size = len(tokenizer)
    sizing = _continued_sizing(start, tokens_seen, vocab_size,
                               f"continued from v{(start.record or {}).get('version')} (fast path)")
    metrics = {
        "val_ppl": pooled_perplexity(by_domain, target.domains),
        "val_ppl_by_domain": {d: r["perplexity"] for d, r in by_domain.items()},
        "val_tokens_by_domain": {d: r["tokens"] for d, r in by_domain.items()},
        "train_loss": final["loss"], "train_tokens_per_s": final["tokens_per_s"], "train_s": final["train_s"],
        "data_wait_s": final["data_wait_s"], "loss_curve": final["loss_curve"],
    }
    data = {
        "path": "fast",
        "domains": target.domains,
        "shards": {d: [p.rsplit("/", 1)[-1] for p in store.shard_paths(d, "train")] for d in target.domains},
        "new_shards": [p.rsplit("/", 1)[-1] for p in new_paths],
        "new_blocks": int(len(new)), "replay_blocks": int(len(old)), "replay_share": settings.replay_share,
        "unique_tokens": int((len(new) + len(old)) * training.seq_len),
        "tokens_seen": tokens_seen,
        "steps": schedule.steps,
        "epochs": round(schedule.steps * training.batch_size / max(1, len(new) + len(old)), 3),
        "schedule": asdict(schedule),
        "seq_len": training.seq_len,
        "tokenizer": "from the initial checkpoint",
        "start": start.kind,
        "init_checkpoint": start.checkpoint,
        "plan": plan,
    }
    return TrainResult(name, run_id, checkpoint_path, sizing, data, metrics, timings)


@ray.remote(max_retries=0)
def fast_retrain_task(config_data: dict, name: str, start, new_shards: list[str], run_id: str, progress_board=None):
    from senmon.config import parse_config

    return fast_retrain(parse_config(config_data, source="fast retrain"), name, start, new_shards, run_id,
                        progress_board)

