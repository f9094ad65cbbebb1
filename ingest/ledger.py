"""The batch ledger: which Kafka offset ranges are durably in the dataset store, and what they held.

An ingest actor writes a batch of one partition in three steps: the Parquet shards (named from
topic, partition, offset range and a fingerprint of the first message, `shard_name`), then one
small JSON manifest for the batch under `{storage_root}/ingest/batches/{topic}/p{partition}/`,
then the Kafka offset commit. The manifest is the moment the batch counts: a shard without one
is an orphan of an interrupted batch and is deleted before the partition is read again, and a
manifest found where the committed offset points means the batch was durable but its commit was
lost, so the actor skips it instead of writing it twice.

The fingerprint (a hash of the first message's coordinates, timestamp and bytes) ties a manifest
to the exact message it started at. A broker whose topic was recreated (the embedded broker
keeps nothing across restarts, and real Kafka forgets the offsets of an idle group after its
retention period) starts again at offset 0 with other messages; their fingerprints differ, so
old manifests are never mistaken for new batches and old shards are never overwritten.

The supervisor reads the manifests to count new documents per specialist (`Ledger.manifests`).
"""

from __future__ import annotations

import hashlib
import json
import re

import pyarrow.fs as pafs

from senmon.storage import filesystem, read_bytes, write_atomic

_MANIFEST = re.compile(r"^(\d{12})-(\d{12})-([0-9a-f]+)\.json$")


def fingerprint(topic: str, partition: int, offset: int, timestamp: int | None, value: bytes | None) -> str:
    digest = hashlib.sha256(f"{topic}\0{partition}\0{offset}\0{timestamp}\0".encode())
    digest.update(value or b"")
    return digest.hexdigest()[:12]


def shard_prefix(topic: str, partition: int) -> str:
    return f"kafka-{topic}-p{partition}-"


def shard_name(topic: str, partition: int, first: int, last: int, print_: str) -> str:
    """The shard name of a batch: the same batch replayed gets the same name."""
    return f"{shard_prefix(topic, partition)}{first:012d}-{last:012d}-{print_}"


def parse_shard_name(name: str) -> tuple[str, int, int, int, str] | None:
    """(topic, partition, first, last, fingerprint) of an ingest shard name, None for other shards."""
    match = re.match(r"^kafka-(.+)-p(\d+)-(\d{12})-(\d{12})-([0-9a-f]+)$", name)
    if not match:
        return None
    topic, partition, first, last, print_ = match.groups()
    return topic, int(partition), int(first), int(last), print_


class Ledger:
    """Batch manifests under `{storage_root}/ingest/batches`."""

    def __init__(self, storage_root: str):
        self.fs, base = filesystem(storage_root)
        self.base = f"{base}/ingest/batches"
        self._cache: dict[str, dict] = {}  # manifests never change once written

    def _dir(self, topic: str, partition: int) -> str:
        return f"{self.base}/{topic}/p{partition}"

    def path(self, topic: str, partition: int, first: int, last: int, print_: str) -> str:
        return f"{self._dir(topic, partition)}/{first:012d}-{last:012d}-{print_}.json"

    def write(self, manifest: dict) -> str:
        path = self.path(manifest["topic"], manifest["partition"], manifest["first_offset"], manifest["last_offset"],
                         manifest["fingerprint"])
        write_atomic(self.fs, path, json.dumps(manifest, ensure_ascii=False, sort_keys=True).encode("utf-8"))
        self._cache[path] = manifest
        return path

    def _names(self, topic: str, partition: int) -> list[str]:
        selector = pafs.FileSelector(self._dir(topic, partition), allow_not_found=True)
        return [info.base_name for info in self.fs.get_file_info(selector) if _MANIFEST.match(info.base_name)]

    def find(self, topic: str, partition: int, first: int, print_: str) -> dict | None:
        """The manifest of the batch that started at offset `first` with this fingerprint, if any."""
        for name in self._names(topic, partition):
            start, _, found_print = _MANIFEST.match(name).groups()
            if int(start) == first and found_print == print_:
                return self._read(f"{self._dir(topic, partition)}/{name}")
        return None

    def has(self, topic: str, partition: int, first: int, last: int, print_: str) -> bool:
        return f"{first:012d}-{last:012d}-{print_}.json" in set(self._names(topic, partition))

    def _read(self, path: str) -> dict:
        if path not in self._cache:
            self._cache[path] = json.loads(read_bytes(self.fs, path))
        return self._cache[path]

    def manifests(self) -> list[dict]:
        """Every batch manifest (all topics and partitions), oldest first."""
        selector = pafs.FileSelector(self.base, recursive=True, allow_not_found=True)
        paths = [i.path for i in self.fs.get_file_info(selector)
                 if i.type == pafs.FileType.File and _MANIFEST.match(i.base_name)]
        return sorted((self._read(p) for p in paths), key=lambda m: (m["written_at"], m["partition"], m["first_offset"]))

    def orphan_shards(self, store, topic: str, partition: int, domains: list[str]) -> list[str]:
        """Shards of this partition that no manifest vouches for: leftovers of an interrupted batch."""
        from .split import SPLITS

        prefix, orphans = shard_prefix(topic, partition), []
        names = set(self._names(topic, partition))
        for domain in domains:
            for split in SPLITS:
                for path in store.shard_paths(domain, split):
                    parsed = parse_shard_name(path.rsplit("/", 1)[-1].removesuffix(".parquet"))
                    if parsed and path.rsplit("/", 1)[-1].startswith(prefix):
                        _, _, first, last, print_ = parsed
                        if f"{first:012d}-{last:012d}-{print_}.json" not in names:
                            orphans.append(path)
        return orphans
