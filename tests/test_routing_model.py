"""The routing model itself (train/routing.py), with real scikit-learn on real corpus text: no Ray, no engines."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import joblib
import numpy as np
import pytest

from sklearn.linear_model import LogisticRegression

from senmon.train.routing import (CHAR13, DEFAULT_FEATURES, WORDS_CHARS, GramColumns, RoutingModel, normalise_layout,
                                  vectorizer, words_and_chars)

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
DOMAINS = ["law", "code", "dictionary", "literature", "japanese"]


def texts(split: str, per_domain: int) -> dict[str, list[str]]:
    result = {}
    for domain in DOMAINS:
        lines = (CORPUS / split / f"{domain}.jsonl").read_text(encoding="utf-8").splitlines()
        result[domain] = [json.loads(line)["text"] for line in lines[:per_domain]]
    return result


@pytest.fixture(scope="module")
def words_chars_model() -> RoutingModel:
    return RoutingModel.train(texts("train", 120), seed=0, features=WORDS_CHARS)


def test_layout_is_taken_out_before_features():
    assert normalise_layout("Foo\n\n    BAR ===\n\tversion 3.11") == "foo bar = version 0.00"
    assert normalise_layout("**Note**:  see  ``open()``") == "*note*: see `open()`"
    assert normalise_layout("ＡＢＣ　日本語") == "abc 日本語"  # NFKC: full-width letters and spaces


def test_words_chars_routes_unseen_corpus_documents(words_chars_model):
    model = words_chars_model
    assert model.features == WORDS_CHARS and sorted(model.labels) == sorted(DOMAINS)
    accuracy = model.accuracy(texts("test", 30))
    assert min(accuracy.values()) >= 0.85 and sum(accuracy.values()) / len(accuracy) >= 0.93, accuracy
    snippets = model.accuracy(texts("test", 30), snippet_chars=100)
    assert sum(snippets.values()) / len(snippets) >= 0.8, snippets


def test_words_chars_ignores_how_a_text_is_laid_out(words_chars_model):
    """The same words re-wrapped, re-indented, upper-cased or stripped of markup route to the same place."""
    model = words_chars_model
    documents = [(d, t) for d, ts in texts("test", 8).items() for t in ts]
    changed = 0
    for domain, text in documents:
        variants = [" ".join(text.split()), text.upper(), re.sub(r"[*_`#|=~^]+", "", text),
                    "\n".join("    " + w for w in text.split(" "))]
        original = model.route([text])[0].specialist
        for variant in variants:
            changed += model.route([variant])[0].specialist != original
    assert changed <= len(documents) * 4 * 0.05, changed  # at most 5% of the re-laid-out copies move


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_a_model_saved_before_features_had_names_loads_as_char13():
    train = texts("train", 10)
    pairs = [(name, text) for name, docs in train.items() for text in docs]
    classifier = LogisticRegression(C=10.0, max_iter=2)  # the first routing model's kind; its fit does not matter here
    classifier.fit(vectorizer(CHAR13).transform([t for _, t in pairs]), [n for n, _ in pairs])
    buffer = io.BytesIO()
    joblib.dump({"classifier": classifier, "meta": {"examples": len(pairs)}}, buffer)  # no "features" key
    again = RoutingModel.loads(buffer.getvalue())
    assert again.features == CHAR13
    sample = [t for ts in texts("test", 3).values() for t in ts]
    assert again.scores(sample) == pytest.approx(classifier.predict_proba(vectorizer(CHAR13).transform(sample)), abs=1e-12)


def test_round_trip_keeps_features_and_scores(words_chars_model):
    again = RoutingModel.loads(words_chars_model.dumps())
    assert again.features == WORDS_CHARS
    sample = [t for ts in texts("validation", 2).values() for t in ts]
    assert again.scores(sample) == pytest.approx(words_chars_model.scores(sample), abs=1e-12)


def test_fast_scores_equal_the_classifiers_own_probabilities(words_chars_model):
    """scores() hashes each text's features itself and reads only their rows of the pre-transposed weights; it
    must give exactly what predict_proba gives on scikit-learn's own features, texts without any n-gram included."""
    sample = [t for ts in texts("test", 4).values() for t in ts] + ["", " ", "!!!", "日本語", "a"]
    binary = RoutingModel.train({"law": texts("train", 10)["law"], "code": texts("train", 10)["code"]}, seed=0)
    for model in (words_chars_model, binary):
        expected = model.classifier.predict_proba(model.vectorizer.transform(sample))
        assert model.scores(sample) == pytest.approx(expected, abs=1e-12)
    assert DEFAULT_FEATURES == WORDS_CHARS  # the model train_router builds


def test_cached_columns_are_the_analyzers_own_through_cache_clears(words_chars_model):
    """GramColumns caches each word's and token's columns; what it returns must be the multiset HashingVectorizer
    hashes from words_and_chars, on long documents (cut as the router cuts them, 2,000 characters), Japanese and
    repeats, also when the cache is so small that it empties itself mid-text."""
    sample = [t[:2000] for ts in texts("test", 6).values() for t in ts] + ["", "日本語の文書", "a b a b a"]
    n = words_chars_model.vectorizer.n_features
    for columns in (GramColumns(n), GramColumns(n, max_entries=50)):
        for text in sample + sample:  # the second pass reads the cache
            expected = words_chars_model.vectorizer.transform([text]).indices
            got = columns(text)
            assert sorted(set(got.tolist())) == sorted(expected.tolist())
            assert len(got) == len(words_and_chars(text))
    expected = words_chars_model.classifier.predict_proba(words_chars_model.vectorizer.transform(sample))
    assert words_chars_model.scores(sample + sample) == pytest.approx(np.vstack([expected, expected]), abs=1e-12)


def test_unknown_features_are_refused():
    with pytest.raises(ValueError, match="unknown routing features"):
        RoutingModel.train({"law": ["x" * 50], "code": ["y" * 50]}, features="bag-of-magic")


def test_one_specialist_gets_every_text_and_the_model_saves_and_loads():
    """A deployment with a single specialist (the `ray up` test's) still has a routing model: every text is that
    specialist's, with confidence 1, so `auto` asks it; the likelihood second opinion never fires."""
    model = RoutingModel.train({"law": texts("train", 5)["law"]}, seed=0)
    again = RoutingModel.loads(model.dumps())
    for m in (model, again):
        routes = m.route(["Permission is hereby granted", "吾輩は猫である", ""])
        assert [(r.specialist, r.confidence) for r in routes] == [("law", 1.0)] * 3
        assert m.accuracy({"law": texts("test", 3)["law"]}) == {"law": 1.0}
