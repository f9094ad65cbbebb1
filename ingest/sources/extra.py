"""Held-out text: documents of each domain's kind, and text of no domain, from sources the corpus does not use.

Every source here is in the allowed list of /work/shared/notes/corpora.md: Debian packages fetched with
`apt-get download` + `dpkg-deb -x` at build time (nothing of it ships). They exist to measure routing on
text the routing model has never seen (bench/routing.py) and, split by document id like the corpus, to
calibrate the fallback on text of no domain. Each extractor yields (source, raw text) pairs, as the
corpus sources do; `ingest/extra_sources.py` cleans, deduplicates and writes them.
"""

from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path
from typing import Callable, Iterator

from senmon.config import NO_DOMAIN

from .gcide import b64_number
from .japanese import html_sections
from .licences import _dep5_licence_bodies
from .pydoc import strip_rest


# Debian packages whose copyright files are the extra law text (besides the copyright files of every package
# fetched below). None of them is installed on the machine that built the shipped corpus, whose own
# /usr/share/doc/*/copyright files are the corpus's law domain; any text equal to a corpus text is dropped anyway.
COPYRIGHT_PACKAGES = [
    "tree", "htop", "rsync", "screen", "mutt", "lynx", "cowsay", "figlet", "units", "ripgrep", "fd-find",
    "nginx-common", "graphviz", "ffmpeg", "gimp", "texinfo", "redis-tools", "mariadb-common", "apache2-data",
    "php-common", "ruby3.1", "rustc", "vlc-data", "maxima", "gnuplot-data", "zsh-common", "fish-common",
    "neovim-runtime", "nano", "mc-data", "aspell", "hunspell", "tesseract-ocr",
]


def _dictd(path: Path) -> Iterator[str]:
    """The entries of a dictd dictionary (`NAME.index` + `NAME.dict.dz`), skipping its 00-database headers."""
    data = gzip.open(path.with_suffix(".dict.dz")).read()
    for line in path.with_suffix(".index").read_text(encoding="utf-8", errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 3 or fields[0].startswith("00-database") or fields[0].startswith("00database"):
            continue
        start = b64_number(fields[1])
        yield data[start:start + b64_number(fields[2])].decode("utf-8", errors="replace").strip()


def _grouped(entries: Iterator[str], source: str, size: int) -> Iterator[tuple[str, str]]:
    """Adjacent short entries joined into documents of about `size` characters (as the corpus groups them)."""
    group, used = [], 0
    for entry in entries:
        if not entry:
            continue
        group.append(entry)
        used += len(entry)
        if used >= size:
            yield source, "\n\n".join(group)
            group, used = [], 0
    if group:
        yield source, "\n\n".join(group)


def _html_between(html: str, start: str, ends: tuple[str, ...]) -> str:
    """The part of a page from `start` to the first of `ends`: the content without navigation and footers."""
    begin = html.find(start)
    if begin < 0:
        return ""
    stops = [i for i in (html.find(end, begin) for end in ends) if i > 0]
    return html[begin:min(stops) if stops else len(html)]


def _html_text(html: str) -> str:
    text = "\n".join(line.strip() for section in html_sections(html) for line in section.splitlines())
    return text.replace("\u00b6", "")  # Sphinx's permalink pilcrows


def _roff_text(roff: str) -> str:
    """A man page's text: comments and layout requests dropped, font escapes removed, macro arguments kept."""
    out = []
    for line in roff.splitlines():
        if line.startswith((".\\\"", "'\\\"", '.\\"')) or line.strip() in (".", "'"):
            continue
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].partition(" ")
            if macro in ("TH", "de", "ds", "nr", "so", "ta", "ft", "ps", "ll", "in", "ti", "ne", "hy", "ad", "na",
                         "nh", "fi", "nf", "sp", "br", "PP", "LP", "P", "IP", "TP", "RS", "RE", "EX", "EE", "UE", "ME",
                         "if", "ie", "el", "tr", "ig", "bp", "Dd", "Os", "Dt") and not (macro in ("IP",) and rest.strip()):
                if macro in ("PP", "LP", "P", "sp"):
                    out.append("")
                continue
            line = re.sub(r'"', "", rest)
        line = re.sub(r"\\f(\[[^\]]*\]|\(..|.)", "", line)  # font changes
        line = re.sub(r"\\\*(\(..|\[[^\]]*\]|.)", "", line)  # string registers
        line = re.sub(r"\\\((..)", lambda m: {"em": "—", "en": "–", "bu": "•", "co": "©", "aq": "'", "dq": '"'}.get(m.group(1), ""), line)
        line = line.replace("\\-", "-").replace("\\e", "\\").replace("\\&", "").replace("\\ ", " ").replace("\\|", "")
        line = re.sub(r"\\[sh]'[^']*'|\\s[-+]?\d", "", line)
        out.append(line)
    return "\n".join(out)


# ----------------------------------------------------------------- law


def copyright_licences(root: Path) -> Iterator[tuple[str, str]]:
    """law: the `License:` paragraphs of the machine-readable (DEP-5) copyright files of the fetched packages."""
    for path in sorted((root / "usr/share/doc").glob("*/copyright")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.startswith("Format:"):
            for body in _dep5_licence_bodies(text):
                yield f"debian:{path.parent.name}:/{path.relative_to(root)}", body


def copyright_freeform(root: Path) -> Iterator[tuple[str, str]]:
    """law: whole free-form (not DEP-5) copyright files of the fetched packages: notices, grants and licences."""
    for path in sorted((root / "usr/share/doc").glob("*/copyright")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.startswith("Format:"):
            yield f"debian:{path.parent.name}:/{path.relative_to(root)}", text


# ----------------------------------------------------------------- code


def _sphinx_html(root: Path, package: str, releases: str, start: str, ends: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """A Sphinx HTML manual's pages under usr/share/doc/PACKAGE/html, each cut to its content column (from `start`
    to the first of `ends`); release notes (pages starting `releases`) and index pages left out."""
    base = root / f"usr/share/doc/{package}/html"
    for path in sorted(base.rglob("*.html")):
        relative = path.relative_to(base).as_posix()
        if relative.startswith((releases, "genindex", "py-modindex", "search", "_")):
            continue  # release notes are lists of fixes; the rest is index pages
        body = _html_between(path.read_text(encoding="utf-8", errors="replace"), start, ends)
        if body:
            yield f"debian:{package}:/{path.relative_to(root)}", _html_text(body)


def django_doc(root: Path) -> Iterator[tuple[str, str]]:
    """code: the Django 3.2 documentation (python-django-doc, HTML), the content column of each page."""
    yield from _sphinx_html(root, "python-django-doc", "releases/", '<div id="yui-main">',
                            ('<div class="yui-b" id="sidebar"', '<div id="ft">'))


def sphinx_doc(root: Path) -> Iterator[tuple[str, str]]:
    """code: the Sphinx 5.3 documentation, from the reST sources sphinx-doc ships (_sources/*.rst.txt)."""
    base = root / "usr/share/doc/sphinx-doc/html/_sources"
    for path in sorted(base.rglob("*.txt")):
        if path.name.startswith(("changes", "authors", "license")):
            continue
        yield f"debian:sphinx-doc:/{path.relative_to(root)}", strip_rest(path.read_text(encoding="utf-8", errors="replace"))


def scipy_doc(root: Path) -> Iterator[tuple[str, str]]:
    """code: the SciPy 1.10 documentation (python-scipy-doc, HTML): tutorials, API reference, developer guide."""
    yield from _sphinx_html(root, "python-scipy-doc", "release", '<main class=', ('<div class="prev-next', "<footer"))


def pandas_doc(root: Path) -> Iterator[tuple[str, str]]:
    """code: the pandas 1.5 documentation (python-pandas-doc), from its reST sources: user guide, tutorials,
    development and reference overviews (not the one-line autosummary stubs, not the release notes)."""
    base = root / "usr/share/doc/python-pandas-doc/html/_sources"
    for path in sorted(base.rglob("*.txt")):
        relative = path.relative_to(base).as_posix()
        if relative.startswith(("whatsnew", "reference/api/")):
            continue
        yield f"debian:python-pandas-doc:/{path.relative_to(root)}", strip_rest(path.read_text(encoding="utf-8", errors="replace"))


# ----------------------------------------------------------------- dictionary


def devil(root: Path) -> Iterator[tuple[str, str]]:
    """dictionary: Ambrose Bierce's The Devil's Dictionary (dict-devil, dictd format)."""
    yield from _grouped(_dictd(root / "usr/share/dictd/devil.index"), "debian:dict-devil:/usr/share/dictd/devil.dict.dz", 600)


def freedict_eng_jpn(root: Path) -> Iterator[tuple[str, str]]:
    """dictionary: FreeDict English-Japanese (dict-freedict-eng-jpn, dictd format): English headwords, Japanese glosses."""
    yield from _grouped(_dictd(root / "usr/share/dictd/freedict-eng-jpn.index"),
                        "debian:dict-freedict-eng-jpn:/usr/share/dictd/freedict-eng-jpn.dict.dz", 600)


# ----------------------------------------------------------------- literature

BIBLE_BOOKS = ["Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth", "1Samuel",
               "2Samuel", "1Kings", "2Kings", "1Chronicles", "2Chronicles", "Ezra", "Nehemiah", "Esther", "Job",
               "Psalms", "Proverbs", "Ecclesiastes", "Song", "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel",
               "Hosea", "Joel", "Amos", "Obadiah", "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai",
               "Zechariah", "Malachi", "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1Corinthians",
               "2Corinthians", "Galatians", "Ephesians", "Philippians", "Colossians", "1Thessalonians",
               "2Thessalonians", "1Timothy", "2Timothy", "Titus", "Philemon", "Hebrews", "James", "1Peter", "2Peter",
               "1John", "2John", "3John", "Jude", "Revelation"]
BIBLE_CHAPTERS = (1, 2, 3)  # the first chapters of every book: about 190 chapters


def bible_kjv(root: Path) -> Iterator[tuple[str, str]]:
    """literature: the King James Bible (bible-kjv-text), printed chapter by chapter with the `bible` program (bible-kjv)."""
    program, data = root / "usr/bin/bible", root / "usr/lib"
    for book in BIBLE_BOOKS:
        specs = [f"{book}{chapter}:1-200" for chapter in BIBLE_CHAPTERS]  # a whole chapter: "Genesis1" alone is one verse
        result = subprocess.run([str(program), "-p", str(data), *specs], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=60)
        chapter, verses = None, []
        for line in result.stdout.splitlines():  # "Genesis 1", then "  1 In the beginning ...", wrapped
            heading = re.match(r"^(\S.*\S) (\d+)$", line)
            verse = re.match(r"^\s+\d+ (.*)$", line)
            if heading:
                if verses:
                    yield f"debian:bible-kjv-text:{chapter}", " ".join(verses)
                chapter, verses = heading.group(0), []
            elif verse:
                verses.append(verse.group(1).strip())
            elif verses and line.strip():
                verses[-1] += " " + line.strip()
        if verses:
            yield f"debian:bible-kjv-text:{chapter}", " ".join(verses)


def _fortune_file(root: Path, name: str, package: str) -> Iterator[tuple[str, str]]:
    path = root / "usr/share/games/fortunes" / name
    cookies = (c.strip("%\n ") for c in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"))
    yield from _grouped(cookies, f"debian:{package}:/{path.relative_to(root)}", 500)


def fortune_anarchism(root: Path) -> Iterator[tuple[str, str]]:
    """literature: quotations on anarchism (fortune-anarchism)."""
    yield from _fortune_file(root, "anarchism", "fortune-anarchism")


def bofh_excuses(root: Path) -> Iterator[tuple[str, str]]:
    """literature: the BOFH excuses (fortunes-bofh-excuses), one-line jokes grouped."""
    yield from _fortune_file(root, "bofh-excuses", "fortunes-bofh-excuses")


# ----------------------------------------------------------------- japanese


def manpages_ja(root: Path) -> Iterator[tuple[str, str]]:
    """japanese: the Japanese manual pages (manpages-ja, roff), as plain text."""
    for path in sorted((root / "usr/share/man/ja").rglob("*.gz")):
        try:
            roff = gzip.open(path).read().decode("utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield f"debian:manpages-ja:/{path.relative_to(root)}", _roff_text(roff)


def libreoffice_help_ja(root: Path) -> Iterator[tuple[str, str]]:
    """japanese: the LibreOffice help in Japanese (libreoffice-help-ja, HTML), the display area of each page."""
    base = root / "usr/share/libreoffice/help/ja"
    for path in sorted(base.rglob("*.html")):
        body = _html_between(path.read_text(encoding="utf-8", errors="replace"), '<div id="DisplayArea"',
                             ('<div id="SearchFrame"', "<footer"))
        if body:
            yield f"debian:libreoffice-help-ja:/{path.relative_to(root)}", _html_text(body)


def gimp_help_ja(root: Path) -> Iterator[tuple[str, str]]:
    """japanese: the GIMP 2.10 user manual in Japanese (gimp-help-ja, HTML), each page without its navigation."""
    for path in sorted((root / "usr/share/gimp/2.0/help/ja").glob("*.html")):
        html = path.read_text(encoding="utf-8", errors="replace")
        header = html.find('<div class="navheader"')
        begin = html.find("</table>", header) if header >= 0 else 0  # the header is a table of links
        end = html.find('<div class="navfooter"')
        body = html[max(begin, 0):end if end > 0 else len(html)]
        for section in html_sections(body):
            yield f"debian:gimp-help-ja:/{path.relative_to(root)}", "\n".join(l.strip() for l in section.splitlines())


# ----------------------------------------------------------------- no domain


def debian_reference_en(root: Path) -> Iterator[tuple[str, str]]:
    """none: the Debian Reference in English (debian-reference-en, HTML), by section."""
    for path in sorted((root / "usr/share/debian-reference").glob("*.en.html")):
        for section in html_sections(path.read_text(encoding="utf-8", errors="replace")):
            yield f"debian:debian-reference-en:/{path.relative_to(root)}", "\n".join(l.strip() for l in section.splitlines())


def debian_handbook(root: Path) -> Iterator[tuple[str, str]]:
    """none: The Debian Administrator's Handbook in English (debian-handbook, HTML en-US), by section."""
    base = root / "usr/share/doc/debian-handbook/html/en-US"
    for path in sorted(base.glob("*.html")):
        html = path.read_text(encoding="utf-8", errors="replace")
        begin = html.find('<ul class="docnav top">')
        end = html.rfind('<ul class="docnav">')
        if begin >= 0 and end > begin:
            html = html[html.find("</ul>", begin):end]
        for section in html_sections(html):
            yield f"debian:debian-handbook:/{path.relative_to(root)}", "\n".join(l.strip() for l in section.splitlines())


def package_descriptions(root: Path) -> Iterator[tuple[str, str]]:
    """none: Debian package descriptions, the `Description:` fields of the Packages index (`apt-cache dumpavail`)."""
    result = subprocess.run(["apt-cache", "dumpavail"], capture_output=True, text=True, check=True)
    seen = set()
    for record in result.stdout.split("\n\n"):
        name = re.search(r"(?m)^Package: (\S+)", record)
        match = re.search(r"(?m)^Description(?:-en)?: (.*)\n((?: .*\n?)*)", record)
        if not name or not match:
            continue
        lines = [match.group(1)] + [line[1:] for line in match.group(2).splitlines()]
        text = "\n".join("" if line.strip() == "." else line for line in lines).strip()
        if text not in seen:
            seen.add(text)
            yield f"debian:Packages:{name.group(1)}", text


# source name: (domain, Debian packages to fetch, extractor)
EXTRA_SOURCES: dict[str, tuple[str, list[str], Callable[[Path], Iterator[tuple[str, str]]]]] = {
    "copyright-licences": ("law", COPYRIGHT_PACKAGES, copyright_licences),
    "copyright-freeform": ("law", COPYRIGHT_PACKAGES, copyright_freeform),
    "django-doc": ("code", ["python-django-doc"], django_doc),
    "sphinx-doc": ("code", ["sphinx-doc"], sphinx_doc),
    "scipy-doc": ("code", ["python-scipy-doc"], scipy_doc),
    "pandas-doc": ("code", ["python-pandas-doc"], pandas_doc),
    "dict-devil": ("dictionary", ["dict-devil"], devil),
    "freedict-eng-jpn": ("dictionary", ["dict-freedict-eng-jpn"], freedict_eng_jpn),
    "bible-kjv": ("literature", ["bible-kjv", "bible-kjv-text"], bible_kjv),
    "fortune-anarchism": ("literature", ["fortune-anarchism"], fortune_anarchism),
    "bofh-excuses": ("literature", ["fortunes-bofh-excuses"], bofh_excuses),
    "manpages-ja": ("japanese", ["manpages-ja"], manpages_ja),
    "libreoffice-help-ja": ("japanese", ["libreoffice-help-ja"], libreoffice_help_ja),
    "gimp-help-ja": ("japanese", ["gimp-help-ja"], gimp_help_ja),
    "debian-reference-en": (NO_DOMAIN, ["debian-reference-en"], debian_reference_en),
    "debian-handbook": (NO_DOMAIN, ["debian-handbook"], debian_handbook),
    "package-descriptions": (NO_DOMAIN, [], package_descriptions),
}
