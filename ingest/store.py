"""The dataset store: every domain's documents as Parquet shards under the storage root.

Layout: `{storage_root}/datasets/{domain}/{split}/{shard}.parquet`, one row per document with
the columns of `SCHEMA`. A shard is written under a temporary name and renamed into place, so a
reader never sees half a shard; a shard's name is derived from its content (or given by the
writer, e.g. from Kafka offsets), so writing the same shard twice is a no-op. The storage root
is a local path or any URI `pyarrow.fs` understands (s3://, gs://, ...). Ray Data reads the
same files for training.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from senmon.storage import filesystem, is_local

from .split import SPLITS, split_of

SCHEMA = pa.schema([
    ("id", pa.string()),
    ("domain", pa.string()),
    ("text", pa.string()),
    ("source", pa.string()),
])
# Shards written by the Kafka ingest bridge carry two more columns: who chose the domain
# ('producer' when the message named it, 'router' when the routing model assigned it) and the
# router's confidence. Readers that ask for SCHEMA simply do not see them.
INGESTED_SCHEMA = SCHEMA.append(pa.field("assigned_by", pa.string())).append(pa.field("route_confidence", pa.float64()))


@dataclass(frozen=True)
class DomainSummary:
    domain: str
    documents: dict[str, int]
    characters: dict[str, int]


def read_jsonl(path: str | Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


class DatasetStore:
    """Per-domain, per-split Parquet shards under `root` (a path or URI)."""

    def __init__(self, root: str):
        self.fs, base = filesystem(root)
        self.root = root
        self.base = base + "/datasets"

    # ----------------------------------------------------------------- paths

    def _dir(self, domain: str, split: str) -> str:
        return f"{self.base}/{domain}/{split}"

    def shard_paths(self, domain: str, split: str) -> list[str]:
        selector = pafs.FileSelector(self._dir(domain, split), allow_not_found=True)
        return sorted(i.path for i in self.fs.get_file_info(selector)  # not the .tmp- files of writes in progress
                      if i.path.endswith(".parquet") and not i.base_name.startswith("."))

    def uri(self, path: str) -> str:
        """The form of a path that Ray Data and other processes accept."""
        if is_local(self.fs):
            return path
        return f"{self.root.split('://', 1)[0]}://{path}"

    def domains(self) -> list[str]:
        selector = pafs.FileSelector(self.base, allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    # ----------------------------------------------------------------- writing

    def write_shard(self, rows: list[dict], name: str | None = None, schema: pa.Schema = SCHEMA) -> list[str]:
        """Write documents (all keys of `schema`) into one shard per (domain, split); returns the paths.

        The split is always `split_of(id)`, so a document can never land in two splits.
        """
        groups: dict[tuple[str, str], list[dict]] = {}
        for row in rows:
            groups.setdefault((row["domain"], split_of(row["id"])), []).append(row)
        written = []
        for (domain, split), group in sorted(groups.items()):
            group.sort(key=lambda r: r["id"])
            table = pa.table({k: [r[k] for r in group] for k in schema.names}, schema=schema)  # 3x from_pylist's speed
            shard = name or hashlib.sha256("\n".join(r["id"] for r in group).encode()).hexdigest()[:20]
            path = f"{self._dir(domain, split)}/{shard}.parquet"
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                written.append(path)
                continue
            self.fs.create_dir(self._dir(domain, split), recursive=True)
            tmp = f"{self._dir(domain, split)}/.tmp-{uuid.uuid4().hex}.parquet"
            pq.write_table(table, tmp, filesystem=self.fs)
            self.fs.move(tmp, path)  # atomic on a local or POSIX filesystem
            written.append(path)
        return written

    def seed_from_corpus(self, corpus_dir: str | Path, domains: Iterable[str],
                         exclude_ids: set[str] | frozenset = frozenset()) -> dict[str, int]:
        """Load the prepared JSONL corpus (data/corpus/<split>/<domain>.jsonl) as seed shards.

        `exclude_ids` holds documents back (the demo streams them in through Kafka later).
        """
        counts: Counter = Counter()
        for domain in domains:
            rows = []
            for split in SPLITS:
                path = Path(corpus_dir) / split / f"{domain}.jsonl"
                if path.exists():
                    rows.extend(r for r in read_jsonl(path) if r["id"] not in exclude_ids)
            if not rows:
                raise FileNotFoundError(f"no documents for domain {domain!r} under {corpus_dir}")
            self.write_shard(rows, name="seed")
            counts[domain] = len(rows)
        return dict(counts)

    # ----------------------------------------------------------------- reading

    def read_table(self, domain: str, split: str) -> pa.Table:
        """All documents of a domain and split, each id once (later shards may repeat an id)."""
        paths = self.shard_paths(domain, split)
        if not paths:
            return SCHEMA.empty_table()
        table = pa.concat_tables(pq.read_table(p, filesystem=self.fs, schema=SCHEMA) for p in paths)
        _, first = _unique_indices(table.column("id").to_pylist())
        return table.take(first) if len(first) != table.num_rows else table

    def ids(self, domain: str) -> set[str]:
        """Every document id of a domain, all splits (reads only the id column)."""
        return {doc_id for split in SPLITS for path in self.shard_paths(domain, split)
                for doc_id in pq.read_table(path, filesystem=self.fs, columns=["id"]).column("id").to_pylist()}

    def delete(self, paths: Iterable[str]) -> None:
        for path in paths:
            self.fs.delete_file(path)

    def texts(self, domain: str, split: str) -> list[str]:
        return self.read_table(domain, split).column("text").to_pylist()

    def ray_dataset(self, domains: Iterable[str], split: str):
        """A Ray Data dataset over the shards of `domains` and `split`."""
        import ray.data

        paths = [self.uri(p) for d in domains for p in self.shard_paths(d, split)]
        if not paths:
            raise FileNotFoundError(f"no {split} shards for {list(domains)} under {self.root}")
        return ray.data.read_parquet(paths, filesystem=None if is_local(self.fs) else self.fs, schema=SCHEMA)

    def summary(self, domains: Iterable[str]) -> list[DomainSummary]:
        result = []
        for domain in domains:
            docs, chars = {}, {}
            for split in SPLITS:
                table = self.read_table(domain, split)
                docs[split] = table.num_rows
                chars[split] = sum(len(t) for t in table.column("text").to_pylist())
            result.append(DomainSummary(domain, docs, chars))
        return result


def _unique_indices(ids: list[str]) -> tuple[set[str], list[int]]:
    seen: set[str] = set()
    first = []
    for index, doc_id in enumerate(ids):
        if doc_id not in seen:
            seen.add(doc_id)
            first.append(index)
    return seen, first
