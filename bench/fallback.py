"""Which fallback makes "text of no domain -> the fallback" the right answer: the seed, a decayed seed or a merge?

    python -m bench fallback [--models ROOT] [--steps 38,76] [--merged]   # -> bench/results/fallback.json

The seed is the generalist trained on every domain at a constant learning rate, which each specialist then
decays on its own domain (train/branch.py). On text of no domain, every specialist predicts better than that
undecayed seed, so sending such text to the seed (the routing goal) makes answers worse. Two remedies:
- a *decayed generalist* (`--steps`): the seed trained for more steps on the pooled training data with a branch's
  decaying schedule (38 is one branch's budget at the demo's sizes, so it costs what one more specialist costs);
- a *merged* model (`--merged`): the average of the specialists' parameters (Branch-Train-Merge, train/merge.py),
  with and without the seed; it costs no training. `generalist.fallback: merged` serves it.
On the answer-quality rows of bench/routing.py (route on a whole document's first 64 tokens, score the next ones)
it asks:

- how each does alone, against the seed ("always");
- how the routing policies do when it is the fallback: the classifier alone at its threshold, the router
  (classifier + likelihood second opinion, serve settings), and the best model in hindsight (oracle);
- how often each policy, and the oracle, send a document to the fallback: where the oracle rarely picks the
  fallback even for no-domain text, no routing goal of "no domain -> fallback" can agree with answer quality.

All perplexities are relative to always asking the seed (when the storage root serves a merge, the seed it names).
It needs a trained system (`--models`, a storage root; default: the embedded config's, which `make demo` fills) and
the held-out sources (var/sources).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import table, write_results
from bench.routing import DOMAINS, answer_rows, evaluation_items, load, nll_all, scorer_for, train_variant
from senmon.train.merge import merge_weights
from senmon.train.routing import WORDS_CHARS

SEED = "generalist"
GROUPS = ["heldout", "ood-test", "corpus-test", "validation"]


def decayed_generalist(config, models_root: str, seed_path: str, steps: int, directory: str):
    """The seed plus `steps` steps on the pooled training data, learning rate decayed as a branch's; returns it."""
    import torch
    from transformers import LlamaForCausalLM

    from senmon.ingest.store import DatasetStore
    from senmon.train.branch import branch_schedule
    from senmon.train.data import pack
    from senmon.train.fast import mixed_batches
    from senmon.train.loop import train_steps
    from senmon.train.tokenizer import load_tokenizer

    training = config.training
    tokenizer = load_tokenizer(seed_path)
    model = LlamaForCausalLM.from_pretrained(seed_path, torch_dtype=torch.float32)
    store = DatasetStore(models_root)
    blocks = pack(tokenizer, [t for d in config.domains for t in store.texts(d, "train")], training.seq_len)
    schedule = branch_schedule(steps, training.learning_rate, training.branch.learning_rate_scale,
                               training.branch.warmup_fraction)
    torch.manual_seed(training.seed)
    train_steps(model, mixed_batches(blocks, blocks[:0], training.batch_size, 0.0, training.seed), schedule)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return model.eval()


def choose(row: dict, best: str, confidence: float, policy: str, fallback: str, threshold: float, below: float,
           margin: float) -> str:
    from senmon.serve.likelihood import decide

    if policy == "always":
        return fallback
    if policy == "classifier":
        return best if confidence >= threshold else fallback
    candidates = DOMAINS + [fallback]
    if policy == "oracle":
        return min(candidates, key=lambda m: row["answer"][m])
    if confidence >= below:  # the router: the classifier when sure, else each model's likelihood of the prefix
        return best
    return decide({m: row["prefix_nll"][m] for m in candidates}, fallback, margin).chosen or fallback


def main() -> None:
    from senmon.actors.registry import serving_records_from_file
    from senmon.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="storage root of a trained system (default: the embedded "
                                                       "config's, which `make demo` fills)")
    parser.add_argument("--steps", default="38,76", help="comma-separated step counts of decayed generalists "
                                                         "('' for none)")
    parser.add_argument("--merged", action="store_true",
                        help="also try merged fallbacks: the average of the specialists' parameters, with and "
                             "without the seed")
    args = parser.parse_args()
    config = load_config()
    models_root = args.models or config.storage_root
    serve = config.serve
    corpus, extra = load()
    evaluation = evaluation_items(corpus, extra)
    scorer, versions = scorer_for(models_root, serve.likelihood_tokens, fallback="seed")  # SEED: the seed itself
    serving = serving_records_from_file(models_root, [SEED])[SEED]
    seed_path = serving["data"]["seed"]["path"] if serving.get("data", {}).get("merged_from") else serving["path"]
    fallbacks, train_s = [SEED], {}
    with tempfile.TemporaryDirectory() as scratch:
        if args.merged:
            specialist_paths = [r["path"] for r in serving_records_from_file(models_root, DOMAINS).values()]
            for name, paths in (("merged", specialist_paths), ("merged+seed", specialist_paths + [seed_path])):
                started = time.monotonic()
                scorer.add(name, merge_weights(paths), seed_path)
                train_s[name] = round(time.monotonic() - started, 1)
                fallbacks.append(name)
        for steps in [int(s) for s in args.steps.split(",") if s]:
            name = f"decayed-{steps}"
            started = time.monotonic()
            scorer.add(name, decayed_generalist(config, models_root, seed_path, steps, f"{scratch}/{name}"), seed_path)
            train_s[name] = round(time.monotonic() - started, 1)
            fallbacks.append(name)
            print(f"{name}: trained in {train_s[name]:.0f} s", flush=True)
        rows = answer_rows(scorer, evaluation)
        prefix_nll = nll_all(scorer, [row["prefix_text"] for row in rows])  # what the router's second opinion sees
        for row, nll in zip(rows, prefix_nll):
            row["prefix_nll"] = nll
    classifier = train_variant(WORDS_CHARS, False, False, corpus, extra)[0]
    routes = classifier.route([row["prefix_text"] for row in rows])
    results: dict = {}
    for fallback in fallbacks:
        for policy in ("always", "classifier", "router", "oracle"):
            deltas, to_fallback = defaultdict(list), defaultdict(list)
            for row, route in zip(rows, routes):
                chosen = choose(row, route.specialist or SEED, route.confidence, policy, fallback,
                                serve.confidence_threshold, serve.second_opinion_below, serve.likelihood_margin)
                deltas[row["group"]].append(row["answer"][chosen] - row["answer"][SEED])
                to_fallback[row["group"]].append(chosen == fallback)
            results[f"{fallback} / {policy}"] = {
                g: {"ppl_vs_seed": math.exp(float(np.mean(deltas[g]))), "to_fallback": float(np.mean(to_fallback[g])),
                    "documents": len(deltas[g])} for g in GROUPS if deltas[g]}
    print(f"\nPerplexity on the answer part relative to always asking the seed (below 1 is better); in brackets, the "
          f"share of documents the policy sends to the fallback. Router: classifier when its confidence is at least "
          f"{serve.second_opinion_below}, else the likelihood with margin {serve.likelihood_margin}; classifier alone "
          f"at {serve.confidence_threshold}.")
    print(table(["fallback / policy", *GROUPS], [[name] + [
        f"{r[g]['ppl_vs_seed']:.3f} ({r[g]['to_fallback']:.0%})" if g in r else "-" for g in GROUPS]
        for name, r in results.items()]))
    previous = Path(__file__).resolve().parent / "results" / "fallback.json"
    if previous.exists():  # fallbacks not tried this time: kept from the run that measured them, marked so
        earlier = json.loads(previous.read_text(encoding="utf-8"))
        for name, r in earlier.get("results", {}).items():
            if name not in results and not name.startswith(SEED + " /"):
                results[name] = {**r, "measured": r.get("measured", earlier.get("when")),
                                 "models": r.get("models", earlier.get("models"))}  # another training run's models
    path = write_results("fallback", {"models": versions, "steps": args.steps, "train_s": train_s,
                                      "settings": {"confidence_threshold": serve.confidence_threshold,
                                                   "second_opinion_below": serve.second_opinion_below,
                                                   "likelihood_margin": serve.likelihood_margin,
                                                   "likelihood_tokens": serve.likelihood_tokens},
                                      "documents": {g: sum(1 for r in rows if r["group"] == g) for g in GROUPS},
                                      "results": results})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
