"""The deterministic train / validation / test split, by document id.

A document's split depends on its id alone (a SHA-256 bucket), so the shipped corpus, the
dataset store and documents arriving later through Kafka all agree, a document never crosses
splits, and the answer is the same on every machine and in every run.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")
FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}
_BUCKETS = 10_000


def split_of(doc_id: str) -> str:
    """'train', 'validation' or 'test' for a document id."""
    bucket = int.from_bytes(hashlib.sha256(doc_id.encode("utf-8")).digest()[:8], "big") % _BUCKETS
    edge = 0.0
    for split in SPLITS:
        edge += FRACTIONS[split] * _BUCKETS
        if bucket < edge:
            return split
    return SPLITS[-1]
