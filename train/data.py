"""Training data as Ray Data: a domain's documents from the dataset store, tokenized and packed.

Documents are tokenized with the shared tokenizer, joined with an end-of-text token between
them, and cut into fixed blocks of `seq_len` tokens (the remainder of each batch of documents is
dropped, a small fraction). The blocks reach the Ray Train workers as a Ray dataset either way:

- a large split: Ray Data reads the shards and packs them on the cluster's CPUs, as tasks with
  `tokenizers` alone (no transformers to import);
- a split under `training.tokenize_in_job_below_mb`: the job reads the shards with pyarrow (each
  document once, as `DatasetStore.read_table` does; Ray Data reads a repeated id twice) and
  packs them in its own process (the Rust tokenizer uses every core), then hands the blocks over
  with `ray.data.from_arrow`. Ray Data's parquet listing alone costs 10-15 s per dataset on this
  machine, where packing a domain of the shipped corpus takes 0.3 s.

Both pack batches of up to 256 documents the same way; where Ray Data's batches end depends on its
blocks, so on the same documents the two differ only in which partial blocks are dropped (a test
compares them).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .tokenizer import bare_tokenizer, encode_documents

DOCS_PER_BATCH = 256


def pack(tokenizer, texts: list[str], seq_len: int) -> np.ndarray:
    """Texts -> [blocks, seq_len] token ids, documents joined by EOS, the last partial block dropped
    (every path that trains packs this way: Ray Data, in-job, the fast retrain, the benchmarks)."""
    stream = np.asarray(encode_documents(tokenizer, texts), dtype=np.int64)
    usable = (len(stream) // seq_len) * seq_len
    return stream[:usable].reshape(-1, seq_len)


def pack_tokens(batch: dict, tokenizer_json: str, seq_len: int) -> dict:
    """Ray Data `map_batches` function: texts -> rows of `seq_len` token ids."""
    return {"tokens": pack(bare_tokenizer(tokenizer_json), list(batch["text"]), seq_len)}


def split_bytes(store, domains: list[str], split: str) -> int:
    """The size of a split's shards on storage."""
    paths = [p for d in domains for p in store.shard_paths(d, split)]
    return sum(info.size or 0 for info in store.fs.get_file_info(paths)) if paths else 0


def token_blocks(store, domains: list[str], split: str, tokenizer_json: str, seq_len: int,
                 in_job_below_mb: float = 0.0):
    """A materialized Ray dataset of token blocks (so its size is known before sizing the model);
    packed in this process when the split's shards are under `in_job_below_mb`, by Ray Data otherwise."""
    import ray.data

    if split_bytes(store, domains, split) < in_job_below_mb * 2**20:
        from ray.data.extensions import ArrowTensorArray

        tokenizer = bare_tokenizer(tokenizer_json)
        parts = []
        for domain in domains:  # batches of DOCS_PER_BATCH documents, as Ray Data's map_batches packs them
            texts = store.texts(domain, split)
            parts += [pack(tokenizer, texts[i:i + DOCS_PER_BATCH], seq_len) for i in range(0, len(texts), DOCS_PER_BATCH)]
        blocks = np.concatenate(parts) if parts else np.zeros((0, seq_len), dtype=np.int64)
        return ray.data.from_arrow(pa.table({"tokens": ArrowTensorArray.from_numpy(blocks)}))
    dataset = store.ray_dataset(domains, split).select_columns(["text"])
    packed = dataset.map_batches(pack_tokens, fn_kwargs={"tokenizer_json": tokenizer_json, "seq_len": seq_len},
                                 batch_size=DOCS_PER_BATCH, batch_format="numpy", num_cpus=1)
    return packed.materialize()
