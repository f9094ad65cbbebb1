"""The proposal's claim, measured: branched specialists vs generalists, at equal training FLOPs.

Arms, all with one shared tokenizer and scored by test perplexity per domain:
  (a)  Branch-Train: a seed trained on every domain, then one branch per domain on its own data
       (oracle routing: each domain's documents go to its own specialist);
  (a') the same specialists through the real routing model (train/routing.py), mistakes included;
  (b)  a generalist of one specialist's shape (the same inference cost per token);
  (c)  a generalist with all the specialists' non-embedding parameters together;
  (d)  specialists trained from scratch on their own domain only (senmon's previous method).
Every arm spends the same training FLOPs (6 x parameters x tokens): the seed counts against (a);
(c), being larger, takes proportionally fewer steps. Budgets are given in training tokens per
non-embedding parameter of (b). (a) and (b) run with several random seeds.

Every model is trained by `senmon.train.loop.train_steps`, the loop the Ray Train jobs run, with
the schedules of senmon.train.branch; here it runs in-process (a pool of one process per core),
because 100+ short runs would spend most of their time starting Ray Train jobs.

    python -m bench specialists                 # default: slice (budgets 10/20/60, 3 seeds) + full corpus (60)
    python -m bench.specialists --quick         # seconds-scale run of the same code (the test suite's)
    python -m bench.specialists --sweep         # seed share and branch schedule, one budget (sets defaults)
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import json
import math
import multiprocessing
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.common import table, write_results

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ["law", "code", "dictionary", "literature", "japanese"]


# --------------------------------------------------------------------------- data


def read_split(corpus: Path, split: str, domain: str, max_chars: int | None = None) -> list[str]:
    texts = [json.loads(line)["text"] for line in (corpus / split / f"{domain}.jsonl").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    if max_chars is not None:  # a deterministic sample when the full corpus is larger than the run can use
        random.Random(0).shuffle(texts)
        kept, used = [], 0
        for text in texts:
            if used >= max_chars:
                break
            kept.append(text)
            used += len(text)
        texts = kept
    return texts


# --------------------------------------------------------------------------- one training run (in a worker process)


@dataclass
class Run:
    """One model to train and score. Runs in a worker process; everything here must pickle."""

    key: str
    shape: dict
    steps: int
    peak_lr: float
    warmup_fraction: float
    blocks: np.ndarray                       # the training data, [n, seq_len]
    floor: float = 0.1                       # the cosine's end, x peak; 1.0: constant after warmup
    replay: np.ndarray | None = None         # pooled blocks mixed in at `replay_fraction`
    replay_fraction: float = 0.0
    init_state: str | None = None            # a saved state dict to start from (a branch's seed)
    save_state: bool = False
    seed: int = 0
    batch_size: int = 16
    tokenizer_json: str = ""
    test: dict[str, list[str]] = field(default_factory=dict)   # domain -> texts scored
    routed: dict[str, list[str]] = field(default_factory=dict)  # domain -> texts the router sent to this model
    state_dir: str = ""


def batches(run: Run):
    """Shuffled batches, epoch after epoch; with replay, each batch mixes in pooled blocks."""
    import torch

    from senmon.train.loop import repeat_epochs

    rng = np.random.default_rng(run.seed)
    replayed = int(round(run.batch_size * run.replay_fraction)) if run.replay is not None else 0
    own = run.batch_size - replayed

    def epoch(_: int):
        order = rng.permutation(len(run.blocks))
        for start in range(0, len(order) - own + 1, own):
            rows = run.blocks[order[start:start + own]]
            if replayed:
                rows = np.concatenate([rows, run.replay[rng.integers(0, len(run.replay), replayed)]])
            yield torch.from_numpy(rows)

    return repeat_epochs(epoch)


def nll(model, tokenizer, texts: list[str], seq_len: int) -> tuple[float, int]:
    from senmon.train.evaluate import perplexity

    result = perplexity(model, tokenizer, texts, seq_len)
    return math.log(result.perplexity) * result.tokens, result.tokens


def execute(run: Run) -> dict:
    import torch
    from tokenizers import Tokenizer

    from senmon.train.loop import Schedule, new_model, train_steps
    from senmon.train.tokenizer import wrap

    torch.set_num_threads(1)
    torch.manual_seed(run.seed)
    tokenizer = wrap(Tokenizer.from_str(run.tokenizer_json))
    seq_len = run.blocks.shape[1]
    model = new_model(run.shape, tokenizer, seq_len)
    if run.init_state:
        model.load_state_dict(torch.load(run.init_state))
    started = time.monotonic()
    final = train_steps(model, batches(run), Schedule(run.steps, run.peak_lr, run.warmup_fraction, run.floor))
    model.eval()
    out = {"key": run.key, "steps": run.steps, "tokens": final["tokens_seen"], "train_s": final["train_s"],
           "final_loss": final["loss"], "wall_s": time.monotonic() - started,
           "test": {d: nll(model, tokenizer, texts, seq_len) for d, texts in run.test.items() if texts},
           "routed": {d: nll(model, tokenizer, texts, seq_len) for d, texts in run.routed.items() if texts}}
    if run.save_state:
        out["state"] = os.path.join(run.state_dir, f"{run.key.replace('/', '_')}.pt")
        torch.save(model.state_dict(), out["state"])
    return out


# --------------------------------------------------------------------------- arms


def params_of(shape: dict, vocab: int) -> tuple[int, int]:
    from senmon.train.sizing import Shape

    s = Shape(**shape)
    return s.non_embedding_params(), s.non_embedding_params() + s.embedding_params(vocab)


class Bench:
    """Runs the arms of one setting (data scale, budget) and keeps every result."""

    def __init__(self, args, pool: futures.Executor, tokenizer_json: str, vocab: int, state_dir: str):
        self.args, self.pool, self.tokenizer_json, self.vocab, self.state_dir = args, pool, tokenizer_json, vocab, state_dir
        self.seeds: dict[tuple, futures.Future] = {}

    def steps(self, budget: float, shape: dict, seed_fraction: float) -> tuple[int, int, int]:
        """(total, seed, branch) steps of a budget in tokens per non-embedding parameter of `shape`."""
        total = max(len(DOMAINS), round(budget * params_of(shape, self.vocab)[0] / (self.args.batch * self.args.seq_len)))
        seed = round(total * seed_fraction)
        return total, seed, max(1, round((total - seed) / len(DOMAINS)))

    def seed_model(self, label: str, train_blocks: dict, test: dict, steps: int, floor: float, s: int,
                   shape: dict) -> futures.Future:
        """The seed run (started once; branch-schedule variants share it)."""
        cache = (id(train_blocks), steps, floor, s)
        if cache not in self.seeds:
            self.seeds[cache] = self.run(key=f"{label}/seed-{steps}-{floor}/{s}", shape=shape, peak_lr=self.args.lr, warmup_fraction=0.05,
                                         steps=steps, blocks=np.concatenate([train_blocks[d] for d in DOMAINS]),
                                         seed=s, save_state=True, test=test, floor=floor)
        return self.seeds[cache]

    def run(self, **kw) -> futures.Future:
        return self.pool.submit(execute, Run(batch_size=self.args.batch, tokenizer_json=self.tokenizer_json,
                                             state_dir=self.state_dir, **kw))

    def setting(self, label: str, train_blocks: dict[str, np.ndarray], test: dict[str, list[str]],
                routed: dict[str, dict[str, list[str]]], budget: float, seeds: int, shape: dict,
                big_shape: dict, seed_fraction: float, lr_scale: float, warmup: float, replay: float,
                seed_floor: float = 0.1, arms: str = "abcd") -> dict:
        """Every arm at one budget (tokens per non-embedding parameter of the base shape)."""
        a = self.args
        pooled = np.concatenate([train_blocks[d] for d in DOMAINS])
        tokens_per_step = a.batch * a.seq_len
        base_ne, base_total = params_of(shape, self.vocab)
        total_steps, seed_steps, branch_steps = self.steps(budget, shape, seed_fraction)
        big_ne, big_total = params_of(big_shape, self.vocab)
        big_steps = max(1, round(total_steps * base_total / big_total))  # equal FLOPs
        common = dict(shape=shape, peak_lr=a.lr, warmup_fraction=0.05)
        print(f"[{label}] budget {budget:g} tokens/param: {total_steps} steps of {tokens_per_step} tokens "
              f"(seed {seed_steps} + 5 x {branch_steps} branch), (c) {big_steps} steps", flush=True)
        jobs: dict[str, futures.Future] = {}
        for s in range(seeds if "b" in arms else 0):
            jobs[f"b/{s}"] = self.run(key=f"{label}/b/{s}", steps=total_steps, blocks=pooled, seed=s, test=test, **common)
        seeds_a = {}
        for s in range(seeds if "a" in arms else 0):
            seeds_a[s] = self.seed_model(label, train_blocks, test, seed_steps, seed_floor, s, shape)
        if "b" in arms and lr_scale != 1:  # is (b) held back by its learning rate? branches peak at lr x lr_scale
            jobs["b2"] = self.run(key=f"{label}/b2", steps=total_steps, blocks=pooled, seed=0, test=test,
                                  **{**common, "peak_lr": a.lr * lr_scale})
        if "c" in arms:
            jobs["c"] = self.run(key=f"{label}/c", steps=big_steps, blocks=pooled, test=test,
                                 **{**common, "shape": big_shape})
        for d in DOMAINS if "d" in arms else []:
            jobs[f"d/{d}"] = self.run(key=f"{label}/d/{d}", steps=total_steps // len(DOMAINS),
                                      blocks=train_blocks[d], test={d: test[d]}, **common)
        for s, seed_job in seeds_a.items():
            state = seed_job.result()["state"]
            jobs[f"seed/{s}"] = seed_job
            if "b" in arms:  # (b'): the same seed decayed on the pooled data, the strongest same-size generalist
                jobs[f"bw/{s}"] = self.run(
                    key=f"{label}/bw/{s}", shape=shape, steps=total_steps - seed_steps, peak_lr=a.lr * lr_scale,
                    warmup_fraction=warmup, blocks=pooled, init_state=state, seed=s, test=test)
            for d in DOMAINS:
                jobs[f"a/{s}/{d}"] = self.run(
                    key=f"{label}/a/{s}/{d}", shape=shape, steps=branch_steps, peak_lr=a.lr * lr_scale,
                    warmup_fraction=warmup, blocks=train_blocks[d], replay=pooled if replay else None,
                    replay_fraction=replay, init_state=state, seed=s, test={d: test[d]}, routed=routed.get(d, {}))
        results = {k: f.result() for k, f in jobs.items()}
        return summarise(label, budget, results, seeds if "a" in arms else 0, seeds if "b" in arms else 0, dict(
            tokens_per_step=tokens_per_step, total_steps=total_steps, seed_steps=seed_steps, branch_steps=branch_steps,
            big_steps=big_steps, seed_floor=seed_floor, params={"base_non_embedding": base_ne, "base_total": base_total,
                                         "big_non_embedding": big_ne, "big_total": big_total},
            seed_fraction=seed_fraction, branch_lr_scale=lr_scale, branch_warmup=warmup, replay=replay))


def ppl(pairs: list[tuple[float, int]]) -> float:
    return math.exp(sum(n for n, _ in pairs) / sum(t for _, t in pairs))


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "runs": values}


def summarise(label: str, budget: float, r: dict, seeds_a: int, seeds_b: int, meta: dict) -> dict:
    per_domain: dict[str, dict] = {}
    for d in DOMAINS:
        row = {}
        if seeds_a:
            row["a"] = spread([ppl([r[f"a/{s}/{d}"]["test"][d]]) for s in range(seeds_a)])
            routed = []
            for s in range(seeds_a):  # a': each test document scored by the specialist the router chose
                pairs = [r[f"a/{s}/{e}"]["routed"][d] for e in DOMAINS if d in r[f"a/{s}/{e}"]["routed"]]
                routed.append(ppl(pairs))
            row["a_routed"] = spread(routed)
            row["seed"] = spread([ppl([r[f"seed/{s}"]["test"][d]]) for s in range(seeds_a)])
        if seeds_b:
            row["b"] = spread([ppl([r[f"b/{s}"]["test"][d]]) for s in range(seeds_b)])
        if "bw/0" in r:
            row["b_seed_decayed"] = spread([ppl([r[f"bw/{s}"]["test"][d]]) for s in range(seeds_a)])
        if "b2" in r:
            row["b_branch_lr"] = ppl([r["b2"]["test"][d]])
        if "c" in r:
            row["c"] = ppl([r["c"]["test"][d]])
        if f"d/{d}" in r:
            row["d"] = ppl([r[f"d/{d}"]["test"][d]])
        per_domain[d] = row
    p = meta["params"]
    cost = {}
    if seeds_a:
        tokens = r["seed/0"]["tokens"] + sum(r[f"a/0/{d}"]["tokens"] for d in DOMAINS)
        steps = r["seed/0"]["steps"] + sum(r[f"a/0/{d}"]["steps"] for d in DOMAINS)
        cost["a"] = {"tokens": tokens, "steps": steps, "flops": 6.0 * p["base_total"] * tokens,
                     "wall_s": r["seed/0"]["wall_s"] + sum(r[f"a/0/{d}"]["wall_s"] for d in DOMAINS),
                     "params_per_token": p["base_total"]}
    if seeds_b:
        if "bw/0" in r:
            tokens = r["seed/0"]["tokens"] + r["bw/0"]["tokens"]
            cost["b'"] = {"tokens": tokens, "steps": r["seed/0"]["steps"] + r["bw/0"]["steps"],
                          "flops": 6.0 * p["base_total"] * tokens, "wall_s": r["seed/0"]["wall_s"] + r["bw/0"]["wall_s"],
                          "params_per_token": p["base_total"]}
        cost["b"] = {"tokens": r["b/0"]["tokens"], "steps": r["b/0"]["steps"],
                     "flops": 6.0 * p["base_total"] * r["b/0"]["tokens"], "wall_s": r["b/0"]["wall_s"],
                     "params_per_token": p["base_total"]}
    if "c" in r:
        cost["c"] = {"tokens": r["c"]["tokens"], "steps": r["c"]["steps"], "flops": 6.0 * p["big_total"] * r["c"]["tokens"],
                     "wall_s": r["c"]["wall_s"], "params_per_token": p["big_total"]}
    if "d/law" in r:
        tokens = sum(r[f"d/{d}"]["tokens"] for d in DOMAINS)
        cost["d"] = {"tokens": tokens, "steps": sum(r[f"d/{d}"]["steps"] for d in DOMAINS),
                     "flops": 6.0 * p["base_total"] * tokens, "wall_s": sum(r[f"d/{d}"]["wall_s"] for d in DOMAINS),
                     "params_per_token": p["base_total"]}
    return {"label": label, "budget_tokens_per_param": budget, **meta, "per_domain": per_domain, "cost": cost,
            "final_loss": {k: v["final_loss"] for k, v in r.items()}}


def geo(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def print_setting(s: dict) -> list[list]:
    rows = []
    pd = s["per_domain"]
    for d in DOMAINS:
        row = pd[d]
        a, b = row.get("a", {}).get("mean"), row.get("b", {}).get("mean")
        bw = row.get("b_seed_decayed", {}).get("mean")
        rows.append([d, _f(a), _f(row.get("a_routed", {}).get("mean")), _f(b), _f(bw), _f(row.get("b_branch_lr")),
                     _f(row.get("c")), _f(row.get("d")),
                     _f(row.get("seed", {}).get("mean")),
                     _r(a, b), _r(row.get("a", {}).get("max"), row.get("b", {}).get("min")), _r(a, bw),
                     _r(a, row.get("c")), _r(row.get("a_routed", {}).get("mean"), b)])
    def g(key):
        vals = [pd[d][key]["mean"] if isinstance(pd[d].get(key), dict) else pd[d].get(key) for d in DOMAINS]
        return geo(vals) if all(v is not None for v in vals) else None
    ga, gb = g("a"), g("b")
    rows.append(["geometric mean", _f(ga), _f(g("a_routed")), _f(gb), _f(g("b_seed_decayed")), _f(g("b_branch_lr")),
                 _f(g("c")), _f(g("d")), _f(g("seed")),
                 _r(ga, gb), "", _r(ga, g("b_seed_decayed")), _r(ga, g("c")), _r(g("a_routed"), gb)])
    print(f"\n{s['label']}, budget {s['budget_tokens_per_param']:g} tokens per parameter of (b): test perplexity "
          f"(mean over seeds; ratios below 1 favour the specialists)")
    print(table(["domain", "(a) branched", "(a') routed", "(b) same size", "(b') seed decayed", "(b) at branch lr",
                 "(c) all params", "(d) scratch", "seed", "a/b", "worst a/best b", "a/b'", "a/c", "a'/b"], rows))
    cost_rows = [[arm, f"{c['flops']:.2e}", f"{c['tokens']:,}", c["steps"], f"{c['wall_s']:.0f}", f"{c['params_per_token']:,}"]
                 for arm, c in s["cost"].items()]
    print(table(["arm", "training FLOPs", "tokens", "optimizer steps", "train s (1 seed)", "params per token"], cost_rows))
    return rows


def _f(v) -> str:
    return "" if v is None else f"{v:.1f}"


def _r(x, y) -> str:
    return "" if x is None or y is None else f"{x / y:.2f}"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO / "data" / "corpus", help="the shipped slice")
    parser.add_argument("--full-corpus", type=Path, default=REPO / "var" / "corpus-full",
                        help="the prepared full corpus (python -m senmon.ingest.prepare); skipped when absent")
    parser.add_argument("--full-chars", type=int, default=3_000_000, help="training characters per domain taken "
                                                                          "from the full corpus")
    parser.add_argument("--budgets", default="10,20,60", help="training tokens per non-embedding parameter of (b)")
    parser.add_argument("--full-budget", type=float, default=60, help="the budget the full corpus is run at")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=None, help="default: the embedded config's (as for the next four)")
    parser.add_argument("--seq-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--hidden", type=int, default=32, help="(b)'s shape: the embedded demo's specialist shape")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed-fraction", type=float, default=None, help="default: the embedded config's")
    parser.add_argument("--branch-lr-scale", type=float, default=None)
    parser.add_argument("--branch-warmup", type=float, default=None)
    parser.add_argument("--seed-schedule", choices=["cosine", "constant"], default=None,
                        help="the seed's learning rate: cosine decay, or constant after warmup (its branches decay)")
    parser.add_argument("--replay", type=float, default=0.0, help="share of each branch batch from the pooled data")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the same code in seconds (tests)")
    parser.add_argument("--sweep", action="store_true", help="seed share x branch schedule at one budget, one seed")
    parser.add_argument("--out", default="specialists", help="results name under bench/results")
    args = parser.parse_args(argv)

    import yaml

    from senmon.config import DEFAULT_CONFIG, parse_config
    from senmon.train.branch import SEED_FLOOR

    training = parse_config(yaml.safe_load(DEFAULT_CONFIG.read_text(encoding="utf-8")), source="bench",
                            base_dir=REPO / "configs").training
    args.vocab = args.vocab or training.vocab_size
    args.seq_len = args.seq_len or training.seq_len
    args.batch = args.batch or training.batch_size
    args.lr = args.lr or training.learning_rate
    seed_fraction = args.seed_fraction or training.seed_fraction
    lr_scale = args.branch_lr_scale or training.branch.learning_rate_scale
    warmup = args.branch_warmup if args.branch_warmup is not None else training.branch.warmup_fraction
    seed_floor = SEED_FLOOR[args.seed_schedule or training.seed_schedule]
    if args.quick:
        args.vocab, args.seq_len, args.batch, args.seeds, args.budgets = 512, 32, 4, 2, "4"
        args.full_corpus, args.hidden, args.layers = None, 32, 1
    budgets = [float(b) for b in args.budgets.split(",")]

    from senmon.train.sizing import choose_size, shape_for_hidden
    from senmon.train.routing import RoutingModel
    from senmon.train.data import pack
    from senmon.train.tokenizer import train_tokenizer
    from dataclasses import asdict

    started = time.monotonic()
    limit = 40_000 if args.quick else None
    train_texts = {d: read_split(args.corpus, "train", d, limit) for d in DOMAINS}
    test = {d: read_split(args.corpus, "test", d, limit and limit // 4) for d in DOMAINS}
    tokenizer = train_tokenizer([t for d in DOMAINS for t in train_texts[d]], args.vocab)
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    vocab = len(tokenizer)
    shape = asdict(shape_for_hidden(args.hidden, args.layers))
    base_ne = shape_for_hidden(args.hidden, args.layers).non_embedding_params()
    big = choose_size(1, vocab, min_params=base_ne * len(DOMAINS), max_params=base_ne * len(DOMAINS))
    big_shape = asdict(big.shape)

    router = RoutingModel.train(train_texts, seed=0)  # (a'): the routing model senmon serves, on the same split
    routed: dict[str, dict[str, list[str]]] = {d: {} for d in DOMAINS}  # specialist -> domain -> texts
    for d in DOMAINS:
        for text, route in zip(test[d], router.route(test[d])):
            routed[route.specialist].setdefault(d, []).append(text)
    routing_accuracy = {d: len(routed[d].get(d, [])) / len(test[d]) for d in DOMAINS}

    scales = {"slice": {d: pack(tokenizer, train_texts[d], args.seq_len) for d in DOMAINS}}
    if args.full_corpus and (args.full_corpus / "train").exists():
        scales["full"] = {d: pack(tokenizer, read_split(args.full_corpus, "train", d, args.full_chars), args.seq_len)
                          for d in DOMAINS}
    data = {name: {d: int(blocks[d].size) for d in DOMAINS} for name, blocks in scales.items()}
    print(f"tokenizer {vocab}, (b) shape {shape} ({base_ne:,} non-embedding), (c) shape {big_shape}; "
          f"training tokens per domain: {data}; routing accuracy on test documents: "
          + ", ".join(f"{d} {v:.2f}" for d, v in routing_accuracy.items()), flush=True)

    settings = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as state_dir, \
            futures.ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        bench = Bench(args, pool, tokenizer_json, vocab, state_dir)
        if args.sweep:  # seed share x seed schedule x branch peak, at the middle budget, one random seed
            budget = budgets[len(budgets) // 2]
            grid = [(floor, warm, fraction) for floor, warm in ((0.1, 0.1), (1.0, 0.0)) for fraction in (0.5, 0.75, 0.9)]
            for floor, _, fraction in grid:  # every seed first, so both workers stay busy
                bench.seed_model("slice", scales["slice"], test, bench.steps(budget, shape, fraction)[1], floor, 0, shape)
            for seed_floor, warm in ((0.1, 0.1), (1.0, 0.0)):  # cosine seed + re-warmed branch; constant seed
                for fraction in (0.5, 0.75, 0.9):
                    for scale in (1.0, 2.0):
                        label = (f"sweep seed {'cosine' if seed_floor < 1 else 'constant'} f={fraction} "
                                 f"branch lr x{scale}")
                        first = not settings
                        settings.append(bench.setting(label, scales["slice"], test, routed, budget, 1, shape, big_shape,
                                                      fraction, scale, warm, 0.0, seed_floor,
                                                      arms="ab" if first else "a"))
                        print_setting(settings[-1])
        else:
            for budget in budgets:
                settings.append(bench.setting("slice", scales["slice"], test, routed, budget, args.seeds, shape,
                                              big_shape, seed_fraction, lr_scale, warmup, args.replay, seed_floor))
                print_setting(settings[-1])
                if not args.quick:  # what is done so far survives an interrupted run
                    write_results(args.out, {"partial": True, "settings": settings, "wall_s": time.monotonic() - started})
            if "full" in scales:
                settings.append(bench.setting("full", scales["full"], test, routed, args.full_budget, 1, shape,
                                              big_shape, seed_fraction, lr_scale, warmup, args.replay, seed_floor,
                                              arms="ab"))
                print_setting(settings[-1])

    wall = time.monotonic() - started
    if not args.sweep:
        print("\n(a)/(b') per domain against the budget (tokens per parameter of (b)):")
        rows = [[s["label"], f"{s['budget_tokens_per_param']:g}"]
                + [_r(s["per_domain"][d]["a"]["mean"], s["per_domain"][d]["b_seed_decayed"]["mean"]) for d in DOMAINS]
                for s in settings]
        print(table(["data", "budget", *DOMAINS], rows))
        print("\n(a)/(b) per domain against the budget (tokens per parameter of (b)):")
        rows = [[s["label"], f"{s['budget_tokens_per_param']:g}"]
                + [_r(s["per_domain"][d]["a"]["mean"], s["per_domain"][d]["b"]["mean"]) for d in DOMAINS]
                for s in settings]
        print(table(["data", "budget", *DOMAINS], rows))
    print(f"\nwall time {wall:.0f} s")
    payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "tokenizer_vocab": vocab, "shape_b": shape, "shape_c": big_shape, "training_tokens_per_domain": data,
               "routing_accuracy_test_documents": routing_accuracy, "settings": settings, "wall_s": wall}
    if not args.quick:
        path = write_results(args.out, payload)
        print(f"results: {path}")
    return payload


if __name__ == "__main__":
    # The worker processes unpickle `execute` and `Run` by module name, and `python -m bench` runs this file
    # as __main__ of another module: run the importable copy.
    from bench.specialists import main as run_main

    run_main()
