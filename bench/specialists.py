"""The proposal's claim, measured: routed specialists vs generalists, for the same training tokens.

(a) one specialist per domain, each sized by the Chinchilla rule for its own tokens;
(b) a generalist with one specialist's parameters (the same inference cost per token);
(c) a generalist with all specialists' parameters together (compute-optimal for all tokens).
All three see the same total training tokens and share one tokenizer; each is scored by test
perplexity per domain (for (a), the specialist of that domain: oracle routing by the label).
Usage: python -m bench.specialists [--corpus DIR] [--epochs N]
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import ray
import ray.data
import yaml

from bench.common import table, write_results
from senmon.config import DEFAULT_CONFIG, SizeConfig, parse_config
from senmon.ingest.store import DatasetStore
from senmon.train.job import evaluate_checkpoint, train_model

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(REPO / "data" / "corpus"), help="prepared corpus directory")
    parser.add_argument("--epochs", type=int, default=None, help="override training.epochs")
    parser.add_argument("--storage", default=str(REPO / "var" / "bench-specialists"))
    args = parser.parse_args()

    data = yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8"))
    shutil.rmtree(args.storage, ignore_errors=True)
    data.update(storage_root=args.storage, corpus_dir=args.corpus)
    if args.epochs:
        data["training"]["epochs"] = args.epochs
    config = parse_config(data, source="bench", base_dir=REPO / "configs")
    ray.init(num_cpus=config.ray.num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = DatasetStore(config.storage_root)
    store.seed_from_corpus(config.corpus_dir, config.domains)
    domains = config.domains

    def run(name: str, size: SizeConfig | None = None) -> dict:
        started = time.monotonic()
        result = train_model(config, name, size_override=size)
        test = ray.get(evaluate_checkpoint.remote(result.checkpoint_path, config.storage_root, domains, "test",
                                                  config.training.seq_len))
        print(f"  {name}: {result.sizing['non_embedding_params']:,} params, val ppl {result.metrics['val_ppl']:.1f}, "
              f"{time.monotonic() - started:.0f} s", flush=True)
        return {"sizing": result.sizing, "metrics": {k: v for k, v in result.metrics.items() if k != "loss_curve"},
                "test": test, "wall_s": time.monotonic() - started, "tokens_seen": result.data["tokens_seen"]}

    print("(a) specialists")
    specialists = {spec.name: run(spec.name) for spec in config.specialists}
    params = [r["sizing"]["non_embedding_params"] for r in specialists.values()]
    mean_params, total_params = int(sum(params) / len(params)), sum(params)
    print(f"(b) generalist with one specialist's parameters (~{mean_params:,})")
    small = run(config.generalist.name, SizeConfig(min_params=mean_params, max_params=mean_params))
    print(f"(c) generalist with all specialists' parameters (~{total_params:,})")
    large = run(config.generalist.name, SizeConfig(min_params=total_params, max_params=total_params))

    rows, per_domain = [], {}
    for spec in config.specialists:
        for domain in spec.domains:
            a = specialists[spec.name]["test"][domain]["perplexity"]
            b, c = small["test"][domain]["perplexity"], large["test"][domain]["perplexity"]
            per_domain[domain] = {"specialist": a, "generalist_same_size": b, "generalist_all_params": c}
            rows.append([domain, f"{a:.1f}", f"{b:.1f}", f"{c:.1f}", f"{a / b:.2f}", f"{a / c:.2f}"])

    def geo(key: str) -> float:
        return math.exp(sum(math.log(v[key]) for v in per_domain.values()) / len(per_domain))

    rows.append(["geometric mean", f"{geo('specialist'):.1f}", f"{geo('generalist_same_size'):.1f}",
                 f"{geo('generalist_all_params'):.1f}", f"{geo('specialist') / geo('generalist_same_size'):.2f}",
                 f"{geo('specialist') / geo('generalist_all_params'):.2f}"])

    def cost(entries: list[dict], inference_params: int) -> list:
        flops = sum(e["sizing"]["train_flops"] for e in entries)
        wall = sum(e["wall_s"] for e in entries)
        tokens = sum(e["tokens_seen"] for e in entries)
        train_s = sum(e["metrics"]["train_s"] for e in entries)
        return [f"{flops:.2e}", f"{tokens:,}", f"{wall:.0f}", f"{tokens / train_s:,.0f}", f"{inference_params:,}"]

    spec_entries = list(specialists.values())
    costs = [
        ["(a) specialists"] + cost(spec_entries, int(sum(e["sizing"]["total_params"] for e in spec_entries) / len(spec_entries))),
        ["(b) generalist, one specialist's size"] + cost([small], small["sizing"]["total_params"]),
        ["(c) generalist, all parameters"] + cost([large], large["sizing"]["total_params"]),
    ]
    print("\nTest perplexity per domain (lower is better; ratios below 1 favour the specialists)")
    print(table(["domain", "(a) specialist", "(b) generalist same size", "(c) generalist all params", "a/b", "a/c"], rows))
    print("\nCost")
    print(table(["model", "training FLOPs", "tokens seen", "wall s", "train tokens/s", "params used per token"], costs))
    path = write_results("specialists", {
        "corpus": args.corpus, "training": config.training.model_dump(),
        "per_domain_test_ppl": per_domain,
        "geometric_mean": {k: geo(k) for k in ("specialist", "generalist_same_size", "generalist_all_params")},
        "specialists": specialists, "generalist_same_size": small, "generalist_all_params": large,
        "cost_table": costs,
    })
    print(f"\nresults: {path}")
    ray.shutdown()


if __name__ == "__main__":
    main()
