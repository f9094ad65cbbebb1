"""Training data as Ray Data: a domain's documents from the dataset store, tokenized and packed.

Documents are tokenized with the shared tokenizer, joined with an end-of-text token between
them, and cut into fixed blocks of `seq_len` tokens (the remainder of each batch of documents is
dropped, a small fraction). Ray Data runs the tokenization on the cluster's CPUs and streams the
blocks to the Ray Train workers.
"""

from __future__ import annotations

import numpy as np
import ray.data

from tokenizers import Tokenizer

from .tokenizer import encode_documents, wrap

DOCS_PER_BATCH = 256


class PackTokens:
    """Ray Data `map_batches` callable: texts -> rows of `seq_len` token ids."""

    def __init__(self, tokenizer_json: str, seq_len: int):
        self.tokenizer = wrap(Tokenizer.from_str(tokenizer_json))
        self.seq_len = seq_len

    def __call__(self, batch: dict) -> dict:
        stream = np.asarray(encode_documents(self.tokenizer, list(batch["text"])), dtype=np.int64)
        usable = (len(stream) // self.seq_len) * self.seq_len
        return {"tokens": stream[:usable].reshape(-1, self.seq_len)}


def token_blocks(store, domains: list[str], split: str, tokenizer_json: str, seq_len: int):
    """A materialized Ray dataset of token blocks (so its size is known before sizing the model)."""
    dataset = store.ray_dataset(domains, split).select_columns(["text"])
    packed = dataset.map_batches(PackTokens, fn_constructor_kwargs={"tokenizer_json": tokenizer_json, "seq_len": seq_len},
                                 batch_size=DOCS_PER_BATCH, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1),
                                 num_cpus=1)
    return packed.materialize()
