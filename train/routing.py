"""The routing model: which specialist should answer a text, and how sure that is.

Features are hashed character n-grams (1 to 3) of the NFKC-normalised, lower-cased text, so
the model has no notion of words or spaces: Japanese, code and English are treated alike. A
multinomial logistic regression (scikit-learn) on top gives calibrated probabilities; the
router falls back to the generalist when the best one is below a threshold. It is trained on
every specialist's training split, cut into snippets of prompt length as well as whole
documents, so a short question routes as well as a long document. Predicting one prompt takes
well under a millisecond.
"""

from __future__ import annotations

import io
import json
import random
import time
import unicodedata
from dataclasses import dataclass

import joblib
import numpy as np
from sklearn.feature_extraction.text import HashingVectorizer
from sklearn.linear_model import LogisticRegression

SNIPPET_CHARS = (40, 300)  # prompt-like lengths cut from each training document
SNIPPETS_PER_DOC = 3


def normalise(text: str) -> str:
    return unicodedata.normalize("NFKC", text).lower()


def vectorizer() -> HashingVectorizer:
    return HashingVectorizer(analyzer="char", ngram_range=(1, 3), n_features=2**18, preprocessor=normalise,
                             alternate_sign=False, norm="l2")


def snippets(text: str, rng: random.Random, count: int = SNIPPETS_PER_DOC) -> list[str]:
    pieces = [text]
    for _ in range(count):
        length = rng.randint(*SNIPPET_CHARS)
        if len(text) <= length:
            break
        start = rng.randrange(0, len(text) - length)
        pieces.append(text[start:start + length])
    return pieces


@dataclass
class Route:
    specialist: str
    confidence: float
    scores: dict[str, float]


class RoutingModel:
    """Hashed char n-grams + logistic regression over the specialists' names."""

    def __init__(self, classifier: LogisticRegression, meta: dict):
        self.classifier = classifier
        self.meta = meta
        self.vectorizer = vectorizer()
        self.labels: list[str] = [str(label) for label in classifier.classes_]

    @classmethod
    def train(cls, texts_by_specialist: dict[str, list[str]], seed: int = 0) -> "RoutingModel":
        rng = random.Random(seed)
        texts, labels = [], []
        for name, docs in sorted(texts_by_specialist.items()):
            for doc in docs:
                for piece in snippets(doc, rng):
                    texts.append(piece)
                    labels.append(name)
        started = time.monotonic()
        features = vectorizer().transform(texts)
        classifier = LogisticRegression(C=10.0, max_iter=300)
        classifier.fit(features, labels)
        meta = {"trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "examples": len(texts),
                "documents": {k: len(v) for k, v in texts_by_specialist.items()},
                "train_s": time.monotonic() - started}
        return cls(classifier, meta)

    def scores(self, texts: list[str]) -> np.ndarray:
        return self.classifier.predict_proba(self.vectorizer.transform(texts))

    def route(self, texts: list[str]) -> list[Route]:
        result = []
        for row in self.scores(texts):
            best = int(np.argmax(row))
            result.append(Route(self.labels[best], float(row[best]), dict(zip(self.labels, map(float, row)))))
        return result

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(specialist, confidence) per text: the form the ingest side takes."""
        return [(r.specialist, r.confidence) for r in self.route(texts)]

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
        joblib.dump({"classifier": self.classifier, "meta": self.meta}, buffer)
        return buffer.getvalue()

    @classmethod
    def loads(cls, data: bytes) -> "RoutingModel":
        payload = joblib.load(io.BytesIO(data))
        return cls(payload["classifier"], payload["meta"])


def router_paths(base: str) -> tuple[str, str]:
    return f"{base}/router/router.joblib", f"{base}/router/router.json"


def train_router(config, store) -> RoutingModel:
    """Train on every specialist's training split, measure on its test split, save under the storage root."""
    from senmon.storage import filesystem, write_atomic

    train = {s.name: [t for d in s.domains for t in store.texts(d, "train")] for s in config.specialists}
    test = {s.name: [t for d in s.domains for t in store.texts(d, "test")] for s in config.specialists}
    model = RoutingModel.train(train, seed=config.training.seed)
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
    return RoutingModel.loads(data) if data is not None else None
