"""The held-out sources' extractors (ingest/sources/extra.py, ingest/extra_sources.py) on small inline inputs."""

from __future__ import annotations

import gzip
import json

from senmon.ingest.clean import dedupe_key
from senmon.ingest.extra_sources import accept_extra, extract
from senmon.ingest.sources import extra
from senmon.ingest.sources.extra import EXTRA_SOURCES, NO_DOMAIN, _grouped, _html_between, _roff_text


def test_every_domain_and_no_domain_has_an_extra_source():
    domains = {domain for domain, _, _ in EXTRA_SOURCES.values()}
    assert domains == {"law", "code", "dictionary", "literature", "japanese", NO_DOMAIN}


def test_roff_becomes_text():
    roff = '.\\" a comment\n.TH LS 1\n.SH 名称\nls \\- ディレクトリの内容を\\fB一覧\\fP表示する\n.PP\n.B \\-a\nすべて'
    assert _roff_text(roff) == "名称\nls - ディレクトリの内容を一覧表示する\n\n-a\nすべて"


def test_html_between_keeps_the_content_only():
    page = '<div id="nav">menu</div><div id="yui-main"><p>QuerySet</p></div><div id="ft">footer</div>'
    assert _html_between(page, '<div id="yui-main">', ('<div id="ft">',)) == '<div id="yui-main"><p>QuerySet</p></div>'
    assert _html_between(page, '<div id="absent">', ('<div id="ft">',)) == ""


def test_short_entries_are_grouped():
    groups = list(_grouped(iter(["a" * 300, "", "b" * 300, "c" * 10]), "src", 500))
    assert groups == [("src", "a" * 300 + "\n\n" + "b" * 300), ("src", "c" * 10)]


def test_acceptance_follows_each_source():
    assert accept_extra("package-descriptions", NO_DOMAIN, "Recursively searches directories for a regex")
    assert not accept_extra("debian-handbook", NO_DOMAIN, "Too short to be a document")
    assert accept_extra("freedict-eng-jpn", "dictionary", "matrix /ˈmeɪtɹɪks/ <n>\n行列\n" * 5)  # mixed scripts kept
    assert not accept_extra("dict-devil", "dictionary", "行列" * 80)  # an English source in Japanese: not its text


def test_extract_cleans_dedupes_and_splits(tmp_path, monkeypatch):
    base = tmp_path / "usr/share/dictd"
    base.mkdir(parents=True)
    entries = [f"WORD{i}, n.  " + "A definition that is long enough to be kept as a document. " * 6 for i in range(4)]
    data = "".join(entries).encode()
    offsets, lines, b64 = 0, [], "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"

    def enc(n: int) -> str:
        out = ""
        while True:
            out = b64[n % 64] + out
            n //= 64
            if not n:
                return out

    for i, entry in enumerate(entries):
        lines.append(f"word{i}\t{enc(offsets)}\t{enc(len(entry.encode()))}")
        offsets += len(entry.encode())
    (base / "devil.index").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with gzip.open(base / "devil.dict.dz", "wb") as handle:
        handle.write(data)
    seen = {dedupe_key(entries[0].strip() + "\n\n" + entries[1].strip())}  # the first document is already in the corpus
    result = extract(tmp_path, ["dict-devil"], seen, max_docs=10)["dict-devil"]
    assert [d["text"] for d in result] == [entries[2].strip() + "\n\n" + entries[3].strip()]
    doc = result[0]
    assert doc["domain"] == "dictionary" and doc["id"].startswith("dictionary-") and doc["split"] in ("train", "validation", "test")
    json.dumps(doc)
    assert extra.devil.__doc__.startswith("dictionary:")


def test_scipy_pandas_and_gimp_pages_keep_their_content_only(tmp_path):
    scipy = tmp_path / "usr/share/doc/python-scipy-doc/html"
    (scipy / "tutorial").mkdir(parents=True)
    (scipy / "tutorial/integrate.html").write_text(
        '<nav>Installing User Guide</nav><main class="bd-content"><h1>Integration</h1><p>quad integrates a function'
        '</p></main><div class="prev-next-info">previous page</div><footer>Copyright</footer>', encoding="utf-8")
    (scipy / "release.1.10.0.html").write_text('<main class="x"><p>Fixed a bug</p></main>', encoding="utf-8")
    assert [text.split() for _, text in extra.scipy_doc(tmp_path)] == [["Integration", "quad", "integrates", "a", "function"]]

    pandas = tmp_path / "usr/share/doc/python-pandas-doc/html/_sources"
    for name, body in {"user_guide/io.rst.txt": "IO tools\n========\n\nread_csv reads a file.\n",
                       "reference/api/pandas.Series.rdiv.rst.txt": "pandas.Series.rdiv\n==================\n",
                       "whatsnew/v1.5.0.rst.txt": "What's new\n==========\n\nBug fixes.\n"}.items():
        (pandas / name).parent.mkdir(parents=True, exist_ok=True)
        (pandas / name).write_text(body, encoding="utf-8")
    pages = list(extra.pandas_doc(tmp_path))
    assert [source.rsplit("/", 2)[-2:] for source, _ in pages] == [["user_guide", "io.rst.txt"]]
    assert "read_csv reads a file." in pages[0][1]

    gimp = tmp_path / "usr/share/gimp/2.0/help/ja"
    gimp.mkdir(parents=True)
    (gimp / "gimp-concepts-palettes.html").write_text(
        '<html><body><div class="navheader"><table><tr><td>前へ</td><td>次へ</td></tr></table></div>'
        '<div class="sect1"><h2>12. パレット</h2><p>パレットとは色の集合です。</p></div>'
        '<div class="navfooter"><table><tr><td>ホーム</td></tr></table></div></body></html>', encoding="utf-8")
    texts = [text for _, text in extra.gimp_help_ja(tmp_path)]
    assert "パレットとは色の集合です。" in "".join(texts)
    assert not any(word in "".join(texts) for word in ("前へ", "次へ", "ホーム"))
