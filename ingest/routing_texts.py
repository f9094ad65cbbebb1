"""The routing model's extra training text: each domain's other sources, so it learns domains, not one source's layout.

    python -m senmon.ingest.extra_sources         # once: var/sources (not shipped)
    python -m senmon.ingest.routing_texts         # -> data/routing/<source>.jsonl + MANIFEST.json (shipped)

The corpus has one source per domain, and a router trained on it alone learns each source's formatting
(bench/routing.py, docs/serving.md). This writes, from the extra sources of ingest/sources/extra.py, the
`train` split of every source whose licence lets it ship (not manpages-ja, whose pages carry
licences that oblige distributing the nroff sources), at most `--max-docs` documents each (by id hash) and
each cut to `--max-chars`; the sources of no domain's text among them (domain `none`) teach the routing model a
class of its own for text that belongs to no specialist, which the router sends to the fallback. The `validation`
and `test` splits never ship: bench/routing.py picks the fallback threshold on the one and reports on the other,
and scores every held-out source with a model that did not train on it (leave-one-source-out). `train/routing.py`'s `train_router` reads the result from the
config's `routing_dir` beside the dataset store. Licences: data/LICENSES.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from pathlib import Path

from .prepare import REPO
from .sources.extra import EXTRA_SOURCES

NOT_SHIPPED = {"manpages-ja": "many licences, some oblige distributing the nroff sources with formatted text",
               "package-descriptions": "each description is under its own package's licence; it stays a test of text "
                                       "of no domain unlike the Debian documentation the routing model learns it from"}
MAX_DOCS = 400  # per source, as bench/routing.py's "more sources" variants train on
MAX_CHARS = 2000  # the router scores prompts; longer documents add little but bytes


def shippable(name: str) -> bool:
    """Every extra source but those in NOT_SHIPPED; the no-domain ones (the Debian Reference and the Debian
    Administrator's Handbook, both GPL-2+) become the routing model's `none` class."""
    return name not in NOT_SHIPPED


def cut(text: str, max_chars: int) -> str:
    """The text up to `max_chars`, ended at a whitespace where one is near."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    space = head.rfind(" ", max_chars - 200)
    return head[:space] if space > 0 else head


def select(docs: list[dict], max_docs: int, max_chars: int) -> list[dict]:
    """The `train` split only, the first `max_docs` by SHA-1 of the id, each cut to `max_chars`."""
    train = sorted((d for d in docs if d["split"] == "train"), key=lambda d: hashlib.sha1(d["id"].encode()).hexdigest())
    return [{"id": d["id"], "domain": d["domain"], "text": cut(d["text"], max_chars), "source": d["source"]}
            for d in sorted(train[:max_docs], key=lambda d: d["id"])]


def read_routing_texts(directory: str | Path, domains: set[str] | None = None,
                       leave_out: set[str] = frozenset()) -> dict[str, list[str]]:
    """Texts per domain from a routing_dir (every `<source>.jsonl` in it but the sources in `leave_out`); {} when
    it does not exist."""
    result: dict[str, list[str]] = {}
    for path in sorted(Path(directory).glob("*.jsonl")) if Path(directory).is_dir() else []:
        if path.stem in leave_out:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                doc = json.loads(line)
                if domains is None or doc["domain"] in domains:
                    result.setdefault(doc["domain"], []).append(doc["text"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=Path, default=REPO / "var" / "sources", help="extra_sources' output")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "routing")
    parser.add_argument("--max-docs", type=int, default=MAX_DOCS)
    parser.add_argument("--max-chars", type=int, default=MAX_CHARS)
    args = parser.parse_args(argv)

    names = [n for n in EXTRA_SOURCES if shippable(n)]
    missing = [n for n in names if not (args.sources / f"{n}.jsonl").exists()]
    if missing:
        print(f"no {', '.join(missing)} under {args.sources}: run `python -m senmon.ingest.extra_sources` first",
              file=sys.stderr)
        return 1
    versions = json.loads((args.sources / "MANIFEST.json").read_text(encoding="utf-8"))["packages"]
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = {"from": "ingest/sources/extra.py, split 'train' only", "max_docs": args.max_docs,
                "max_chars": args.max_chars, "not_shipped": NOT_SHIPPED, "sources": {}}
    for name in names:
        docs = [json.loads(line) for line in (args.sources / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        chosen = select(docs, args.max_docs, args.max_chars)
        (args.out / f"{name}.jsonl").write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in chosen),
                                                encoding="utf-8")
        domain, packages, _ = EXTRA_SOURCES[name]
        manifest["sources"][name] = {"domain": domain, "packages": {p: versions.get(p) for p in packages},
                                     "documents": len(chosen), "characters": sum(len(d["text"]) for d in chosen)}
        print(f"{name:<22} {domain:<11} {len(chosen):>5} documents {manifest['sources'][name]['characters']:>9,} chars")
    by_domain = Counter()
    for entry in manifest["sources"].values():
        by_domain[entry["domain"]] += entry["documents"]
    manifest["documents_by_domain"] = dict(by_domain)
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
