"""Would the models predict unseen sources better if they trained on more than one source per domain?

    python -m senmon.ingest.extra_sources        # once: the allowed extra sources, under var/sources
    python -m bench other_sources                # -> bench/results/other_sources.json (27 min on 2 cores)

The routing model already trains on each domain's other sources (data/routing); the models do not: every
specialist and the generalist train on the shipped corpus, one source per domain. This measures, leave one source
out (bench/routing.py's two folds: a fold's sources are held out, the other fold's may be trained on), whether
adding the other sources' `train` split to the models' data makes them better on a source none of them saw:

- corpus: the seed (the generalist) and one branch per domain on the shipped corpus, as `senmon` trains them;
- equal compute: the same steps, the corpus plus the fold's trainable sources (each branch on its own domain's);
- budget rule: the same data, with the steps `plan_budget` gives for it (2 epochs of the larger pool, 75% of
  them the seed's), as `senmon train` would run if the store held that text;
- corpus, longer: the corpus alone for the budget rule's steps (more epochs of it), so that "budget rule" against
  it is the other sources' effect at equal compute, and against "corpus" that of the steps as well.

Every model is trained by `train_steps` in-process (bench/specialists.py's runner), the embedded config's
tokenizer size, sequence, batch and learning rate, and the specialists benchmark's shape (hidden 32, 2 layers); the
tokenizer is trained on the corpus alone, as the system's is. Scored: perplexity on each held-out source (its
validation and test documents, up to EVAL_DOCS) and on the corpus's test split, of the seed and of the domain's
specialist in each arm.
"""

from __future__ import annotations

import concurrent.futures as futures
import math
import multiprocessing
import random
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.common import table, write_results
from bench.routing import FOLDS, SOURCES, read_jsonl
from bench.specialists import Run, execute, read_split

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["law", "code", "dictionary", "literature", "japanese"]
EVAL_DOCS = 120
ARMS = ("corpus, longer", "equal compute", "budget rule")  # compared with "corpus", fold by fold


def source_texts(name: str, splits: set[str]) -> list[str]:
    return [r["text"] for r in read_jsonl(SOURCES / f"{name}.jsonl") if r["split"] in splits]


def ppl(pair: tuple[float, int]) -> float:
    return math.exp(pair[0] / pair[1])


def main() -> dict:
    import yaml

    from senmon.config import DEFAULT_CONFIG, parse_config
    from senmon.ingest.sources.extra import EXTRA_SOURCES
    from senmon.train.branch import SEED_FLOOR, plan_budget
    from senmon.train.data import pack
    from senmon.train.sizing import shape_for_hidden
    from senmon.train.tokenizer import train_tokenizer

    if not (SOURCES / "MANIFEST.json").exists():
        sys.exit(f"no extra sources under {SOURCES}: run `python -m senmon.ingest.extra_sources` first")
    training = parse_config(yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8")), source="bench",
                            base_dir=REPO / "configs").training
    seq, batch, lr = training.seq_len, training.batch_size, training.learning_rate
    floor = SEED_FLOOR[training.seed_schedule]
    started = time.monotonic()

    train = {d: read_split(REPO / "data" / "corpus", "train", d) for d in DOMAINS}
    tokenizer = train_tokenizer([t for d in DOMAINS for t in train[d]], training.vocab_size)
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    corpus_blocks = {d: pack(tokenizer, train[d], seq) for d in DOMAINS}
    others = {d: [n for n, (domain, _, _) in EXTRA_SOURCES.items() if domain == d] for d in DOMAINS}
    other_blocks = {n: pack(tokenizer, source_texts(n, {"train"}), seq) for d in DOMAINS for n in others[d]}
    test = {f"{d}/corpus": read_split(REPO / "data" / "corpus", "test", d) for d in DOMAINS}
    for d in DOMAINS:
        for n in others[d]:
            texts = source_texts(n, {"validation", "test"})
            random.Random(0).shuffle(texts)
            test[f"{d}/{n}"] = texts[:EVAL_DOCS]

    def fold_of(key: str) -> int | None:
        source = key.split("/", 1)[1]
        return next((k for k, fold in enumerate(FOLDS) if source in fold), None)

    def blocks_for(domain: str, fold: int | None) -> np.ndarray:
        """The domain's corpus blocks, plus (fold given) its other sources but those the fold holds out."""
        parts = [corpus_blocks[domain]]
        if fold is not None:
            parts += [other_blocks[n] for n in others[domain] if n not in FOLDS[fold]]
        return np.concatenate(parts)

    def plan(pooled: int) -> tuple[int, int]:
        p = plan_budget(pooled, training.epochs, batch, seq, training.seed_fraction, len(DOMAINS))
        return p.seed_steps, p.branch_steps

    shape = asdict(shape_for_hidden(32, 2))
    corpus_steps = plan(sum(len(b) for b in corpus_blocks.values()))
    setups = {"corpus": (None, corpus_steps)}  # name: (the fold whose sources it trains on, or None; steps)
    for fold in range(len(FOLDS)):
        pooled = sum(len(blocks_for(d, fold)) for d in DOMAINS)
        setups[f"corpus, longer/{fold}"] = (None, plan(pooled))
        setups[f"equal compute/{fold}"] = (fold, corpus_steps)
        setups[f"budget rule/{fold}"] = (fold, plan(pooled))
    print("steps (seed, branch): " + ", ".join(f"{k} {v[1]}" for k, v in setups.items()), flush=True)

    def scoring_fold(name: str) -> int | None:
        return int(name.rsplit("/", 1)[1]) if "/" in name else None

    def scored(fold: int | None, domain: str | None) -> dict[str, list[str]]:
        """What a model is scored on: the corpus test split and the sources its fold holds out (every fold's,
        for the corpus arm), of its own domain (a branch) or of every domain (a seed)."""
        return {k: v for k, v in test.items() if (domain is None or k.startswith(domain + "/"))
                and (k.endswith("/corpus") or fold is None or fold_of(k) == fold)}

    results: dict[str, dict] = {}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as state_dir, \
            futures.ProcessPoolExecutor(2, mp_context=context) as pool:
        def run(**kw) -> futures.Future:
            return pool.submit(execute, Run(batch_size=batch, tokenizer_json=tokenizer_json, state_dir=state_dir,
                                            shape=shape, **kw))

        seeds = {name: run(key=f"{name}/seed", steps=steps[0], peak_lr=lr, warmup_fraction=0.05, floor=floor,
                           blocks=np.concatenate([blocks_for(d, fold) for d in DOMAINS]), save_state=True,
                           test=scored(scoring_fold(name), None))
                 for name, (fold, steps) in setups.items()}
        branches = {}
        for name, (fold, steps) in setups.items():
            state = seeds[name].result()["state"]
            for d in DOMAINS:
                branches[(name, d)] = run(
                    key=f"{name}/{d}", steps=steps[1], peak_lr=lr * training.branch.learning_rate_scale,
                    warmup_fraction=training.branch.warmup_fraction, blocks=blocks_for(d, fold),
                    init_state=state, test=scored(scoring_fold(name), d))
        for name, future in seeds.items():
            out = future.result()
            results.setdefault(name, {})["seed"] = {k: ppl(v) for k, v in out["test"].items()}
            results[name]["seed_train_s"] = out["train_s"]
        for (name, d), future in branches.items():
            results[name].setdefault("specialist", {}).update({k: ppl(v) for k, v in future.result()["test"].items()})

    rows, logs = [], {}
    for key in test:
        for fold in ([fold_of(key)] if fold_of(key) is not None else range(len(FOLDS))):
            group = "corpus" if key.endswith("/corpus") else "heldout"
            base_seed, base_spec = results["corpus"]["seed"][key], results["corpus"]["specialist"][key]
            row = [f"{key}" + ("" if fold_of(key) is not None else f" (fold {fold})"),
                   f"{base_seed:.1f}", f"{base_spec:.1f}", f"{base_spec / base_seed:.2f}"]
            spec = {arm: results[f"{arm}/{fold}"]["specialist"][key] for arm in ARMS}
            for arm in ARMS:
                row += [f"{results[f'{arm}/{fold}']['seed'][key]:.1f}", f"{spec[arm]:.1f}",
                        f"{spec[arm] / base_spec:.2f}"]
                logs.setdefault(f"{arm} / corpus", {}).setdefault(group, []).append(math.log(spec[arm] / base_spec))
            row.append(f"{spec['budget rule'] / spec['corpus, longer']:.2f}")
            logs.setdefault("budget rule / corpus, longer", {}).setdefault(group, []).append(
                math.log(spec["budget rule"] / spec["corpus, longer"]))
            rows.append(row)
    print("\nPerplexity of the seed (the generalist) and of the domain's specialist; 'x corpus': that specialist "
          "against the corpus-only one (below 1: better); last column: the other sources' effect at the budget "
          "rule's steps")
    print(table(["text", "corpus: seed", "specialist", "spec/seed",
                 *[f"{arm}: {c}" for arm in ARMS for c in ("seed", "specialist", "x corpus")],
                 "budget rule / corpus, longer"], rows))
    geo = {ratio: {group: math.exp(sum(v) / len(v)) for group, v in groups.items()} for ratio, groups in logs.items()}
    print("\nGeometric means of the specialists' ratios:")
    print(table(["ratio", "held-out sources", "corpus test"],
                [[r, f"{g['heldout']:.3f}", f"{g['corpus']:.3f}"] for r, g in geo.items()]))
    wall = time.monotonic() - started
    print(f"wall time {wall:.0f} s")
    path = write_results("other_sources", {
        "folds": [sorted(f) for f in FOLDS], "shape": shape, "steps": {k: v[1] for k, v in setups.items()},
        "eval_docs_per_source": EVAL_DOCS, "perplexity": results, "specialist_ratio_geomean": geo,
        "wall_s": wall})
    print(f"results: {path}")
    return results


if __name__ == "__main__":
    main()
