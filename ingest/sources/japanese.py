"""japanese: the Debian Reference in Japanese (debian-reference-ja, HTML), by section."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path
from typing import Iterator

DEBIAN_PACKAGES = ["debian-reference-ja"]
_BLOCKS = {"p", "div", "li", "pre", "tr", "h1", "h2", "h3", "h4", "dt", "dd", "br", "table", "title"}
_SKIP = {"script", "style", "head"}


class _Text(HTMLParser):
    """HTML to text: block elements become line breaks; a new h2/h3 starts a new section."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.sections: list[list[str]] = [[]]
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP:
            self.skip += 1
        if tag in ("h2", "h3"):
            self.sections.append([])
        if tag in _BLOCKS:
            self.sections[-1].append("\n\n" if tag != "br" else "\n")

    def handle_endtag(self, tag):
        if tag in _SKIP and self.skip:
            self.skip -= 1
        if tag in _BLOCKS:
            self.sections[-1].append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.sections[-1].append(data)


def html_sections(html: str) -> list[str]:
    parser = _Text()
    parser.feed(html)
    return ["".join(parts) for parts in parser.sections]


def documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "usr/share/debian-reference").glob("*.ja.html")):
        for section in html_sections(path.read_text(encoding="utf-8", errors="replace")):
            # table cells and notes arrive indented by the HTML layout; the indentation carries nothing
            yield f"debian:debian-reference-ja:/{path.relative_to(root)}", "\n".join(l.strip() for l in section.splitlines())
