"""Branch-Train-Merge's merged model: the fallback that answers text of no specialist's domain.

Every specialist branches from the seed and decays its learning rate on its own domain (train/branch.py). The
seed itself never decays, so on text of no domain each specialist predicts better than it does, and a router that
sends such text to the seed makes the answer worse. The average of the specialists' parameters (Li et al. 2022,
"Branch-Train-Merge") costs no training and, measured with `python -m bench fallback --merged`, predicts text of no
domain 11% better than the seed, and better than every specialist for 63% of such documents: so `auto`'s fallback is
the merged model when `generalist.fallback` is 'merged' (the default), and the seed stays in the registry as the
point every specialist branches from.

    record = merge_and_register(config, registry)   # None when no merge is due (wanted_merge)

The merge is registered as a new version of the generalist, with the versions it was made from
(`data.merged_from`) and the seed's version (`data.seed`), evaluated on every domain's validation split and given
its probe reference (train/reference.py), which the engines verify as for any version. It is promoted because the
config asks for it, not by the gate's rule: on the corpus's own validation text a merge does worse than the seed
(in `make demo`: 224.2 against 216.3), because it averages five models each decayed on another domain, while on text
from other sources and of no domain it does better (0.95x and 0.89x the seed's perplexity), and the router sends
the corpus's own text to the specialists. Its record's reason gives both numbers; `senmon rollback generalist`
returns to the seed. It is made when senmon starts (`train_missing`): a specialist retrained since the last merge
is in the next one. A retrained seed is held to the seed it replaces and, once it passes, merged beside at once
(train/job.py `promote_seed`), so the fallback stays a merge.
"""

from __future__ import annotations

import contextlib
import time

import ray

from senmon.config import SenmonConfig
from senmon.ingest.store import DatasetStore
from senmon.storage import new_run_id


def is_merge(record: dict | None) -> bool:
    return bool(record and record.get("data", {}).get("merged_from"))


def seed_record(registry, config: SenmonConfig) -> dict | None:
    """The seed's registry record: the serving generalist, or the seed a serving merge names."""
    current = ray.get(registry.current.remote(config.generalist.name))
    if is_merge(current):
        return ray.get(registry.get.remote(config.generalist.name, current["data"]["seed"]["version"]))
    return current


def _shape(record: dict) -> tuple:
    shape = record.get("sizing", {}).get("shape") or {}
    return tuple(shape.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"))


def merge_weights(directories: list[str], weights: list[float] | None = None):
    """The weighted average (default: equal weights) of the parameters of Llama checkpoints of one shape."""
    import torch
    from transformers import LlamaForCausalLM

    models = [LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32) for d in directories]
    weights = weights or [1.0 / len(models)] * len(models)
    states = [m.state_dict() for m in models]
    shapes = [{k: tuple(v.shape) for k, v in s.items()} for s in states]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("only models of one shape can be merged (a seed and its branches)")
    models[0].load_state_dict({k: sum(w * s[k] for w, s in zip(weights, states)) for k in states[0]})
    return models[0].eval()


def wanted_merge(config: SenmonConfig, registry) -> dict[str, int] | None:
    """{specialist: serving version} to merge now, or None when no merge is due: the fallback is the seed, the
    specialists did not branch from it, one of them serves no version yet, or the last merge made is of exactly
    these versions and was not replaced by a retrained seed (it serves, was refused, or an operator rolled it
    back). Only versions of the seed's shape are merged: a specialist started from a directory of its own leaves
    the fallback as it is."""
    if config.generalist.fallback != "merged" or config.training.specialists_from != "seed":
        return None
    records = {s.name: ray.get(registry.current.remote(s.name)) for s in config.specialists}
    seed = seed_record(registry, config)
    if seed is None or any(r is None for r in records.values()):
        return None
    if any(_shape(r) != _shape(seed) for r in records.values()):  # e.g. one started from a directory of its own
        return None
    versions = {name: r["version"] for name, r in records.items()}
    history = ray.get(registry.history.remote(config.generalist.name))
    last_merge = next((r for r in reversed(history) if is_merge(r)), None)
    if last_merge is not None and last_merge["data"]["merged_from"] == versions and last_merge["status"] != "retired":
        return None  # serving, refused, or rolled back by an operator: left as it is
    return versions  # new versions, or the merge was replaced by a retrained seed


@ray.remote(num_cpus=1, max_retries=0)
def merge_task(config_data: dict, seed: dict, specialists: dict[str, dict], run_id: str) -> dict:
    """Merge the `specialists` (name -> registry record), save the checkpoint under the storage root, evaluate it
    on every domain's validation split; returns what `ModelRegistry.register` needs."""
    from senmon.config import parse_config

    from .evaluate import evaluate_directory
    from .job import pooled_perplexity, saved_checkpoint
    from .tokenizer import load_tokenizer

    config = parse_config(config_data, source="merge")
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:  # each checkpoint as a local directory (downloaded from object storage)
        directories = [stack.enter_context(ray.train.Checkpoint(r["path"]).as_directory()) for r in specialists.values()]
        model = merge_weights(directories)
        tokenizer = load_tokenizer(directories[0])
    timings["merge_s"] = time.monotonic() - t0

    store = DatasetStore(config.storage_root)
    texts = {d: store.texts(d, "validation") for d in config.domains}
    with saved_checkpoint(model, tokenizer, config.storage_root, run_id, timings) as (local, path):
        t0 = time.monotonic()
        results = evaluate_directory(local, texts, config.training.seq_len)
        timings["eval_s"] = time.monotonic() - t0
    by_domain = {d: {"perplexity": r.perplexity, "tokens": r.tokens} for d, r in results.items()}
    metrics = {"val_ppl": pooled_perplexity(by_domain, config.domains),
               "val_ppl_by_domain": {d: r["perplexity"] for d, r in by_domain.items()},
               "val_tokens_by_domain": {d: r["tokens"] for d, r in by_domain.items()}}
    sizing = {**{k: v for k, v in seed.get("sizing", {}).items() if k not in ("training_tokens", "train_flops", "rule")},
              "training_tokens": 0, "train_flops": 0.0,
              "rule": "the average of the specialists' parameters (Branch-Train-Merge): no training, the seed's shape"}
    data = {"path": "merged", "domains": config.domains,
            "merged_from": {name: r["version"] for name, r in specialists.items()},
            "seed": {"version": seed["version"], "path": seed["path"]},
            "plan": seed.get("data", {}).get("plan"), "tokens_seen": 0, "steps": 0,
            "seq_len": config.training.seq_len, "timings": timings}
    return {"run_id": run_id, "path": path, "metrics": metrics,
            "sizing": sizing, "data": data}


def merge_and_register(config: SenmonConfig, registry) -> dict | None:
    """Merge the serving specialists into a new generalist version and serve it (the config's choice, not the gate's
    rule); returns its record, or None when no merge is due (`wanted_merge`)."""
    versions = wanted_merge(config, registry)
    if versions is None:
        return None
    seed = seed_record(registry, config)
    if seed is None:
        return None
    specialists = {name: ray.get(registry.get.remote(name, version)) for name, version in versions.items()}
    run_id = new_run_id(f"{config.generalist.name}-merge")
    merged = ray.get(merge_task.remote(config.model_dump(mode="json"), seed, specialists, run_id))
    record = ray.get(registry.register.remote(config.generalist.name, merged["run_id"], merged["path"],
                                              merged["metrics"], merged["sizing"], merged["data"]))
    # Not the gate's rule: a merge predicts the corpus's own domains worse than the seed (those go to the specialists)
    # and other text better, so pooled validation perplexity would refuse the model that answers better through the
    # router (`python -m bench fallback --merged`). The config chose it; both numbers stay in the reason.
    current = ray.get(registry.current.remote(config.generalist.name))
    shown = f" against {current['metrics']['val_ppl']:.1f} for serving v{current['version']}" if current else ""
    return ray.get(registry.promote.remote(
        config.generalist.name, record["version"], config.training.promotion_margin, force=True,
        reason=f"the configured fallback (generalist.fallback: merged); pooled validation perplexity "
               f"{merged['metrics']['val_ppl']:.1f}{shown}"))
