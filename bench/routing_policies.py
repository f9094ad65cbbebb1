"""Other ways to combine the routing classifier with the likelihood second opinion, beside the router's own.

    python -m bench routing_policies --models var/demo     # -> bench/results/routing_policies.json

`python -m bench routing` chooses the router's two settings (ask the likelihood below a classifier confidence;
a specialist must beat the fallback by a margin). This benchmark asks whether a different *rule* would meet more of
issue 10's goals (labels on held-out sources, no-domain text to the fallback, few false fallbacks) without worse
answers or a slower second opinion. Same data, folds and measures as bench/routing.py (each text scored by the
classifier fold that never trained on its source; answers: perplexity on a document's next tokens after routing on
its first 64, relative to always asking the fallback), on a trained system's serving models (`--models`):

- the router: below `serve.second_opinion_below`, the likelihood of every serving model decides (serve/router.py);
- top k: the second opinion scores only the classifier's k likeliest specialists and the fallback (cheaper);
- posterior: the second opinion picks the specialist by its likelihood plus w times the classifier's log
  probability (c-BTM's p(domain | x) with the classifier as the prior), the fallback by the margin as before;
- a stricter code bar: the likelihood is also asked below 0.9 when the classifier says code (where most no-domain
  text lands);
- always check: every prompt, the classifier's specialist must beat the fallback's likelihood (margin 0), and
  below the router's confidence the router's rule decides.

It also times one second opinion over every model and over four (one prompt per call, as the router calls it).
"""

from __future__ import annotations

import math
import random
import statistics
import time

from bench.common import table, write_results
from bench.routing import (DOMAINS, NO_DOMAIN, ROUTER_MORNING, VARIANTS, answer_quality, answer_rows, balanced_accuracy,
                           evaluation_items, load, nll_all, pct, probabilities, rate, scorer_for, train_variant)

FALLBACK = "generalist"


def router(p: dict, nll: dict, below: float, margin: float, k: int | None = None, w: float = 0.0
           ) -> tuple[str, bool]:
    """(label, NO_DOMAIN for the fallback; whether the second opinion was asked)."""
    best = max(p, key=p.get)
    if p[best] >= below:
        return best, False
    candidates = sorted(p, key=p.get, reverse=True)[:k] if k else list(p)
    chosen = max(candidates, key=lambda d: w * math.log(max(p[d], 1e-9)) - nll[d])
    return (chosen if nll[FALLBACK] - nll[chosen] >= margin else NO_DOMAIN), True


def policies(below: float, margin: float) -> dict:
    def code_bar(p, n):
        return router(p, n, 0.9 if max(p, key=p.get) == "code" else below, margin)

    def always_check(p, n):
        best = max(p, key=p.get)
        if p[best] >= below:
            return (best if n[FALLBACK] - n[best] >= 0.0 else NO_DOMAIN), True
        return router(p, n, below, margin)

    return {
        f"the router (below {below}, margin {margin})": lambda p, n: router(p, n, below, margin),
        "top 3 + fallback": lambda p, n: router(p, n, below, margin, k=3),
        "top 2 + fallback": lambda p, n: router(p, n, below, margin, k=2),
        "top 1 + fallback": lambda p, n: router(p, n, below, margin, k=1),
        "posterior w=0.2, margin 0": lambda p, n: router(p, n, below, 0.0, w=0.2),
        "posterior w=0.5, margin 0": lambda p, n: router(p, n, below, 0.0, w=0.5),
        "code below 0.9": code_bar,
        "always check best vs fallback": always_check,
    }


def measure(evaluation, probs, nll, rows, row_probs, row_nll, policy) -> dict:
    decided = [policy(p, n) for p, n in zip(probs, nll)]
    chosen = [c for c, _ in decided]
    quality = answer_quality(rows, [policy(p, n)[0] for p, n in zip(row_probs, row_nll)])["by_group"]

    def share(test, group, form=None, label=None) -> float | None:
        return rate([test(c) for c, e in zip(chosen, evaluation) if e["group"] == group
                     and (form is None or e["form"] == form) and (label is None or e["label"] == label)])

    return {
        "asked_validation": rate([f for (_, f), e in zip(decided, evaluation) if e["group"] == "validation"]),
        "asked_heldout_and_no_domain": rate([f for (_, f), e in zip(decided, evaluation)
                                             if e["group"] in ("heldout", "ood-test")]),
        "validation_balanced_labels": balanced_accuracy(evaluation, chosen),
        "answers_vs_fallback": {g: quality[g]["ppl_vs_generalist"] for g in ("validation", "heldout", "ood-test",
                                                                               "corpus-test")},
        "heldout_accuracy": {d: {f: share(lambda c, d=d: c == d, "heldout", f, d) for f in ("whole", "snippet")}
                             for d in DOMAINS},
        "no_domain_to_fallback": {f: share(lambda c: c == NO_DOMAIN, "ood-test", f) for f in ("whole", "snippet")},
        "in_domain_to_fallback": {f: share(lambda c: c == NO_DOMAIN, "heldout", f) for f in ("whole", "snippet")},
    }


def second_opinion_ms(scorer, evaluation: list[dict], prompts: int = 200) -> dict:
    """One second opinion per call over every serving model, and over four of them (three specialists and the
    fallback: the forward pass a top-3 second opinion would cost). Each set in a block of its own, because the
    scorer stacks the models it is asked for anew when the set changes (a per-prompt top 3 would have to slice the
    stacked weights instead); the first round of each is a warm-up."""
    texts = [e["text"] for e in evaluation if e["group"] in ("heldout", "ood-test")]
    texts = random.Random(0).sample(texts, min(prompts, len(texts)))
    four = [n for n in scorer.models if n != FALLBACK][:3] + [FALLBACK]
    times: dict[str, list[float]] = {"all": [], "four": []}
    for round_ in range(2):
        for name, names in (("all", None), ("four", four)):
            for text in texts:
                started = time.perf_counter()
                scorer.nll([text], names)
                if round_:
                    times[name].append((time.perf_counter() - started) * 1000)
    return {name: {"models": len(scorer.models) if name == "all" else len(four), "p50_ms": statistics.median(v),
                   "p99_ms": sorted(v)[int(0.99 * (len(v) - 1))]} for name, v in times.items()}


def main() -> None:
    import argparse

    from senmon.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="storage root of a trained system (default: the embedded "
                                                       "config's, which `make demo` fills)")
    args = parser.parse_args()
    config = load_config()
    models_root = args.models or config.storage_root
    below, margin = config.serve.second_opinion_below, config.serve.likelihood_margin
    corpus, extra = load()
    evaluation = evaluation_items(corpus, extra)
    scorer, versions = scorer_for(models_root, config.serve.likelihood_tokens)
    print(f"models: {', '.join(f'{m} v{v}' for m, v in versions.items())} from {models_root}", flush=True)
    classifiers = train_variant(*VARIANTS[ROUTER_MORNING], corpus, extra)  # the specialists alone: no none class
    rows = answer_rows(scorer, evaluation)
    row_probs = probabilities(classifiers, rows, key="prefix_text")
    row_nll = nll_all(scorer, [row["prefix_text"] for row in rows])
    probs = probabilities(classifiers, evaluation)
    nll = nll_all(scorer, [item["text"] for item in evaluation])
    results = {name: measure(evaluation, probs, nll, rows, row_probs, row_nll, policy)
               for name, policy in policies(below, margin).items()}
    cost = second_opinion_ms(scorer, evaluation)

    print("\nAnswers: perplexity relative to always asking the fallback (lower is better); labels: held-out sources, "
          "whole / snippet %")
    print(table(["policy", "asked (validation)", "answers: validation / held-out / no domain / corpus test",
                 *DOMAINS, "no domain -> fb", "in-domain -> fb"],
                [[name, pct(r["asked_validation"]),
                  " / ".join(f"{r['answers_vs_fallback'][g]:.3f}" for g in ("validation", "heldout", "ood-test",
                                                                            "corpus-test")),
                  *[f"{pct(r['heldout_accuracy'][d]['whole'])} / {pct(r['heldout_accuracy'][d]['snippet'])}"
                    for d in DOMAINS],
                  f"{pct(r['no_domain_to_fallback']['whole'])} / {pct(r['no_domain_to_fallback']['snippet'])}",
                  f"{pct(r['in_domain_to_fallback']['whole'])} / {pct(r['in_domain_to_fallback']['snippet'])}"]
                 for name, r in results.items()]))
    print("\nOne second opinion, one prompt per call: " + "; ".join(
        f"{name} ({c['models']} models) p50 {c['p50_ms']:.2f} / p99 {c['p99_ms']:.2f} ms" for name, c in cost.items()))
    path = write_results("routing_policies", {"models": versions, "below": below, "margin": margin,
                                              "policies": results, "second_opinion": cost})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
