"""Routing on text it has never seen: leave-one-source-out accuracy, the fallback on text of no domain, latency.

    python -m senmon.ingest.extra_sources        # once: the held-out sources, under var/sources (not shipped)
    python -m bench routing                      # -> bench/results/routing.json

Two families of routing are compared. Routing *models* (a classifier over hashed n-grams, train/routing.py):
every routing model variant is trained on the shipped corpus (data/corpus, train split) and tested on documents
of the same five kinds from sources the corpus does not use (ingest/sources/extra.py), per domain, on whole
documents and on one 100-character snippet of each. "more sources" variants also train on the extra sources,
leave-one-source-out: two folds, each holding out one source per domain (and some of the no-domain sources);
every held-out text is scored by the fold's model that never saw its source. "none class" variants add a class
for text of no domain, trained on the other fold's no-domain sources. ROUTER is what train_router builds: the
corpus plus the shipped routing text (data/routing, ingest/routing_texts.py: the extra sources' train split), with
the static embedding's view beside the n-grams (train/embedding.py; "+wordllama" in a variant's features), and is
measured the same way, leave-one-source-out; ROUTER_BEFORE is the same without the embedding (the router until 28
Nov). For ROUTER the bench also sweeps the embedding's weight on in-domain validation text and reports the one with
the least log loss (`embedding_weight`), which is what train/routing.py's EMBEDDING_WEIGHT should be.

The fallback threshold is chosen on validation text only: the corpus's validation split and the `validation`
split of the extra sources (in-domain and no-domain), never on what is reported. Reported on the rest: the share
of no-domain text that falls back, and the share of in-domain text that falls back when it should not (held-out
sources and the corpus's own test split). Latency: one prompt per `route` call, as the router calls it, by a
fresh copy of the classifier (nothing cached), the second opinion on the router's torch threads
(`serve.likelihood_threads`, 1 by default) and, for comparison, on 2.

Likelihood routing (serve/likelihood.py) needs a trained system, the serving versions of the generalist and every
specialist (`--models`, a storage root; default: the embedded config's, which `make demo` fills): each model scores
the prompt's first `--tokens` tokens; the best specialist answers if it saves `margin` nats/token over the
generalist. "likelihood" alone, and "the router + second opinion" (ROUTER's classifier when its confidence is at least
`below`, the likelihood otherwise: what the router runs). Their parameters are chosen on validation text.

Accuracy against the domain label is a proxy. What routing is for is the answer, so the benchmark also measures
**answer quality**: route on a document's first 64 tokens, then score the chosen model on the document's next
tokens (up to 192), the part an answer would have to predict; reported as the perplexity there relative to
always asking the generalist (below 1: better answers), per group and source, with the share of documents where
the chosen model does worse than the generalist, for every policy, beside two references: the specialist of
the document's labelled domain (a perfect classifier) and the best model in hindsight (an oracle).
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
from senmon.ingest.routing_texts import read_routing_texts
from senmon.ingest.sources.extra import EXTRA_SOURCES, NO_DOMAIN
from senmon.train.routing import CHAR13, EMBEDDING, WORDS_CHARS, RoutingModel, mix, read_scores

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
# (each fold holds out one HTML and one reST code source, so each fold's model trains on both layouts)
FOLDS = [
    {"copyright-licences", "django-doc", "pandas-doc", "dict-devil", "bible-kjv", "manpages-ja", "gimp-help-ja",
     "debian-handbook"},
    {"copyright-freeform", "sphinx-doc", "scipy-doc", "freedict-eng-jpn", "fortune-anarchism", "bofh-excuses",
     "libreoffice-help-ja", "debian-reference-en", "package-descriptions"},
]
ROUTING_DIR = REPO / "data" / "routing"  # what the router trains on beside the corpus (ingest/routing_texts.py)
WITH_EMBEDDING = f"{WORDS_CHARS}+{EMBEDDING}"  # the n-grams and the static embedding's view (train/embedding.py)
ROUTER = "words+chars + embedding + data/routing + none class (the router)"
# the same without the none class (data/routing's text of no domain left out), the router of 28 Nov morning
ROUTER_MORNING = "words+chars + embedding + data/routing (the router of 28 Nov morning)"
ROUTER_BEFORE = "words+chars + data/routing (the router until 28 Nov)"  # without the embedding or the none class
EARLIER_ROUTERS = [ROUTER_MORNING, ROUTER_BEFORE]  # measured behind the second opinion too, where they ran
NO_DOMAIN_SOURCES = {name for name, (domain, _, _) in EXTRA_SOURCES.items() if domain == NO_DOMAIN}
# the code and japanese sources data/routing gained on 27 Nov; this variant trains without them, for comparison
ADDED_27_NOV = {"scipy-doc", "pandas-doc", "gimp-help-ja"}
BEFORE_27_NOV = "words+chars + data/routing before 27 Nov"
EMBEDDING_WEIGHTS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0]  # swept on validation text for ROUTER
CONFIGURED = "the router + second opinion as configured"  # the config's serve settings: what `auto` runs
VARIANTS = {  # name: (features, more sources: none / "held-out" (var/sources) / "data/routing", a no-domain class)
    "today (char 1-3)": (CHAR13, None, False),
    "words+chars": (WORDS_CHARS, None, False),
    "char 1-3 + more sources": (CHAR13, "held-out", False),
    "words+chars + more sources": (WORDS_CHARS, "held-out", False),
    "words+chars + more sources + none class": (WORDS_CHARS, "held-out", True),
    BEFORE_27_NOV: (WORDS_CHARS, "data/routing before 27 Nov", False),
    ROUTER_BEFORE: (WORDS_CHARS, "data/routing", False),
    ROUTER_MORNING: (WITH_EMBEDDING, "data/routing", False),
    ROUTER: (WITH_EMBEDDING, "data/routing", True),
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


def train_variant(features: str, more_sources: str | None, none_class: bool, corpus: dict, extra: dict,
                  seed: int = 0) -> list[RoutingModel]:
    """One model per fold (the same model twice when the variant trains on the corpus alone). More sources:
    "held-out", up to TRAIN_DOCS_PER_SOURCE documents of each extra source of every split; "data/routing", the
    shipped routing text (their train split, cut; what train_router adds; "... before 27 Nov": without the sources
    added then): in all, never the fold's own sources."""
    models, (features, embedding) = [], split_features(features)
    for fold in range(len(FOLDS) if more_sources else 1):
        texts = {d: [doc["text"] for doc in corpus["train"][d]] for d in DOMAINS}
        if more_sources and more_sources.startswith("data/routing"):
            leave_out = FOLDS[fold] | (ADDED_27_NOV if more_sources != "data/routing" else set()) | \
                (set() if none_class else NO_DOMAIN_SOURCES)
            for domain, shipped in read_routing_texts(ROUTING_DIR, leave_out=leave_out).items():
                texts.setdefault(domain, []).extend(shipped)  # NO_DOMAIN's texts too, where data/routing has some
        elif more_sources:
            for name, docs in extra.items():
                domain = EXTRA_SOURCES[name][0]
                if name in FOLDS[fold] or (domain == NO_DOMAIN and not none_class):
                    continue
                # no-domain sources: their train split only (their validation split picks the threshold)
                chosen = [d for d in docs if domain != NO_DOMAIN or d["split"] == "train"][:TRAIN_DOCS_PER_SOURCE]
                texts.setdefault(domain, []).extend(d["text"] for d in chosen)
        models.append(RoutingModel.train(texts, seed=seed, features=features, embedding=embedding))
    return models if more_sources else models * len(FOLDS)


def split_features(features: str) -> tuple[str, str | None]:
    """A variant's features: (the n-gram features, the embedding or None): "words+chars+wordllama" has both."""
    suffix = "+" + EMBEDDING
    return (features[:-len(suffix)], EMBEDDING) if features.endswith(suffix) else (features, None)


def embedding_weight_sweep(models: list[RoutingModel], evaluation: list[dict]) -> dict:
    """For a variant with the embedding's view: each weight of it, on in-domain validation text only (each text scored
    by the fold's model that never trained on its source), the log loss of the label and the balanced accuracy; the
    weight with the least log loss is the one train/routing.py's EMBEDDING_WEIGHT should be."""
    index = [i for i, item in enumerate(evaluation) if item["group"] == "validation" and item["label"] != NO_DOMAIN]
    views: dict[int, tuple] = {}
    for k, model in enumerate(models):
        mine = [i for i in index if fold_of(evaluation[i]["source"]) == k]
        ngrams, embedded = model.views([evaluation[i]["text"] for i in mine])
        for j, i in enumerate(mine):
            views[i] = (model.labels, ngrams[j:j + 1], embedded[j:j + 1])
    sweep = {}
    for weight in EMBEDDING_WEIGHTS:
        losses, chosen = [], []
        for i in index:
            labels, ngrams, embedded = views[i]
            row = mix(ngrams, embedded, weight)[0]
            losses.append(-float(np.log(max(row[labels.index(evaluation[i]["label"])], 1e-12))))
            chosen.append(labels[int(np.argmax(row))])
        sweep[str(weight)] = {"validation_log_loss": statistics.mean(losses),
                              "validation_balanced_accuracy": balanced_accuracy([evaluation[i] for i in index], chosen)}
    best = min(sweep, key=lambda w: sweep[w]["validation_log_loss"])
    return {"by_weight": sweep, "least_log_loss": float(best), "texts": len(index),
            "used": models[0].meta["embedding"]["weight"]}


def fold_of(source: str) -> int:
    return next((k for k, fold in enumerate(FOLDS) if source in fold), 0)


def probabilities(models: list[RoutingModel], evaluation: list[dict], key: str = "text") -> list[dict[str, float]]:
    """{label: probability} per item, each scored by the model that never trained on its source."""
    result: list[dict[str, float]] = [{}] * len(evaluation)
    for k, model in enumerate(models):
        index = [i for i, item in enumerate(evaluation) if fold_of(item["source"]) == k]
        for start in range(0, len(index), 256):
            chunk = index[start:start + 256]
            for i, row in zip(chunk, model.scores([evaluation[i][key] for i in chunk])):
                result[i] = dict(zip(model.labels, map(float, row)))
    return result


def score(models: list[RoutingModel], evaluation: list[dict], key: str = "text") -> tuple[list[str], list[float]]:
    """(argmax label, confidence) per item, each scored by the model that never trained on its source."""
    probs = probabilities(models, evaluation, key)
    best = [max(p, key=p.get) for p in probs]
    return best, [p[b] for p, b in zip(probs, best)]


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


def latency_prompts(evaluation: list[dict]) -> list[str]:
    prompts = [item["text"] for item in evaluation if item["group"] in ("heldout", "ood-test")]
    return random.Random(0).sample(prompts, min(LATENCY_PROMPTS, len(prompts)))


def fresh(model: RoutingModel) -> RoutingModel:
    """A copy as a router replica loads it: nothing cached (train/routing.py's GramColumns), so the latency is that
    of a router meeting these prompts' words for the first time, not of one that scored them all already."""
    return RoutingModel.loads(model.dumps())


def latency(model: RoutingModel, evaluation: list[dict]) -> dict:
    model, prompts = fresh(model), latency_prompts(evaluation)
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


# --------------------------------------------------------------------------- likelihood routing

MODELS = ["generalist", *DOMAINS]  # the embedded config's models: the generalist and one specialist per domain
PREFIX_TOKENS, ANSWER_TOKENS = 64, 192
BELOWS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.01]  # 1.01: the second opinion always decides
MARGINS = [0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 100.0]  # 100: never a specialist by likelihood
NONE_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01]  # p(none) from which a prompt goes to the fallback; 1.01: never
MAX_FIRED = 0.3  # the share of validation prompts the second opinion may take: above it, p50 goes past 2 ms


def scorer_for(models_root: str, tokens: int, fallback: str = "serving"):
    """The likelihood scorer over the serving models under `models_root`; `fallback='seed'`: where the generalist
    serves a merge (train/merge.py), the seed it names stands in for it."""
    from senmon.actors.registry import serving_records_from_file
    from senmon.serve.likelihood import LikelihoodScorer

    records = serving_records_from_file(models_root, MODELS)
    missing = [m for m in MODELS if m not in records]
    if missing:
        sys.exit(f"no serving version of {', '.join(missing)} under {models_root}: likelihood routing needs a "
                 "trained system (`make demo`, or `senmon up` until it serves), or pass --models ROOT")
    merge = records["generalist"].get("data", {}).get("merged_from")
    if fallback == "seed" and merge:
        seed = records["generalist"]["data"]["seed"]
        records["generalist"] = {**records["generalist"], "version": seed["version"], "path": seed["path"]}
    scorer = LikelihoodScorer(max_tokens=tokens)
    scorer.sync({name: {"version": r["version"], "path": r["path"]} for name, r in records.items()})
    return scorer, {name: r["version"] for name, r in records.items()}


def nll_all(scorer, texts: list[str], batch: int = 32) -> list[dict[str, float]]:
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    result: list[dict] = [{}] * len(texts)
    for start in range(0, len(order), batch):
        chunk = order[start:start + batch]
        for i, row in zip(chunk, scorer.nll([texts[i] for i in chunk])):
            result[i] = row
    return result


def split(probs: list[dict[str, float]]) -> tuple[list[str], list[float], list[float]]:
    """As the router reads the routing model (train/routing.py `read_scores`): per item the likeliest specialist, its
    share of the specialists' probability, and the probability of NO_DOMAIN (0 without that class)."""
    best, confidence, none = zip(*map(read_scores, probs))
    return list(best), list(confidence), list(none)


def combined(routed: tuple[list[str], list[float], list[float]], nll: list[dict], below: float, margin: float,
             none_threshold: float = 1.01) -> tuple[list[str], list[bool]]:
    """(chosen label, NO_DOMAIN for the generalist; whether the second opinion decided) per item, as serve/router.py
    decides: NO_DOMAIN's probability at least `none_threshold`: the fallback; else the specialist where the
    classifier is at least `below` sure, the second opinion where it is not."""
    from senmon.serve.likelihood import decide

    chosen, fired = [], []
    for b, c, n, scores in zip(*routed, nll):
        if n >= none_threshold:
            chosen.append(NO_DOMAIN)
            fired.append(False)
        elif c >= below:
            chosen.append(b)
            fired.append(False)
        else:
            chosen.append(decide(scores, "generalist", margin).chosen or NO_DOMAIN)
            fired.append(True)
    return chosen, fired


def fallback_causes(evaluation: list[dict], chosen: list[str], fired: list[bool]) -> dict:
    """Of held-out in-domain texts and texts of no domain, the share sent to the fallback by each cause: the `none`
    class (at least its threshold; the second opinion is not asked) or the second opinion (the fallback predicted
    the text best), whole documents and snippets."""
    shares: dict = {}
    for group, key in (("heldout", "in_domain"), ("ood-test", "no_domain")):
        shares[key] = {}
        for form in ("whole", "snippet"):
            items = [(c, f) for item, c, f in zip(evaluation, chosen, fired)
                     if item["group"] == group and item["form"] == form]
            shares[key][form] = {"none_class": rate([c == NO_DOMAIN and not f for c, f in items]),
                                 "second_opinion": rate([c == NO_DOMAIN and f for c, f in items])}
    return shares


def balanced_accuracy(evaluation: list[dict], chosen: list[str], group: str = "validation") -> float:
    """Mean over the five domains and no-domain (right = the generalist), whole documents and snippets."""
    by = defaultdict(list)
    for item, c in zip(evaluation, chosen):
        if item["group"] == group:
            by[(item["label"], item["form"])].append(c == item["label"])
    return statistics.mean(rate(v) for v in by.values())


def answer_rows(scorer, evaluation: list[dict]) -> list[dict]:
    """Whole documents of at least PREFIX_TOKENS + 32 tokens: the text of their first PREFIX_TOKENS tokens
    (what routing sees) and every model's negative log-likelihood per token on the next ones."""
    import torch

    from senmon.serve.likelihood import EOT_ID, StackedLlama

    rows = []
    for item in evaluation:
        if item["form"] != "whole":
            continue
        encoded = scorer.tokenizer.encode(item["text"], add_special_tokens=False)
        if len(encoded.ids) >= PREFIX_TOKENS + 32:
            rows.append({**{k: v for k, v in item.items() if k != "text"},
                         "prefix_text": item["text"][:encoded.offsets[PREFIX_TOKENS - 1][1]],
                         "ids": [EOT_ID] + encoded.ids[:PREFIX_TOKENS + ANSWER_TOKENS]})
    names = list(scorer.models)
    stacked = StackedLlama([scorer.models[n][2] for n in names])
    rows.sort(key=lambda r: len(r["ids"]))
    with torch.inference_mode():
        for start in range(0, len(rows), 16):
            chunk = rows[start:start + 16]
            batch = torch.nn.utils.rnn.pad_sequence([torch.tensor(r["ids"]) for r in chunk], batch_first=True)
            per_token = stacked.token_nll(batch)  # [M, B, T-1]
            for j, row in enumerate(chunk):
                answer = slice(PREFIX_TOKENS, len(row["ids"]) - 1)
                row["answer"] = {n: float(per_token[m, j, answer].mean()) for m, n in enumerate(names)}
    for row in rows:
        del row["ids"]
    return rows


def answer_quality(rows: list[dict], chosen: list[str]) -> dict:
    """Perplexity on the answer part relative to the generalist's (geometric mean), overall, per group and
    source, and the share of documents where the chosen model does worse than the generalist."""
    def summary(pairs: list[tuple[dict, str]]) -> dict:
        deltas = [row["answer"][c] - row["answer"]["generalist"] for row, c in pairs]
        return {"ppl_vs_generalist": float(np.exp(np.mean(deltas))), "worse_than_generalist": rate([d > 0 for d in deltas]),
                "documents": len(deltas)}

    by_group, by_source = defaultdict(list), defaultdict(list)
    for row, c in zip(rows, chosen):
        model = "generalist" if c == NO_DOMAIN else c
        by_group[row["group"]].append((row, model))
        by_source[(row["group"], row["source"])].append((row, model))
    return {"by_group": {g: summary(v) for g, v in by_group.items()},
            "by_source": {f"{g}/{s}": summary(v) for (g, s), v in by_source.items()}}


def likelihood_latency(model: RoutingModel, scorer, evaluation: list[dict], below: float, margin: float,
                       threads: list[int], none_threshold: float = 1.01) -> dict:
    """One prompt at a time, as the router decides: the classifier (a fresh copy), then the second opinion where it
    fires, with torch on each of `threads` threads; the first is the router's (serve.likelihood_threads: a
    replica's torch has 1 unless configured), whose numbers are the result's own."""
    import torch

    from senmon.serve.likelihood import decide

    prompts, before, by_threads = latency_prompts(evaluation), torch.get_num_threads(), {}
    for count in threads:
        torch.set_num_threads(count)
        classifier, times, second = fresh(model), [], []
        try:
            for prompt in prompts[:20] + prompts:
                started = time.perf_counter()
                route = classifier.route([prompt])[0]
                if route.none < none_threshold and route.confidence < below:
                    decide(scorer.nll([prompt])[0], "generalist", margin)
                    second.append((time.perf_counter() - started) * 1000)
                times.append((time.perf_counter() - started) * 1000)
        finally:
            torch.set_num_threads(before)
        times, second = sorted(times[20:]), sorted(second)
        by_threads[count] = {
            "p50_ms": statistics.median(times), "p99_ms": times[int(0.99 * (len(times) - 1))], "prompts": len(times),
            "second_opinion_fired": len(second) / (len(prompts) + 20),
            "second_opinion_p50_ms": statistics.median(second) if second else None,
            "second_opinion_p99_ms": second[int(0.99 * (len(second) - 1))] if second else None}
    return {**by_threads[threads[0]], "torch_threads": threads[0], "by_torch_threads": by_threads,
            "host_reference_ms": host_reference_ms()}


def host_reference_ms(rounds: int = 300) -> float:
    """This host's speed on the second opinion's largest piece of arithmetic, so that latency runs of different
    days can be compared: median ms of one vocabulary-wide head for six demo-size models and 32 positions
    ([6, 4096, 64] x [6, 64, 32], float32, one torch thread, fixed inputs). Compare it between two runs before
    comparing their latencies: this 2-core virtual machine has run the same forward pass twice as fast on one day
    as on another."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = torch.Generator().manual_seed(0)
        head, positions = torch.randn(6, 4096, 64, generator=generator), torch.randn(6, 64, 32, generator=generator)
        times = []
        for index in range(rounds + 20):
            started = time.perf_counter()
            torch.bmm(head, positions)
            if index >= 20:
                times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        torch.set_num_threads(before)


def likelihood_variants(args, corpus: dict, extra: dict, evaluation: list[dict], results: dict) -> dict:
    """The likelihood policies beside the deployed classifier (ROUTER, each text scored by the fold's model that
    never trained on its source; and ROUTER_BEFORE's, where that variant ran, for comparison): their parameters
    chosen for answer quality on validation documents, then label accuracy and answer quality measured on the rest;
    returns the answer-quality table of every policy."""
    scorer, versions = scorer_for(args.models, args.tokens, args.fallback)
    print(f"likelihood routing with {', '.join(f'{m} v{v}' for m, v in versions.items())} from {args.models}, "
          f"first {args.tokens} tokens", flush=True)
    started = time.monotonic()
    rows = answer_rows(scorer, evaluation)
    prefix_nll = nll_all(scorer, [row["prefix_text"] for row in rows])
    print(f"  answer quality: {len(rows)} documents scored in {time.monotonic() - started:.0f} s", flush=True)
    validation = [i for i, row in enumerate(rows) if row["group"] == "validation"]
    texts = [item["text"] for item in evaluation]
    started = time.monotonic()
    nll = nll_all(scorer, texts)
    print(f"  scored {len(texts)} prompts with {len(scorer.models)} models in {time.monotonic() - started:.0f} s",
          flush=True)
    quality_policies = {
        "always the generalist": [NO_DOMAIN] * len(rows),
        "the labelled domain's specialist (perfect classifier)": [row["label"] for row in rows],
        "best in hindsight (oracle)": [min(row["answer"], key=row["answer"].get) for row in rows],
    }
    policies = [("likelihood", ROUTER, [1.01]), ("the router + second opinion", ROUTER, BELOWS),
                (CONFIGURED, ROUTER, [args.configured])]
    for earlier in EARLIER_ROUTERS:
        if earlier in results:
            policies += [(f"{earlier} + second opinion", earlier, BELOWS),
                         (f"{earlier} + second opinion as configured", earlier, [args.configured])]
    scored: dict[str, tuple] = {}  # variant -> its fold models and their scores, trained once for every policy
    for name, variant, belows in policies:
        if variant not in scored:
            models = train_variant(*VARIANTS[variant], corpus, extra)
            scored[variant] = (models, split(probabilities(models, rows, key="prefix_text")),
                               split(probabilities(models, evaluation)))
        classifiers, prefix_routed, routed = scored[variant]
        if name == "the router + second opinion":
            threshold = results[ROUTER]["threshold"]["threshold"] if ROUTER in results else 0.5
            prefix_best, prefix_confidence = score(classifiers, rows, key="prefix_text")
            quality_policies[f"the router's classifier at its threshold ({threshold:.2f})"] = [
                b if c >= threshold else NO_DOMAIN for b, c in zip(prefix_best, prefix_confidence)]
        validation_routed = tuple([column[i] for i in validation] for column in prefix_routed)

        def validation_quality(below: float, margin: float, none_threshold: float) -> tuple[float, float]:
            chosen, fired = combined(validation_routed, [prefix_nll[i] for i in validation], below, margin,
                                     none_threshold)
            q = answer_quality([rows[i] for i in validation], chosen)["by_group"]["validation"]
            return q["ppl_vs_generalist"], rate(fired)

        def validation_labels(below: float, margin: float, none_threshold: float) -> float:
            """Balanced label accuracy on validation texts (whole and snippets; no domain counts as the fallback)."""
            return balanced_accuracy(evaluation, combined(routed, nll, below, margin, none_threshold)[0])

        configured = name.endswith("as configured")
        margins = [args.configured_margin] if configured else MARGINS
        has_none = NO_DOMAIN in classifiers[0].labels and name != "likelihood"  # likelihood alone: no class
        nones = ([args.configured_none] if configured else NONE_THRESHOLDS) if has_none else [1.01]
        grid = [(validation_quality(b, m, n), b, m, n) for b in belows for m in margins for n in nones]
        # the router's latency goal: the second opinion on at most MAX_FIRED of validation prompts (the classifier
        # alone decides the others); likelihood alone always fires
        affordable = [g for g in grid if g[0][1] <= MAX_FIRED] or grid
        best_ppl = min(g[0][0] for g in affordable)
        # within 1% of the best answer quality there, the best labels: answers first, then the label goals
        (ppl, _), below, margin, none_threshold = max(
            (g for g in affordable if g[0][0] <= best_ppl * 1.01),
            key=lambda g: (validation_labels(g[1], g[2], g[3]), -g[0][1], g[2]))
        chosen, fired = combined(routed, nll, below, margin, none_threshold)
        results[name] = {"features": "likelihood" if below > 1 else VARIANTS[variant][0] + " + likelihood",
                         "more_sources": None if below > 1 else VARIANTS[variant][1],
                         "none_class": has_none, "tokens": args.tokens, "models": versions,
                         "threshold": {"threshold": 0.0, "below": below, "margin": margin,
                                       "none_threshold": none_threshold, "validation_answer_ppl_vs_generalist": ppl},
                         "second_opinion_fired": rate(fired),
                         "at_chosen_threshold": measure(evaluation, chosen, [1.0] * len(chosen), 0.0),
                         "fallback_causes": fallback_causes(evaluation, chosen, fired),
                         "latency": likelihood_latency(classifiers[0], scorer, evaluation, below, margin,
                                                       list(dict.fromkeys([args.threads, 2])), none_threshold)}
        shown = f", none from {none_threshold}" if none_threshold <= 1 else ""
        quality_policies[f"{name} (below {below}, margin {margin}{shown})"] = combined(
            prefix_routed, prefix_nll, below, margin, none_threshold)[0]
        print(f"{name}: below {below}, margin {margin}{shown}: validation answers {ppl:.3f}x the generalist's "
              f"perplexity; second opinion on {100 * rate(fired):.0f}% of prompts", flush=True)
        causes, one = results[name]["fallback_causes"], lambda v: "-" if v is None else f"{100 * v:.1f}%"
        print(f"  to the fallback (whole / snippet), by the none class + by the second opinion: in-domain "
              + ", ".join(f"{one(causes['in_domain'][f]['none_class'])} + {one(causes['in_domain'][f]['second_opinion'])}"
                          for f in ("whole", "snippet"))
              + "; no domain " + ", ".join(f"{one(causes['no_domain'][f]['none_class'])} + "
                                           f"{one(causes['no_domain'][f]['second_opinion'])}" for f in ("whole", "snippet")),
              flush=True)
    return {name: answer_quality(rows, chosen) for name, chosen in quality_policies.items()}


def by_source(result: dict, key: str, name: str) -> str:
    """whole / snippet for one source; "-" where the variant was measured before the source existed."""
    measured = result["at_chosen_threshold"][key].get(name)
    return f"{pct(measured['whole'])} / {pct(measured['snippet'])}" if measured else "-"


def main() -> None:
    import argparse

    from senmon.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None, help="storage root of a trained system (default: the embedded "
                                                       "config's, which `make demo` fills)")
    parser.add_argument("--tokens", type=int, default=None, help="prompt tokens the likelihood scores "
                                                                 "(default: the config's serve.likelihood_tokens)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated routing model variants to train (default: all)")
    parser.add_argument("--fallback", choices=["serving", "seed"], default="serving",
                        help="the generalist as served, or (where it serves a merge) the seed it names; 'seed' "
                             "writes bench/results/routing_seed_fallback.json")
    args = parser.parse_args()
    config = load_config()
    args.models = args.models or config.storage_root
    args.tokens = args.tokens or config.serve.likelihood_tokens
    args.configured, args.configured_margin = config.serve.second_opinion_below, config.serve.likelihood_margin
    args.configured_none = config.serve.none_threshold
    args.threads = config.serve.likelihood_threads
    corpus, extra = load()
    evaluation = evaluation_items(corpus, extra)
    results = {}
    for name, (features, more_sources, none_class) in VARIANTS.items():
        if name not in args.variants.split(","):
            continue
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
        if split_features(features)[1]:
            results[name]["embedding_weight"] = sweep = embedding_weight_sweep(models, evaluation)
            print(f"{name}: embedding weight with the least validation log loss {sweep['least_log_loss']} "
                  f"(the model's: {sweep['used']}): " + ", ".join(
                      f"{w}: {v['validation_log_loss']:.3f}" for w, v in sweep["by_weight"].items()), flush=True)
        print(f"{name}: trained in {train_s:.0f} s, threshold {chosen['threshold']:.2f}", flush=True)

    quality = likelihood_variants(args, corpus, extra, evaluation, results)
    result_name = "routing" if args.fallback == "serving" else "routing_seed_fallback"
    previous = Path(__file__).resolve().parent / "results" / f"{result_name}.json"
    if previous.exists():  # variants not run this time: kept from the last run that measured them, marked so
        earlier = json.loads(previous.read_text(encoding="utf-8"))
        for name, r in earlier.get("variants", {}).items():
            if name not in results and name in VARIANTS:
                results[name] = {**r, "measured": r.get("measured", earlier.get("when"))}

    counts = defaultdict(int)
    for item in evaluation:
        counts[f"{item['group']}/{item['form']}"] += 1
    path = write_results(result_name, {"goals": GOALS, "fallback": args.fallback, "folds": [sorted(f) for f in FOLDS], "items": dict(counts),
                                     "sources": json.loads((SOURCES / "MANIFEST.json").read_text())["sources"]
                                     if (SOURCES / "MANIFEST.json").exists() else {},
                                     "variants": results, "answer_quality": quality,
                                     "answer_tokens": {"prefix": PREFIX_TOKENS, "answer": ANSWER_TOKENS}})

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
    threaded = [(name, count, m) for name, r in results.items() for count, m in r["latency"].get("by_torch_threads", {}).items()]
    if threaded:
        references = [r["latency"]["host_reference_ms"] for r in results.values() if "host_reference_ms" in r["latency"]]
        print("\nRouting decision latency by torch threads of the second opinion (the router's: serve.likelihood_threads)"
              + (f"; host reference (one vocabulary-wide head, 1 thread): {min(references):.2f}-{max(references):.2f} ms"
                 if references else ""))
        print(table(["variant", "torch threads", "p50 / p99 ms", "second opinion fired", "second opinion p50 / p99 ms"],
                    [[name, count, f"{m['p50_ms']:.2f} / {m['p99_ms']:.2f}", pct(m["second_opinion_fired"]),
                      f"{m['second_opinion_p50_ms']:.2f} / {m['second_opinion_p99_ms']:.2f}" if m["second_opinion_p50_ms"]
                      else "-"] for name, count, m in threaded]))
    print("\nBy held-out source (whole / snippet)")
    names = [n for n, (d, _, _) in EXTRA_SOURCES.items() if d != NO_DOMAIN]
    print(table(["variant", *names], [[v] + [by_source(r, "heldout_accuracy_by_source", n) for n in names] for v, r in results.items()]))
    ood_names = [n for n, (d, _, _) in EXTRA_SOURCES.items() if d == NO_DOMAIN]
    print("\nNo-domain test text to the fallback, by source (whole / snippet), at the chosen threshold")
    print(table(["variant", *ood_names], [[v] + [by_source(r, "ood_fallback_by_source", n) for n in ood_names] for v, r in results.items()]))
    print(f"\nAnswer quality: route on the first {PREFIX_TOKENS} tokens of a whole document, then perplexity on its "
          f"next tokens (up to {ANSWER_TOKENS}) relative to always asking the generalist (below 1 is better); "
          "in brackets, the share of documents where the chosen model does worse than the generalist")
    groups = ["heldout", "ood-test", "corpus-test", "validation"]
    print(table(["policy", *groups], [[name] + [
        f"{q['by_group'][g]['ppl_vs_generalist']:.3f} ({pct(q['by_group'][g]['worse_than_generalist'])})"
        if g in q["by_group"] else "-" for g in groups] for name, q in quality.items()]))
    heldout_sources = sorted({k.split("/", 1)[1] for q in quality.values() for k in q["by_source"]
                              if k.startswith(("heldout/", "ood-test/"))})
    print("\nAnswer quality by held-out source (perplexity vs the generalist)")
    print(table(["policy", *heldout_sources], [[name] + [
        next((f"{v['ppl_vs_generalist']:.2f}" for k, v in q["by_source"].items() if k.split("/", 1)[1] == src
              and not k.startswith(("validation/", "corpus-test/"))), "-") for src in heldout_sources]
        for name, q in quality.items()]))
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
