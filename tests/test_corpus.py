"""The corpus: deterministic split by id, clean shipped slice, no document in two splits."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from senmon.ingest.clean import cjk_ratio, dedupe_key, normalise_whitespace, split_paragraphs
from senmon.ingest.split import FRACTIONS, SPLITS, split_of
from senmon.ingest.store import DatasetStore, read_jsonl

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "data" / "corpus"
DOMAINS = ("law", "code", "dictionary", "literature", "japanese")


def shipped() -> dict[str, list[dict]]:
    return {split: [d for domain in DOMAINS for d in read_jsonl(CORPUS / split / f"{domain}.jsonl")] for split in SPLITS}


def test_split_is_a_function_of_the_id_alone():
    ids = [f"doc-{i}" for i in range(20_000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    counts = Counter(first)
    for split, fraction in FRACTIONS.items():
        assert abs(counts[split] / len(ids) - fraction) < 0.01


def test_every_shipped_document_is_well_formed_and_in_its_split():
    for split, docs in shipped().items():
        for doc in docs:
            assert set(doc) == {"id", "domain", "text", "source"}
            assert all(isinstance(doc[k], str) and doc[k] for k in doc)
            assert split_of(doc["id"]) == split
            assert doc["source"].startswith("debian:")


def test_domain_matches_its_file_and_all_five_are_present():
    for split in SPLITS:
        for domain in DOMAINS:
            docs = list(read_jsonl(CORPUS / split / f"{domain}.jsonl"))
            assert docs, (split, domain)
            assert {d["domain"] for d in docs} == {domain}


def test_no_document_twice_and_none_across_splits():
    ids, keys = Counter(), Counter()
    for docs in shipped().values():
        for doc in docs:
            ids[doc["id"]] += 1
            keys[dedupe_key(doc["text"])] += 1
    assert max(ids.values()) == 1
    assert max(keys.values()) == 1  # not even the same text under another id


def test_japanese_is_japanese_and_the_rest_is_not():
    for doc in read_jsonl(CORPUS / "train" / "japanese.jsonl"):
        assert cjk_ratio(doc["text"]) >= 0.3
        assert doc["text"].encode("utf-8").decode("utf-8") == doc["text"]
    for domain in ("law", "code", "dictionary", "literature"):
        assert all(cjk_ratio(d["text"]) < 0.05 for d in read_jsonl(CORPUS / "train" / f"{domain}.jsonl"))


def test_no_markup_left_in_the_text():
    text = "\n".join(d["text"] for docs in shipped().values() for d in docs if d["domain"] != "code")
    for leftover in ("<p>", "</div>", "&nbsp;", "[1913 Webster]", "\\fB", ":func:`"):
        assert leftover not in text, leftover
    code = "\n".join(d["text"] for d in read_jsonl(CORPUS / "train" / "code.jsonl"))
    assert ":func:`" not in code and ".. index::" not in code and ".. toctree::" not in code


def test_manifest_counts_match_the_files():
    manifest = json.loads((CORPUS / "MANIFEST.json").read_text(encoding="utf-8"))
    for domain in DOMAINS:
        for split in SPLITS:
            docs = list(read_jsonl(CORPUS / split / f"{domain}.jsonl"))
            assert manifest["domains"][domain]["slice"][split]["documents"] == len(docs)


def test_store_seeding_is_idempotent_and_keeps_splits(tmp_path):
    store = DatasetStore(str(tmp_path / "storage"))
    first = store.seed_from_corpus(CORPUS, DOMAINS)
    store.seed_from_corpus(CORPUS, DOMAINS)  # again: same shard names, nothing added
    for domain in DOMAINS:
        total = 0
        for split in SPLITS:
            table = store.read_table(domain, split)
            assert all(split_of(i) == split for i in table.column("id").to_pylist())
            assert len(store.shard_paths(domain, split)) == 1
            total += table.num_rows
        assert total == first[domain]


# --------------------------------------------------------------------------- cleaning (pure functions)


def test_whitespace_and_paragraphs():
    assert normalise_whitespace("a  \r\nb\t\n\n\n\nc") == "a\nb    \n\nc".replace("    \n", "\n")
    pieces = split_paragraphs("\n\n".join(["x" * 900] * 5), max_chars=2000)
    assert [len(p) for p in pieces] == [1802, 1802, 900]
    long = split_paragraphs("word. " * 1000, max_chars=500)
    assert all(len(p) <= 500 for p in long) and "".join(long).replace(" ", "") == ("word." * 1000)


def test_dedupe_key_ignores_case_space_and_width():
    assert dedupe_key("Hello  World\n") == dedupe_key("hello world")
    assert dedupe_key("ＡＢＣ") == dedupe_key("abc")  # NFKC: full-width letters
    assert dedupe_key("hello") != dedupe_key("hullo")


@pytest.mark.parametrize("module, raw, expected, absent", [
    ("gcide", 'Partridge \\Par"tridge\\ (p[aum]r"trîj), n. {Ban} [1913 Webster]', "pär", ["\\Par", "{", "[aum]"]),
    ("pydoc", ".. function:: open(file)\n\n   Open :func:`os.open` ``mode``.\n\n.. index:: single: x\n   pair: y\n\nEnd",
     "open(file)", [":func:", "``", ".. index", "pair: y"]),
])
def test_extractor_markup_stripping(module, raw, expected, absent):
    from senmon.ingest.sources import gcide, pydoc

    text = gcide.strip_gcide(raw) if module == "gcide" else pydoc.strip_rest(raw)
    assert expected in text
    for fragment in absent:
        assert fragment not in text


def test_japanese_html_sections():
    from senmon.ingest.sources.japanese import html_sections

    sections = html_sections("<html><head><title>t</title><style>x{}</style></head><body><h2>一章</h2><p>日本語の"
                             "文章です。</p><h2>二章</h2><p>次の&amp;段落</p></body></html>")
    assert [s.split() for s in sections[1:]] == [["一章", "日本語の文章です。"], ["二章", "次の&段落"]]
