"""Routing on text it has never seen: leave-one-source-out accuracy, the fallback on text of no domain, latency.

    python -m senmon.ingest.extra_sources        # once: the held-out sources, under var/sources (not shipped)
    python -m bench routing                      # -> bench/results/routing.json

Every routing model variant is trained on the shipped corpus (data/corpus, train split) and tested on documents
of the same five kinds from sources the corpus does not use (ingest/sources/extra.py), per domain, on whole
documents and on one 100-character snippet of each. "more sources" variants also train on the extra sources,
leave-one-source-out: two folds, each holding out one source per domain (and some of the no-domain sources);
every held-out text is scored by the fold's model that never saw its source. "none class" variants add a class
for text of no domain, trained on the other fold's no-domain sources.

The fallback threshold is chosen on validation text only: the corpus's validation split and the `validation`
split of the extra sources (in-domain and no-domain), never on what is reported. Reported on the rest: the share
of no-domain text that falls back, and the share of in-domain text that falls back when it should not (held-out
sources and the corpus's own test split). Latency: one prompt per `route` call, as the router calls it.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.common import table, write_results
from senmon.ingest.sources.extra import EXTRA_SOURCES, NO_DOMAIN
from senmon.train.routing import CHAR13, WORDS_CHARS, RoutingModel

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
SOURCES = REPO / "var" / "sources"
DOMAINS = ["law", "code", "dictionary", "literature", "japanese"]
SNIPPET = 100
EVAL_DOCS_PER_SOURCE = 150  # held-out documents scored per source (sampled by id)
TRAIN_DOCS_PER_SOURCE = 400  # extra-source documents a "more sources" variant trains on, per source
LATENCY_PROMPTS = 400
GOALS = {"whole": 0.90, "snippet": 0.80, "ood_fallback": 0.90, "false_fallback": 0.05}
# fold k holds out these sources; the other fold's sources may be trained on
FOLDS = [
    {"copyright-licences", "django-doc", "dict-devil", "bible-kjv", "manpages-ja", "debian-handbook"},
    {"copyright-freeform", "sphinx-doc", "freedict-eng-jpn", "fortune-anarchism", "bofh-excuses",
     "libreoffice-help-ja", "debian-reference-en", "package-descriptions"},
]
VARIANTS = {  # name: (features, train on the other fold's extra sources, a class for text of no domain)
    "today (char 1-3)": (CHAR13, False, False),
    "words+chars": (WORDS_CHARS, False, False),
    "char 1-3 + more sources": (CHAR13, True, False),
    "words+chars + more sources": (WORDS_CHARS, True, False),
    "words+chars + more sources + none class": (WORDS_CHARS, True, True),
}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def snippet(text: str, doc_id: str) -> str:
    if len(text) <= SNIPPET:
        return text
    start = random.Random(doc_id).randrange(0, len(text) - SNIPPET)
    return text[start:start + SNIPPET]


def load() -> tuple[dict, dict]:
    """The shipped corpus by split and domain, and the extra sources by name."""
    corpus = {split: {d: read_jsonl(CORPUS / split / f"{d}.jsonl") for d in DOMAINS}
              for split in ("train", "validation", "test")}
    missing = [name for name in EXTRA_SOURCES if not (SOURCES / f"{name}.jsonl").exists()]
    if missing:
        sys.exit(f"no held-out sources under {SOURCES} ({', '.join(missing)}): run "
                 "`python -m senmon.ingest.extra_sources` first")
    extra = {name: read_jsonl(SOURCES / f"{name}.jsonl") for name in EXTRA_SOURCES}
    return corpus, extra


def items(docs: list[dict], group: str, label: str, source: str) -> list[dict]:
    """Every document whole and as one 100-character snippet."""
    out = []
    for doc in docs:
        out.append({"text": doc["text"], "form": "whole", "group": group, "label": label, "source": source})
        out.append({"text": snippet(doc["text"], doc["id"]), "form": "snippet", "group": group, "label": label,
                    "source": source})
    return out


def evaluation_items(corpus: dict, extra: dict) -> list[dict]:
    result = []
    for domain in DOMAINS:
        result += items(corpus["validation"][domain], "validation", domain, "corpus")
        result += items(corpus["test"][domain], "corpus-test", domain, "corpus")
    for name, docs in extra.items():
        domain = EXTRA_SOURCES[name][0]
        validation = [d for d in docs if d["split"] == "validation"]
        if domain == NO_DOMAIN:
            result += items(validation, "validation", NO_DOMAIN, name)
            result += items([d for d in docs if d["split"] == "test"], "ood-test", NO_DOMAIN, name)
        else:
            result += items(validation, "validation", domain, name)
            rest = [d for d in docs if d["split"] != "validation"][:EVAL_DOCS_PER_SOURCE]
            result += items(rest, "heldout", domain, name)
    return result


def train_variant(features: str, more_sources: bool, none_class: bool, corpus: dict, extra: dict,
                  seed: int = 0) -> list[RoutingModel]:
    """One model per fold (the same model twice when the variant trains on the corpus alone)."""
    models = []
    for fold in range(len(FOLDS) if more_sources else 1):
        texts = {d: [doc["text"] for doc in corpus["train"][d]] for d in DOMAINS}
        if more_sources:
            for name, docs in extra.items():
                domain = EXTRA_SOURCES[name][0]
                if name in FOLDS[fold] or (domain == NO_DOMAIN and not none_class):
                    continue
                # no-domain sources: their train split only (their validation split picks the threshold)
                chosen = [d for d in docs if domain != NO_DOMAIN or d["split"] == "train"][:TRAIN_DOCS_PER_SOURCE]
                texts.setdefault(domain, []).extend(d["text"] for d in chosen)
        models.append(RoutingModel.train(texts, seed=seed, features=features))
    return models if more_sources else models * len(FOLDS)


def fold_of(source: str) -> int:
    return next((k for k, fold in enumerate(FOLDS) if source in fold), 0)


def score(models: list[RoutingModel], evaluation: list[dict]) -> tuple[list[str], list[float]]:
    """(argmax label, confidence) per item, each scored by the model that never trained on its source."""
    best, confidence = [""] * len(evaluation), [0.0] * len(evaluation)
    for k, model in enumerate(models):
        index = [i for i, item in enumerate(evaluation) if fold_of(item["source"]) == k]
        for start in range(0, len(index), 256):
            chunk = index[start:start + 256]
            for i, row in zip(chunk, model.scores([evaluation[i]["text"] for i in chunk])):
                top = int(np.argmax(row))
                best[i], confidence[i] = model.labels[top], float(row[top])
    return best, confidence


def falls_back(best: str, confidence: float, threshold: float) -> bool:
    return best == NO_DOMAIN or confidence < threshold


def rate(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def choose_threshold(evaluation: list[dict], best: list[str], confidence: list[float]) -> dict:
    """The threshold that best separates, on validation text only, no-domain text (fall back) from in-domain."""
    ood = [i for i, item in enumerate(evaluation) if item["group"] == "validation" and item["label"] == NO_DOMAIN]
    ind = [i for i, item in enumerate(evaluation) if item["group"] == "validation" and item["label"] != NO_DOMAIN]
    chosen = None
    for threshold in np.round(np.arange(0.0, 1.0, 0.01), 2):
        fallback = rate([falls_back(best[i], confidence[i], threshold) for i in ood])
        false = rate([falls_back(best[i], confidence[i], threshold) for i in ind])
        if chosen is None or fallback - false > chosen["validation_ood_fallback"] - chosen["validation_false_fallback"]:
            chosen = {"threshold": float(threshold), "validation_ood_fallback": fallback,
                      "validation_false_fallback": false}
    return chosen


def measure(evaluation: list[dict], best: list[str], confidence: list[float], threshold: float) -> dict:
    by = defaultdict(list)
    for item, b, c in zip(evaluation, best, confidence):
        correct, fallback = b == item["label"], falls_back(b, c, threshold)
        by[(item["group"], item["label"], item["form"])].append((correct, fallback))
        by[(item["group"], item["source"], item["form"])].append((correct, fallback))
    result = {"heldout_accuracy": {}, "heldout_accuracy_by_source": {}, "corpus_test_accuracy": {}}
    for domain in DOMAINS:
        result["heldout_accuracy"][domain] = {f: rate([c for c, _ in by[("heldout", domain, f)]]) for f in ("whole", "snippet")}
        result["corpus_test_accuracy"][domain] = {f: rate([c for c, _ in by[("corpus-test", domain, f)]])
                                                  for f in ("whole", "snippet")}
    for name, (domain, _, _) in EXTRA_SOURCES.items():
        if domain != NO_DOMAIN:
            result["heldout_accuracy_by_source"][name] = {f: rate([c for c, _ in by[("heldout", name, f)]])
                                                          for f in ("whole", "snippet")}

    def fallback_rate(group: str, ood: bool, form: str) -> float | None:
        values = [fb for (g, label, f), pairs in by.items() if g == group and f == form
                  and (label == NO_DOMAIN) == ood and label in DOMAINS + [NO_DOMAIN] for _, fb in pairs]
        return rate(values)

    result["ood_fallback"] = {f: fallback_rate("ood-test", True, f) for f in ("whole", "snippet")}
    result["ood_fallback_by_source"] = {
        name: {f: rate([fb for _, fb in by[("ood-test", name, f)]]) for f in ("whole", "snippet")}
        for name, (domain, _, _) in EXTRA_SOURCES.items() if domain == NO_DOMAIN}
    result["false_fallback_heldout"] = {f: fallback_rate("heldout", False, f) for f in ("whole", "snippet")}
    result["false_fallback_corpus_test"] = {f: fallback_rate("corpus-test", False, f) for f in ("whole", "snippet")}
    return result


def latency(model: RoutingModel, evaluation: list[dict]) -> dict:
    prompts = [item["text"] for item in evaluation if item["group"] in ("heldout", "ood-test")]
    prompts = random.Random(0).sample(prompts, min(LATENCY_PROMPTS, len(prompts)))
    for prompt in prompts[:20]:
        model.route([prompt])  # warm-up
    times = []
    for prompt in prompts:
        started = time.perf_counter()
        model.route([prompt])
        times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))], "prompts": len(times),
            "mean_chars": statistics.mean(len(p) for p in prompts)}


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def main() -> None:
    corpus, extra = load()
    evaluation = evaluation_items(corpus, extra)
    results = {}
    for name, (features, more_sources, none_class) in VARIANTS.items():
        started = time.monotonic()
        models = train_variant(features, more_sources, none_class, corpus, extra)
        train_s = time.monotonic() - started
        best, confidence = score(models, evaluation)
        chosen = choose_threshold(evaluation, best, confidence)
        results[name] = {"features": features, "more_sources": more_sources, "none_class": none_class,
                         "train_s": train_s, "threshold": chosen,
                         "at_chosen_threshold": measure(evaluation, best, confidence, chosen["threshold"]),
                         "at_threshold_0.5": measure(evaluation, best, confidence, 0.5),
                         "latency": latency(models[0], evaluation)}
        print(f"{name}: trained in {train_s:.0f} s, threshold {chosen['threshold']:.2f}", flush=True)

    rows = []
    for name, r in results.items():
        m = r["at_chosen_threshold"]
        rows.append([name] + [f"{pct(m['heldout_accuracy'][d]['whole'])} / {pct(m['heldout_accuracy'][d]['snippet'])}"
                              for d in DOMAINS]
                    + [f"{r['threshold']['threshold']:.2f}",
                       f"{pct(m['ood_fallback']['whole'])} / {pct(m['ood_fallback']['snippet'])}",
                       f"{pct(m['false_fallback_heldout']['whole'])} / {pct(m['false_fallback_heldout']['snippet'])}",
                       f"{pct(m['false_fallback_corpus_test']['whole'])} / {pct(m['false_fallback_corpus_test']['snippet'])}",
                       f"{r['latency']['p50_ms']:.2f} / {r['latency']['p99_ms']:.2f}"])
    print("\nHeld-out sources, accuracy whole / 100-char snippet; fallback at the threshold chosen on validation text")
    print(table(["variant", *DOMAINS, "threshold", "OOD -> fallback", "false fallback (held-out)",
                 "false fallback (corpus test)", "p50 / p99 ms"], rows))
    print("\nBy held-out source (whole / snippet)")
    names = [n for n, (d, _, _) in EXTRA_SOURCES.items() if d != NO_DOMAIN]
    print(table(["variant", *names], [[v] + [f"{pct(r['at_chosen_threshold']['heldout_accuracy_by_source'][n]['whole'])} / "
                                             f"{pct(r['at_chosen_threshold']['heldout_accuracy_by_source'][n]['snippet'])}"
                                             for n in names] for v, r in results.items()]))
    ood_names = [n for n, (d, _, _) in EXTRA_SOURCES.items() if d == NO_DOMAIN]
    print("\nNo-domain test text to the fallback, by source (whole / snippet), at the chosen threshold")
    print(table(["variant", *ood_names], [[v] + [f"{pct(r['at_chosen_threshold']['ood_fallback_by_source'][n]['whole'])} / "
                                                 f"{pct(r['at_chosen_threshold']['ood_fallback_by_source'][n]['snippet'])}"
                                                 for n in ood_names] for v, r in results.items()]))
    counts = defaultdict(int)
    for item in evaluation:
        counts[f"{item['group']}/{item['form']}"] += 1
    path = write_results("routing", {"goals": GOALS, "folds": [sorted(f) for f in FOLDS], "items": dict(counts),
                                     "sources": json.loads((SOURCES / "MANIFEST.json").read_text())["sources"]
                                     if (SOURCES / "MANIFEST.json").exists() else {},
                                     "variants": results})
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
