"""A static word embedding for the routing model, from a package registry, never from a model hub.

WordLlama (PyPI `wordllama`, MIT) ships a small embedding inside its wheel: 32,000 token vectors of 256 numbers
(`weights/l2_supercat_256.safetensors`, float16, 16 MB; 32 MB as float32 in memory) over Llama 2's tokenizer (`tokenizers/...json`), trained
so that the mean of a text's token vectors places texts by meaning. The routing model (train/routing.py) uses it
as a second view of a prompt beside its hashed n-grams: a text's vector is the mean of its first `MAX_TOKENS`
token vectors, l2-normalised. Only the two files are read, from the installed package's directory (located
without importing the package, whose import configures logging and whose loader fetches files it lacks from
Hugging Face); the weights' sha256 is checked against the one a routing model was trained with, so a different
package version is an error rather than quietly different routing. `bench/routing.py` measures what it adds
(docs/serving.md, "Routing on unseen sources").
"""

from __future__ import annotations

import hashlib
import importlib.util
import threading
from pathlib import Path

import numpy as np

NAME = "wordllama-l2-supercat-256"
PACKAGE = "wordllama"
WEIGHTS = "weights/l2_supercat_256.safetensors"
TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
MAX_TOKENS = 256  # token vectors averaged per text (the router reads at most 2,000 characters, about 500 tokens)
# characters tokenized per text: on 3,353 corpus and held-out documents cut to 2,000 characters, the first 1,500 gave
# the same first MAX_TOKENS tokens for all but one (1,200: 18; 1,000: 423), for three quarters of the tokenizing
MAX_CHARS = 1_500

_lock = threading.Lock()
_loaded: dict[str, "StaticEmbedding"] = {}


class EmbeddingMissing(RuntimeError):
    """The routing model needs the embedding and the package that ships it is not installed (or differs)."""


def package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingMissing(f"the routing model's word embedding comes from the `{PACKAGE}` package, which is not "
                               "installed: `pip install -e .` (it is one of senmon's dependencies)")
    return Path(list(spec.submodule_search_locations)[0])


class StaticEmbedding:
    """Mean token vectors of texts: `embed(texts)` -> float32 array [len(texts), 256], rows l2-normalised."""

    def __init__(self, weights: Path, tokenizer: Path):
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        data = weights.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()
        # float16 in the file, float32 here (32 MB): gathering float16 rows and casting them took 0.23 ms a prompt, 0.06
        self.vectors = next(iter(load_file(str(weights)).values())).astype(np.float32)
        self.tokenizer = Tokenizer.from_file(str(tokenizer))
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.dim = int(self.vectors.shape[1])

    def embed(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 1:  # the router's case: encode_batch's thread pool costs more than it saves on one text
            encoded = [self.tokenizer.encode(texts[0][:MAX_CHARS], add_special_tokens=False)]
        else:
            encoded = self.tokenizer.encode_batch([t[:MAX_CHARS] for t in texts], add_special_tokens=False)
        for row, encoding in enumerate(encoded):
            ids = encoding.ids[:MAX_TOKENS]
            if ids:
                vector = self.vectors[ids].mean(axis=0)
                norm = float(np.linalg.norm(vector))
                if norm > 0:
                    out[row] = vector / norm
        return out


def load(sha256: str | None = None) -> StaticEmbedding:
    """The embedding, loaded once per process; `sha256`: the weights a routing model was trained with."""
    with _lock:
        if NAME not in _loaded:
            root = package_dir()
            _loaded[NAME] = StaticEmbedding(root / WEIGHTS, root / TOKENIZER)
        embedding = _loaded[NAME]
    if sha256 is not None and embedding.sha256 != sha256:
        raise EmbeddingMissing(f"the installed {PACKAGE} package's {WEIGHTS} (sha256 {embedding.sha256[:12]}) is not "
                               f"the one this routing model was trained with ({sha256[:12]}): install the version in "
                               "pyproject.toml, or retrain the routing model")
    return embedding
