"""Held-out sources for routing: text the corpus never uses, per domain and of no domain, as JSONL per source.

    python -m senmon.ingest.extra_sources [--out var/sources] [--cache var/extra-debs] [--max-docs 1500]

Downloads the packages of ingest/sources/extra.py with `apt-get download` (run `apt-get update` once first),
unpacks them with `dpkg-deb -x`, extracts and cleans their text with the corpus's own helpers
(ingest/prepare.py, ingest/clean.py), drops documents equal to a corpus document or to one of another extra
source, and writes `OUT/<source>.jsonl` with `{"id", "domain", "text", "source", "split"}` lines (`split`:
the corpus's `split_of(id)`, so a calibration portion and a test portion never mix), plus `OUT/MANIFEST.json`.
Nothing here ships: var/ is not in the repository. bench/routing.py reads the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

from .clean import cjk_ratio, dedupe_key, document_id, normalise_whitespace, split_paragraphs
from .prepare import REPO, accept, fetch_packages
from .sources.extra import EXTRA_SOURCES, NO_DOMAIN
from .split import split_of

MAX_DOCS_PER_SOURCE = 1500
SHORT_SOURCES = {"package-descriptions": 20}  # one-line descriptions: prompt-sized, kept from 20 characters
MIXED_SCRIPT_SOURCES = {"freedict-eng-jpn"}  # English headwords with Japanese glosses: no script filter


def accept_extra(name: str, domain: str, text: str) -> bool:
    if name in SHORT_SOURCES:
        return len(text) >= SHORT_SOURCES[name] and cjk_ratio(text) < 0.05
    if name in MIXED_SCRIPT_SOURCES:
        return len(text) >= 100
    return accept("literature" if domain == NO_DOMAIN else domain, text)


def corpus_keys(*roots: Path) -> set[str]:
    """Duplicate keys of every document of the corpus (shipped slice and, where present, the full corpus)."""
    keys = set()
    for root in roots:
        for path in sorted(root.glob("*/*.jsonl")) if root.exists() else []:
            for line in path.read_text(encoding="utf-8").splitlines():
                keys.add(dedupe_key(json.loads(line)["text"]))
    return keys


def extract(root: Path, names: list[str], seen: set[str], max_docs: int) -> dict[str, list[dict]]:
    """Each named source's clean documents, none equal to a seen text; at most `max_docs`, sampled by id hash."""
    result = {}
    for name in names:
        domain, _, extractor = EXTRA_SOURCES[name]
        docs = []
        for source, raw in extractor(root):
            for text in split_paragraphs(normalise_whitespace(raw)):
                key = dedupe_key(text)
                if key in seen or not accept_extra(name, domain, text):
                    continue
                seen.add(key)
                doc_id = document_id(domain if domain != NO_DOMAIN else "none", text)
                docs.append({"id": doc_id, "domain": domain, "text": text, "source": source, "split": split_of(doc_id)})
        docs.sort(key=lambda d: hashlib.sha1(d["id"].encode()).hexdigest())
        result[name] = sorted(docs[:max_docs], key=lambda d: d["id"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "var" / "sources")
    parser.add_argument("--cache", type=Path, default=REPO / "var" / "extra-debs")
    parser.add_argument("--max-docs", type=int, default=MAX_DOCS_PER_SOURCE, help="documents kept per source")
    parser.add_argument("--only", nargs="*", choices=sorted(EXTRA_SOURCES), help="these sources only")
    args = parser.parse_args(argv)

    started = time.monotonic()
    names = args.only or list(EXTRA_SOURCES)
    root, versions = fetch_packages(args.cache, sorted({p for n in names for p in EXTRA_SOURCES[n][1]}))
    seen = corpus_keys(REPO / "data" / "corpus", REPO / "var" / "corpus-full")
    extracted = extract(root, names, seen, args.max_docs)
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"packages": versions, "sources": {}}
    print(f"{'source':<22} {'domain':<11} {'docs':>6} {'chars':>10}  splits")
    for name, docs in extracted.items():
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs),
                                                encoding="utf-8")
        splits = Counter(d["split"] for d in docs)
        manifest["sources"][name] = {"domain": EXTRA_SOURCES[name][0], "packages": EXTRA_SOURCES[name][1],
                                     "what": (EXTRA_SOURCES[name][2].__doc__ or "").strip(), "documents": len(docs),
                                     "characters": sum(len(d["text"]) for d in docs), "splits": dict(splits)}
        print(f"{name:<22} {EXTRA_SOURCES[name][0]:<11} {len(docs):>6} {sum(len(d['text']) for d in docs):>10,}  "
              + " ".join(f"{k}={v}" for k, v in sorted(splits.items())))
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"done in {time.monotonic() - started:.0f} s: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
