"""The routing model: which specialist should answer a text, and how sure that is.

Features (WORDS_CHARS, the default) are hashed word 1-2-grams and character 2-4-grams within words of the text
with its layout taken out (`normalise_layout`: NFKC, lower case, digits as 0, rules such as ===== folded, all
whitespace one space), so the model learns what a domain's texts say rather than how the one source it was
trained on lays them out; char n-grams within "words" also cover Japanese, which has no spaces. A log-loss
linear model on top (SGD) gives probabilities; the router falls back to the generalist when the best one is below
a threshold. It is trained on every specialist's training split and, where the config names a `routing_dir`
(data/routing: the same domains' other sources, ingest/routing_texts.py), on that text too, cut into snippets of
prompt length (one of them with its markup characters stripped) as well as whole documents, so a short question
routes as well as a long document. bench/routing.py measures it against the first model (CHAR13: char
1-3-grams of the lower-cased text, logistic regression; still loadable) on sources the corpus does not use;
docs/serving.md has the numbers.
Predicting one prompt takes about a millisecond: `RoutingModel.scores` hashes each text's features itself
(`hashed_features`, the same numbers as scikit-learn's HashingVectorizer, which spends 1.5 ms of checks and sparse
matrix building on one short text) and reads only those rows of the weights. For WORDS_CHARS it also keeps the
columns of each word and whitespace-separated token it has seen (`GramColumns`), so a long prompt costs dictionary
lookups rather than one MurmurHash call per n-gram (a 2,000-character prompt had 5,000 n-grams).
Since 28 Nov the model has a second view of each text (`embedding`, on by default): the mean of its token vectors
in WordLlama's static embedding (train/embedding.py, from PyPI), with a logistic regression of its own; the two
views' log-probabilities are mixed with `EMBEDDING_WEIGHT` on the embedding's (chosen on validation text,
bench/routing.py). The n-grams know each source's words; the embedding knows which words mean similar things,
which is what a source the model never saw shares with the ones it did.
Since 28 Nov evening the routing_dir also holds text of no specialist's domain (the English Debian Reference and
Debian Administrator's Handbook), which `train_router` turns into a class of its own, NO_DOMAIN ("none"). `route()`
still names the likeliest specialist, with its share of the specialists' probability as the confidence, and adds the
probability of `none`, from which the router sends a prompt to the fallback (`serve.none_threshold`).
"""

from __future__ import annotations

import io
import json
import random
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
from scipy.special import expit, softmax
from sklearn.dummy import DummyClassifier
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.utils import murmurhash3_32

from senmon.config import NO_DOMAIN

SNIPPET_CHARS = (40, 300)  # prompt-like lengths cut from each training document
SNIPPETS_PER_DOC = 3
CHAR13 = "char13"  # hashed char 1-3-grams of the lower-cased text (the first routing model)
WORDS_CHARS = "words+chars"  # word 1-2-grams + char 2-4-grams within words, of text with its layout taken out
FEATURES = (CHAR13, WORDS_CHARS)
DEFAULT_FEATURES = WORDS_CHARS  # chosen on held-out sources: bench/routing.py, docs/serving.md
EMBEDDING = "wordllama"  # the second view: train/embedding.py
DEFAULT_EMBEDDING: str | None = EMBEDDING
EMBEDDING_WEIGHT = 0.2  # its share of the log-probabilities: the least validation log loss (bench/routing.py)


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


_RUN = re.compile(r"([^\w\s])\1+")  # ===, ----, ***: reST and Markdown rules and underlines
_DIGITS = re.compile(r"\d")
_SPACE = re.compile(r"\s+")


def normalise_layout(text: str) -> str:
    """What a text says, not how its source laid it out: NFKC, lower case, every digit 0, runs of one punctuation
    mark folded to one, and all whitespace (indentation, line breaks, wrapping) folded to one space."""
    text = _DIGITS.sub("0", unicodedata.normalize("NFKC", text).lower())
    return _SPACE.sub(" ", _RUN.sub(r"\1", text)).strip()


_WORD = re.compile(r"\w+")


def words_and_chars(text: str) -> list[str]:
    """The WORDS_CHARS features of a text: word 1-2-grams and char 2-4-grams within words (padded with a space,
    as scikit-learn's char_wb), of `normalise_layout(text)`. One analyzer, so one hashing pass per prompt."""
    text = normalise_layout(text)
    words = _WORD.findall(text)
    grams = ["w " + w for w in words]
    grams += ["w " + a + " " + b for a, b in zip(words, words[1:])]
    for token in text.split(" "):
        padded = f" {token} "
        for n in (2, 3, 4):
            grams += [padded[i:i + n] for i in range(len(padded) - n + 1)]
    return grams


def vectorizer(features: str = CHAR13):
    if features == CHAR13:
        return HashingVectorizer(analyzer="char", ngram_range=(1, 3), n_features=2**18, preprocessor=normalise,
                                 alternate_sign=False, norm="l2")
    if features == WORDS_CHARS:
        return HashingVectorizer(analyzer=words_and_chars, n_features=2**20, alternate_sign=False, norm="l2")
    raise ValueError(f"unknown routing features {features!r}; choose from {', '.join(FEATURES)}")


def gram_column(gram: str, n_features: int) -> int:
    """HashingVectorizer's column of one n-gram (alternate_sign=False): |signed MurmurHash3, seed 0| mod n_features."""
    return abs(murmurhash3_32(gram, seed=0)) % n_features


class GramColumns:
    """The hashed columns of `words_and_chars(text)` (the same multiset, in another order), from a bounded cache of
    each word's and each token's columns: natural text repeats its words, so most of a prompt is lookups."""

    def __init__(self, n_features: int, max_entries: int = 100_000):
        self.n_features, self.max_entries = n_features, max_entries
        self._words: dict[str, int] = {}  # "w word" and "w word word" -> column
        self._tokens: dict[str, np.ndarray] = {}  # " token " (padded) -> the columns of its char 2-4-grams

    def _lookup(self, cache: dict, keys: list[str], compute) -> list:
        try:  # the common case, every key seen before: one comprehension of lookups
            return [cache[key] for key in keys]
        except KeyError:
            if len(cache) + len(keys) > self.max_entries:
                cache.clear()
            result = []
            for key in keys:  # not read back from the cache afterwards: another thread may have cleared it
                value = cache.get(key)
                if value is None:
                    value = cache[key] = compute(key)
                result.append(value)
            return result

    def _token_columns(self, padded: str) -> np.ndarray:
        grams = [padded[i:i + n] for n in (2, 3, 4) for i in range(len(padded) - n + 1)]
        return np.fromiter((gram_column(g, self.n_features) for g in grams), dtype=np.int64, count=len(grams))

    def __call__(self, text: str) -> np.ndarray:
        text = normalise_layout(text)
        words = _WORD.findall(text)
        grams = ["w " + w for w in words] + ["w " + a + " " + b for a, b in zip(words, words[1:])]
        singles = self._lookup(self._words, grams, lambda gram: gram_column(gram, self.n_features))
        parts = self._lookup(self._tokens, [f" {token} " for token in text.split(" ")], self._token_columns)
        parts.append(np.array(singles, dtype=np.int64))
        return np.concatenate(parts)


def l2_counts(columns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique columns, their counts l2-normalised): HashingVectorizer's norm="l2" row."""
    columns, counts = np.unique(columns, return_counts=True)
    values = counts.astype(np.float64)
    if values.size:
        values /= np.sqrt(values @ values)
    return columns, values


def hashed_features(grams: list[str], n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """One text's features as HashingVectorizer(alternate_sign=False, norm="l2") computes them: the column of each
    n-gram (the absolute value of its signed 32-bit MurmurHash3, seed 0, modulo `n_features`), the counts of each
    column, l2-normalised. Returns (columns, values); no columns for a text without n-grams."""
    return l2_counts(np.fromiter((gram_column(g, n_features) for g in grams), dtype=np.int64, count=len(grams)))


def snippets(text: str, rng: random.Random, count: int = SNIPPETS_PER_DOC) -> list[str]:
    pieces = [text]
    for _ in range(count):
        length = rng.randint(*SNIPPET_CHARS)
        if len(text) <= length:
            break
        start = rng.randrange(0, len(text) - length)
        pieces.append(text[start:start + length])
    return pieces


def multinomial(decision: np.ndarray) -> np.ndarray:
    """LogisticRegression's predict_proba from its decision function: softmax, or for two classes (one logit) the
    logistic of it."""
    if decision.shape[1] == 1:
        positive = expit(decision[:, 0])
        return np.column_stack([1 - positive, positive])
    return softmax(decision, axis=1)


def mix(ngrams: np.ndarray, embedded: np.ndarray, weight: float) -> np.ndarray:
    """The two views' probabilities as one: softmax((1 - weight) log p_ngrams + weight log p_embedding)."""
    return softmax((1 - weight) * np.log(np.maximum(ngrams, 1e-12)) + weight * np.log(np.maximum(embedded, 1e-12)),
                   axis=1)


@dataclass
class Route:
    """`specialist`: the likeliest specialist, never NO_DOMAIN; `confidence`: its share of the specialists' probability
    (the probabilities without NO_DOMAIN, renormalised); `none`: the probability that the text belongs to no
    specialist (0 for a routing model trained without NO_DOMAIN text); `scores`: every label's probability."""
    specialist: str
    confidence: float
    scores: dict[str, float]
    views: dict[str, dict[str, float]] | None = None  # with the embedding: each view's own probabilities, before mixing
    none: float = 0.0


def read_scores(scores: dict[str, float]) -> tuple[str, float, float]:
    """(the likeliest specialist, its share of the specialists' probability, the probability of NO_DOMAIN) from a
    routing model's probabilities: how `Route` and the benchmarks read them."""
    none = scores.get(NO_DOMAIN, 0.0)
    best = max((label for label in scores if label != NO_DOMAIN), key=scores.__getitem__)
    return best, scores[best] / max(1.0 - none, 1e-12), none


_MARKUP = re.compile(r"[*_`#|<>{}\[\]=~^]+")


def augmented(text: str, rng: random.Random, features: str) -> list[str]:
    """The training pieces of one document: itself and prompt-length snippets; for WORDS_CHARS also one snippet
    with its markup characters stripped, so no source's markup is needed to recognise its domain."""
    pieces = snippets(text, rng)
    if features != CHAR13:
        pieces.append(_MARKUP.sub(" ", rng.choice(pieces)))
    return pieces


class RoutingModel:
    """Hashed n-gram features + a log-loss linear model over the specialists' names, and (with `embedding`) a
    logistic regression over the text's mean static-embedding vector, the two mixed in log-probability."""

    def __init__(self, classifier: LogisticRegression | SGDClassifier | DummyClassifier, meta: dict,
                 embedding_classifier: LogisticRegression | None = None):
        self.classifier = classifier
        self.meta = meta
        self.embedding_classifier = embedding_classifier
        self._embedding = None
        if embedding_classifier is not None:
            from senmon.train.embedding import load

            self._embedding = load(meta["embedding"]["sha256"])
            if [str(c) for c in embedding_classifier.classes_] != [str(c) for c in classifier.classes_]:
                raise ValueError("the routing model's two classifiers name different specialists")
            self._embedding_weights = np.ascontiguousarray(embedding_classifier.coef_.T)
            self._embedding_bias = np.asarray(embedding_classifier.intercept_)
            self._embedding_weight = float(meta["embedding"]["weight"])
        self.features = meta.get("features", CHAR13)  # models saved before features had names are CHAR13
        self.vectorizer = vectorizer(self.features)
        self._analyzer = self.vectorizer.build_analyzer()
        self._columns = GramColumns(self.vectorizer.n_features) if self.features == WORDS_CHARS else None
        self.labels: list[str] = [str(label) for label in classifier.classes_]
        self._weights = self._bias = None
        if hasattr(classifier, "coef_"):  # not the one-specialist model
            # weights stored column-major, so coef_.T is C-contiguous: scipy would otherwise copy coef_.T (tens of
            # MB with 2**20 features) on every product, most of a prompt's routing time
            classifier.coef_ = np.asfortranarray(classifier.coef_)
            self._weights = classifier.coef_.T
            self._bias = np.asarray(classifier.intercept_)

    @classmethod
    def train(cls, texts_by_specialist: dict[str, list[str]], seed: int = 0, features: str = DEFAULT_FEATURES,
              embedding: str | None = DEFAULT_EMBEDDING, embedding_weight: float = EMBEDDING_WEIGHT) -> "RoutingModel":
        """`embedding`: EMBEDDING adds the static-embedding view (train/embedding.py), None trains n-grams alone."""
        if embedding not in (None, EMBEDDING):
            raise ValueError(f"unknown routing embedding {embedding!r}; choose {EMBEDDING!r} or None")
        rng = random.Random(seed)
        texts, labels = [], []
        for name, docs in sorted(texts_by_specialist.items()):
            for doc in docs:
                for piece in augmented(doc, rng, features):
                    texts.append(piece)
                    labels.append(name)
        started = time.monotonic()
        matrix = vectorizer(features).transform(texts)
        if len(set(labels)) == 1:  # one specialist: nothing to tell apart, every text is its (confidence 1)
            classifier = DummyClassifier(strategy="prior")
        elif features == CHAR13:
            classifier = LogisticRegression(C=10.0, max_iter=300)
        else:  # the same log loss by SGD: seconds instead of minutes on the larger feature space
            classifier = SGDClassifier(loss="log_loss", alpha=1e-5, max_iter=20, tol=None, random_state=seed)
        classifier.fit(matrix, labels)
        meta = {"trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "features": features,
                "examples": len(texts), "documents": {k: len(v) for k, v in texts_by_specialist.items()}}
        embedding_classifier = None
        if embedding and len(set(labels)) > 1:
            from senmon.train.embedding import MAX_TOKENS, NAME, load

            model = load()
            embedding_classifier = LogisticRegression(C=10.0, max_iter=2000).fit(model.embed(texts), labels)
            meta["embedding"] = {"name": NAME, "sha256": model.sha256, "weight": embedding_weight,
                                 "max_tokens": MAX_TOKENS}
        meta["train_s"] = time.monotonic() - started
        return cls(classifier, meta, embedding_classifier)

    def scores(self, texts: list[str]) -> np.ndarray:
        """Class probabilities per text: the n-gram classifier's (as its predict_proba computes them), mixed with the
        embedding classifier's where the model has one: softmax((1 - w) log p_ngrams + w log p_embedding)."""
        return self._mixed(*self.views(texts))

    def _mixed(self, ngrams: np.ndarray, embedded: np.ndarray | None) -> np.ndarray:
        return ngrams if embedded is None else mix(ngrams, embedded, self._embedding_weight)

    def views(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray | None]:
        """Each view's probabilities: the n-gram classifier's, and the embedding classifier's (None without one)."""
        ngrams = self.ngram_scores(texts)
        if self._embedding is None:
            return ngrams, None
        return ngrams, multinomial(self._embedding.embed(texts) @ self._embedding_weights + self._embedding_bias)

    def ngram_scores(self, texts: list[str]) -> np.ndarray:
        """The n-gram classifier's probabilities alone."""
        if self._weights is None:  # the one-specialist model
            return np.ones((len(texts), 1))
        decision = np.empty((len(texts), self._weights.shape[1]))
        for row, text in enumerate(texts):  # the rows of the weights each text's features select
            if self._columns is not None:
                columns, values = l2_counts(self._columns(text))
            else:
                columns, values = hashed_features(self._analyzer(text), self.vectorizer.n_features)
            decision[row] = values @ self._weights[columns]
        decision += self._bias
        if decision.shape[1] == 1 or isinstance(self.classifier, LogisticRegression):
            return multinomial(decision)
        probabilities = expit(decision)  # SGD's one-vs-rest log loss, normalised as sklearn does
        return probabilities / probabilities.sum(axis=1, keepdims=True)

    def route(self, texts: list[str]) -> list[Route]:
        ngrams, embedded = self.views(texts)
        mixed = self._mixed(ngrams, embedded)
        result = []
        for index, row in enumerate(mixed):
            scores = dict(zip(self.labels, map(float, row)))
            best, confidence, none = read_scores(scores)
            views = None if embedded is None else {
                "ngrams": dict(zip(self.labels, map(float, ngrams[index]))),
                "embedding": dict(zip(self.labels, map(float, embedded[index]))), "weight": self._embedding_weight}
            result.append(Route(best, confidence, scores, views, none))
        return result

    def accuracy(self, texts_by_specialist: dict[str, list[str]], snippet_chars: int | None = None,
                 seed: int = 1) -> dict[str, float]:
        """Accuracy per specialist on whole documents, or on one snippet of `snippet_chars` per document."""
        rng = random.Random(seed)
        result = {}
        for name, docs in sorted(texts_by_specialist.items()):
            if snippet_chars:
                docs = [d if len(d) <= snippet_chars else d[(s := rng.randrange(0, len(d) - snippet_chars)):s + snippet_chars]
                        for d in docs]
            if docs:
                predicted = [r.specialist for r in self.route(docs)]
                result[name] = sum(p == name for p in predicted) / len(docs)
        return result

    # ----------------------------------------------------------------- persistence

    def dumps(self) -> bytes:
        buffer = io.BytesIO()
        joblib.dump({"classifier": self.classifier, "meta": self.meta,  # hashed: mostly zeros
                     "embedding_classifier": self.embedding_classifier}, buffer, compress=3)
        return buffer.getvalue()

    @classmethod
    def loads(cls, data: bytes) -> "RoutingModel":
        payload = joblib.load(io.BytesIO(data))
        return cls(payload["classifier"], payload["meta"], payload.get("embedding_classifier"))


def router_paths(base: str) -> tuple[str, str]:
    return f"{base}/router/router.joblib", f"{base}/router/router.json"


def train_router(config, store) -> RoutingModel:
    """Train on every specialist's training split and the config's `routing_dir` text of its domains (and, where
    the directory has some, text of no domain as the NO_DOMAIN class), measure on the store's test split, save under
    the storage root."""
    from senmon.ingest.routing_texts import read_routing_texts
    from senmon.storage import filesystem, write_atomic

    extra = {}
    if config.routing_dir is not None:
        if not Path(config.routing_dir).is_dir():
            raise FileNotFoundError(f"routing_dir {config.routing_dir} does not exist (set routing_dir: null to train "
                                    "the routing model on the dataset store alone)")
        extra = read_routing_texts(config.routing_dir, {d for s in config.specialists for d in s.domains} | {NO_DOMAIN})
    train = {s.name: [t for d in s.domains for t in store.texts(d, "train") + extra.get(d, [])]
             for s in config.specialists}
    if extra.get(NO_DOMAIN):  # text of no specialist's domain: a class of its own, which the router sends to the fallback
        train[NO_DOMAIN] = extra[NO_DOMAIN]
    test = {s.name: [t for d in s.domains for t in store.texts(d, "test")] for s in config.specialists}
    model = RoutingModel.train(train, seed=config.training.seed)
    model.meta["routing_dir_documents"] = {d: len(texts) for d, texts in sorted(extra.items())}
    model.meta["test_accuracy_documents"] = model.accuracy(test)
    model.meta["test_accuracy_snippets_100"] = model.accuracy(test, snippet_chars=100)
    fs, base = filesystem(config.storage_root)
    model_path, meta_path = router_paths(base)
    write_atomic(fs, model_path, model.dumps())
    write_atomic(fs, meta_path, json.dumps(model.meta, indent=2).encode())
    return model


def load_router(storage_root: str) -> RoutingModel | None:
    """The saved routing model, or None when none has been trained yet."""
    from senmon.storage import filesystem, read_bytes

    fs, base = filesystem(storage_root)
    data = read_bytes(fs, router_paths(base)[0])
    if data is None:
        return None
    model = RoutingModel.loads(data)
    model.route(["warm-up"])  # the first call pays one-time costs (25 ms here, 1.5 ms after), not a first request
    return model
