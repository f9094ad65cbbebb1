"""The routing model's cost per prompt: scikit-learn's HashingVectorizer against senmon's own hashing, side by side.

`RoutingModel.scores` hashes each text's n-grams itself and reads only their rows of the weights; it used to call
the HashingVectorizer and multiply its sparse matrix. Both paths run here on the same model and the same prompts
(the corpus's test documents cut to 100, 200, 1,000 and 2,000 characters, the most the router reads), one prompt
per call as the router calls it, interleaved, the best of `--repeats` rounds (this machine is shared and noisy).
senmon's path keeps each word's and token's hashed columns (`GramColumns`), so it is measured twice: "cold", a
fresh copy of the model meeting these prompts for the first time (every word hashed), and warm, the best round
after; beside them, "hashed per call", the path before that cache (every n-gram hashed on every call). All paths
must give the same probabilities; the largest difference is recorded.
Usage: python -m bench routing_features [--prompts 200] [--repeats 5]
Writes bench/results/routing_features.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy.special import expit, softmax

from bench.common import table, write_results
from senmon.train.routing import RoutingModel, hashed_features

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
LENGTHS = (100, 200, 1000, 2000)


def corpus_texts(split: str) -> dict[str, list[str]]:
    return {path.stem: [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
            for path in sorted((CORPUS / split).glob("*.jsonl"))}


def sklearn_scores(model: RoutingModel, texts: list[str]) -> np.ndarray:
    """What `scores` computed before: the vectorizer's sparse matrix times the weights."""
    decision = np.asarray(model.vectorizer.transform(texts) @ model._weights) + model._bias
    if model.classifier.__class__.__name__ == "LogisticRegression":
        return softmax(decision, axis=1)
    probabilities = expit(decision)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def uncached_scores(model: RoutingModel, texts: list[str]) -> np.ndarray:
    """What `scores` computed before GramColumns: every n-gram of the text hashed on every call."""
    decision = np.vstack([values @ model._weights[columns] for columns, values in
                          (hashed_features(model._analyzer(t), model.vectorizer.n_features) for t in texts)])
    probabilities = expit(decision + model._bias)
    return probabilities / probabilities.sum(axis=1, keepdims=True)


def per_prompt_ms(fn, prompts: list[str]) -> float:
    started = time.perf_counter()
    for prompt in prompts:
        fn([prompt])
    return (time.perf_counter() - started) * 1000 / len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200, help="prompts per length")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    started = time.monotonic()
    # the n-gram view alone: this bench is about hashing n-grams (the embedding's cost: bench/routing.py's latency)
    model = RoutingModel.train(corpus_texts("train"), seed=0, embedding=None)
    train_s = time.monotonic() - started
    documents = [t for texts in corpus_texts("test").values() for t in texts]
    step = max(1, len(documents) // args.prompts)
    rows, results = [], []
    for length in LENGTHS:
        prompts = [d[:length] for d in documents[::step]][:args.prompts]
        cold = per_prompt_ms(RoutingModel.loads(model.dumps()).scores, prompts)  # nothing cached yet
        old, uncached, new = [], [], []
        for _ in range(args.repeats):  # interleaved, so all see the same load
            old.append(per_prompt_ms(lambda t: sklearn_scores(model, t), prompts))
            uncached.append(per_prompt_ms(lambda t: uncached_scores(model, t), prompts))
            new.append(per_prompt_ms(model.scores, prompts))
        difference = float(max(np.abs(sklearn_scores(model, prompts) - model.scores(prompts)).max(),
                               np.abs(uncached_scores(model, prompts) - model.scores(prompts)).max()))
        result = {"chars": length, "prompts": len(prompts), "sklearn_ms": min(old), "uncached_ms": min(uncached),
                  "senmon_cold_ms": cold, "senmon_ms": min(new),
                  "ratio": min(new) / min(old), "max_abs_difference": difference,
                  "rounds_ms": {"sklearn": old, "uncached": uncached, "senmon": new}}
        results.append(result)
        rows.append([length, len(prompts), f"{min(old):.3f}", f"{min(uncached):.3f}", f"{cold:.3f}", f"{min(new):.3f}",
                     f"{result['ratio']:.2f}", f"{difference:.1e}"])
    print(table(["prompt chars", "prompts", "HashingVectorizer ms", "hashed per call ms", "senmon cold ms",
                 "senmon ms", "senmon / HashingVectorizer", "max |diff|"], rows))
    path = write_results("routing_features", {"features": model.features, "train_s": train_s,
                                              "repeats": args.repeats, "per_length": results})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
