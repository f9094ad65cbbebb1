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

from senmon.train import embedding as static_embedding
from senmon.train.routing import (CHAR13, DEFAULT_EMBEDDING, DEFAULT_FEATURES, EMBEDDING, EMBEDDING_WEIGHT, WORDS_CHARS,
                                  GramColumns, RoutingModel, mix, normalise_layout, vectorizer, words_and_chars)

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
    """ngram_scores() hashes each text's features itself and reads only their rows of the pre-transposed weights; it
    must give exactly what predict_proba gives on scikit-learn's own features, texts without any n-gram included."""
    sample = [t for ts in texts("test", 4).values() for t in ts] + ["", " ", "!!!", "日本語", "a"]
    binary = RoutingModel.train({"law": texts("train", 10)["law"], "code": texts("train", 10)["code"]}, seed=0)
    for model in (words_chars_model, binary):
        expected = model.classifier.predict_proba(model.vectorizer.transform(sample))
        assert model.ngram_scores(sample) == pytest.approx(expected, abs=1e-12)
    assert (DEFAULT_FEATURES, DEFAULT_EMBEDDING) == (WORDS_CHARS, EMBEDDING)  # the model train_router builds


def test_the_embedding_view_is_mixed_in_as_documented(words_chars_model):
    """scores() = softmax((1 - w) log p_ngrams + w log p_embedding), the embedding classifier's probabilities being
    its own predict_proba on the texts' mean token vectors; two classes included."""
    sample = [t for ts in texts("test", 4).values() for t in ts] + ["", "!!!", "日本語", "a"]
    binary = RoutingModel.train({"law": texts("train", 10)["law"], "code": texts("train", 10)["code"]}, seed=0)
    vectors = static_embedding.load().embed(sample)
    for model in (words_chars_model, binary):
        assert model.meta["embedding"]["weight"] == EMBEDDING_WEIGHT
        assert model.meta["embedding"]["sha256"] == static_embedding.load().sha256
        ngrams, embedded = model.views(sample)
        assert embedded == pytest.approx(model.embedding_classifier.predict_proba(vectors), abs=1e-9)
        scores = model.scores(sample)
        assert scores == pytest.approx(mix(ngrams, embedded, EMBEDDING_WEIGHT), abs=1e-12)
        assert scores.sum(axis=1) == pytest.approx(np.ones(len(sample)))
        manual = np.exp((1 - EMBEDDING_WEIGHT) * np.log(ngrams) + EMBEDDING_WEIGHT * np.log(embedded))
        assert scores == pytest.approx(manual / manual.sum(axis=1, keepdims=True), abs=1e-9)
    vector = vectors[0]
    assert vector.shape == (256,) and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert not vectors[sample.index("")].any()  # no tokens: the zero vector, and still a probability row above


def test_the_embedding_comes_from_the_installed_package_without_a_network(tmp_path):
    """The weights and tokenizer are read from the installed wordllama package: in a fresh process with every socket
    connection refused, a routing model trains and loads, and the package itself is never imported (its import
    configures logging; its own loader would fetch a missing file from Hugging Face)."""
    import subprocess
    import sys

    script = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network used")
socket.socket.connect = refuse
socket.create_connection = refuse
from senmon.train import embedding
from senmon.train.routing import RoutingModel
model = RoutingModel.loads(RoutingModel.train({"law": ["permission to copy"] * 3, "code": ["def f(x): return x"] * 3}).dumps())
assert model.route(["copy permission"])[0].specialist == "law"
print("wordllama imported:", "wordllama" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "wordllama imported: False" in done.stdout
    assert (static_embedding.package_dir() / static_embedding.WEIGHTS).is_file()


def test_a_model_trained_with_other_embedding_weights_is_refused(words_chars_model):
    """A routing model names the sha256 of the embedding it was trained with; another package version's weights
    would route differently without a word, so loading says so instead."""
    changed = RoutingModel.loads(words_chars_model.dumps())
    changed.meta = {**changed.meta, "embedding": {**changed.meta["embedding"], "sha256": "0" * 64}}
    with pytest.raises(static_embedding.EmbeddingMissing, match="not the one this routing model was trained with"):
        RoutingModel.loads(changed.dumps())


def test_a_model_without_the_embedding_still_trains_saves_and_scores():
    """embedding=None (and every model saved before 28 Nov, which has no embedding classifier) is n-grams alone."""
    model = RoutingModel.train(texts("train", 10), seed=0, embedding=None)
    again = RoutingModel.loads(model.dumps())
    sample = [t for ts in texts("test", 2).values() for t in ts]
    assert "embedding" not in again.meta and again.embedding_classifier is None
    assert again.scores(sample) == pytest.approx(again.classifier.predict_proba(again.vectorizer.transform(sample)),
                                                 abs=1e-12)
    with pytest.raises(ValueError, match="unknown routing embedding"):
        RoutingModel.train(texts("train", 3), embedding="word2vec")


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
    assert words_chars_model.ngram_scores(sample + sample) == pytest.approx(np.vstack([expected, expected]), abs=1e-12)


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


def test_the_embedding_view_routes_sources_the_model_never_saw_better():
    """What the embedding is for: trained on the corpus alone (60 documents a domain), the model with it routes the
    shipped routing text of other sources (data/routing: Django, SciPy, The Devil's Dictionary, the Bible, the GIMP
    manual, ...) better than the n-grams alone, whole documents and 100-character snippets (here: 0.778 -> 0.804
    and 0.676 -> 0.714)."""
    from senmon.ingest.routing_texts import read_routing_texts

    other = {d: v[:100] for d, v in read_routing_texts(CORPUS.parent / "routing", set(DOMAINS)).items()}
    train = texts("train", 60)

    def mean(accuracy: dict) -> float:
        return sum(accuracy.values()) / len(accuracy)

    alone, both = (RoutingModel.train(train, seed=0, embedding=e) for e in (None, EMBEDDING))
    assert mean(both.accuracy(other)) >= mean(alone.accuracy(other)) + 0.01
    assert mean(both.accuracy(other, snippet_chars=100)) >= mean(alone.accuracy(other, snippet_chars=100)) + 0.02


def test_a_none_class_learns_text_of_no_domain_and_routes_never_name_it():
    """data/routing's text of no domain (the Debian handbook and reference) trains a `none` class beside the
    specialists. Trained on the handbook, the model gives the Debian Reference (a source it never saw) a higher
    probability of `none` than the corpus's own test documents, and far more of them reach `serve.none_threshold`;
    `route()` still names a specialist, with its share of the specialists' probability as the confidence."""
    from senmon.config import NO_DOMAIN, ServeConfig
    from senmon.ingest.routing_texts import read_routing_texts

    routing = CORPUS.parent / "routing"
    handbook = read_routing_texts(routing, {NO_DOMAIN}, leave_out={"debian-reference-en"})[NO_DOMAIN][:150]
    reference = read_routing_texts(routing, {NO_DOMAIN}, leave_out={"debian-handbook"})[NO_DOMAIN][:100]
    model = RoutingModel.loads(RoutingModel.train({**texts("train", 60), NO_DOMAIN: handbook}, seed=0).dumps())
    assert NO_DOMAIN in model.labels
    in_domain = [t for docs in texts("test", 20).values() for t in docs]
    unseen, known = model.route(reference), model.route(in_domain)
    threshold = ServeConfig().none_threshold

    def share(routes) -> float:
        return sum(r.none >= threshold for r in routes) / len(routes)

    assert np.mean([r.none for r in unseen]) > np.mean([r.none for r in known]) + 0.3
    assert share(unseen) >= 0.6 and share(known) <= 0.1, (share(unseen), share(known))
    for r in unseen + known:
        assert r.specialist in DOMAINS and r.none == pytest.approx(r.scores[NO_DOMAIN])
        assert r.confidence == pytest.approx(r.scores[r.specialist] / (1 - r.none))


def test_a_model_without_a_none_class_says_none_is_zero(words_chars_model):
    assert all(r.none == 0.0 for r in words_chars_model.route(["GNU General Public License", "吾輩は猫である"]))
