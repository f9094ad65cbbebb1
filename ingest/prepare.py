"""Build the corpus: real text from Debian packages -> clean, deduplicated, split JSONL per domain.

    python -m senmon.ingest.prepare [--out var/corpus-full] [--slice-out data/corpus] [--cache var/debs]

Downloads the source packages with `apt-get download` (no install, no root needed beyond apt's
package lists), unpacks them with `dpkg-deb -x`, extracts each domain's text, cleans it, drops
exact duplicates within and across domains, splits by document id (`split_of`), and writes the
full corpus plus the small slice that ships in the repository, with a manifest. In a terminal,
downloading, unpacking and extracting show progress bars (senmon/progress.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from senmon.progress import bar

from .clean import cjk_ratio, dedupe_key, document_id, normalise_whitespace, split_paragraphs
from .sources import SOURCES
from .split import SPLITS, split_of

MIN_CHARS = {"japanese": 50}
DEFAULT_MIN_CHARS = 100
SLICE_BYTES_PER_DOMAIN = 600_000
REPO = Path(__file__).resolve().parents[1]


def fetch_packages(cache: Path, names: list[str] | None = None) -> tuple[Path, dict[str, str]]:
    """Download and unpack the packages (default: every corpus source's) into `cache/root`; returns the root
    and package versions."""
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / "root"
    names = sorted(set(names) if names is not None else {p for module in SOURCES.values() for p in module.DEBIAN_PACKAGES})
    with bar(names, desc="downloading", unit="package") as packages:  # one at a time, so the bar moves
        for name in packages:
            packages.set_postfix_str(name)
            result = subprocess.run(["apt-get", "download", name], cwd=cache, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f"apt-get download failed (run 'apt-get update' first?):\n{result.stderr.strip()}")
    versions = {}
    for deb in bar(sorted(cache.glob("*.deb")), desc="unpacking", unit="package"):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        name, version = deb.name.split("_")[:2]
        versions[name] = version.replace("%3a", ":")
    return root, versions


def accept(domain: str, text: str) -> bool:
    if len(text) < MIN_CHARS.get(domain, DEFAULT_MIN_CHARS):
        return False
    return cjk_ratio(text) >= 0.3 if domain == "japanese" else cjk_ratio(text) < 0.05


def build(root: Path) -> dict[str, list[dict]]:
    """Every domain's clean documents, duplicates removed within and across domains."""
    seen: dict[str, str] = {}
    corpus: dict[str, list[dict]] = defaultdict(list)
    for domain, module in SOURCES.items():
        source_root = Path("/") if domain == "law" else root  # licences: the machine's own files
        texts = bar(module.documents(source_root), desc=f"extracting {domain}", unit=" texts")
        for source, raw in texts:
            for text in split_paragraphs(normalise_whitespace(raw)):
                key = dedupe_key(text)
                if not accept(domain, text) or key in seen:
                    continue
                seen[key] = domain
                corpus[domain].append({"id": document_id(domain, text), "domain": domain, "text": text, "source": source})
    return corpus


def write_split(documents: list[dict], out: Path, domain: str) -> dict:
    by_split: dict[str, list[dict]] = defaultdict(list)
    for doc in documents:
        by_split[split_of(doc["id"])].append(doc)
    stats = {}
    for split in SPLITS:
        rows = sorted(by_split[split], key=lambda d: d["id"])
        path = out / split / f"{domain}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [json.dumps(d, ensure_ascii=False) for d in rows]
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        stats[split] = {"documents": len(rows), "characters": sum(len(d["text"]) for d in rows),
                        "bytes": sum(len(line.encode("utf-8")) + 1 for line in lines)}
    return stats


def slice_of(documents: list[dict], budget: int) -> list[dict]:
    """A deterministic sample up to `budget` bytes of text: documents in order of a hash of their id."""
    chosen, used = [], 0
    for doc in sorted(documents, key=lambda d: hashlib.sha1(d["id"].encode()).hexdigest()):
        size = len(doc["text"].encode("utf-8"))
        if used + size > budget:
            continue
        chosen.append(doc)
        used += size
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "var" / "corpus-full")
    parser.add_argument("--slice-out", type=Path, default=REPO / "data" / "corpus")
    parser.add_argument("--cache", type=Path, default=REPO / "var" / "debs")
    parser.add_argument("--slice-bytes", type=int, default=SLICE_BYTES_PER_DOMAIN, help="text bytes per domain in the slice")
    args = parser.parse_args(argv)

    started = time.monotonic()
    root, versions = fetch_packages(args.cache)
    corpus = build(root)
    manifest = {"packages": versions, "split": "sha256(id) buckets, 80/10/10", "domains": {}}
    print(f"{'domain':<11} {'docs':>7} {'chars':>11}   {'slice docs':>10} {'slice chars':>11}")
    for domain in SOURCES:
        docs = corpus[domain]
        full = write_split(docs, args.out, domain)
        part = write_split(slice_of(docs, args.slice_bytes), args.slice_out, domain)
        manifest["domains"][domain] = {"source": SOURCES[domain].__doc__.strip().splitlines()[0], "full": full,
                                       "slice": part}
        print(f"{domain:<11} {sum(s['documents'] for s in full.values()):>7,} {sum(s['characters'] for s in full.values()):>11,}"
              f"   {sum(s['documents'] for s in part.values()):>10,} {sum(s['characters'] for s in part.values()):>11,}")
    (args.slice_out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"done in {time.monotonic() - started:.0f} s: full corpus in {args.out}, slice in {args.slice_out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
