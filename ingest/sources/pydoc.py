"""code: the Python 3.11 documentation, from the reST sources that python3.11-doc ships (_sources/*.rst.txt)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

DEBIAN_PACKAGES = ["python3.11-doc"]

_HEADING = re.compile(r"^(?:[=\-~^\"*+#]{3,})$")
_DROP_DIRECTIVES = re.compile(r"^\.\. (index|toctree|_[^:]+|highlight|sectionauthor|moduleauthor|testsetup|testcleanup"
                              r"|only|include|literalinclude|raw|image|figure|csv-table|tabularcolumns|impl-detail)\b")


def strip_rest(text: str) -> str:
    out: list[str] = []
    skip_deeper_than: int | None = None  # inside a dropped directive: skip lines indented more than this
    for line in text.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if skip_deeper_than is not None:
            if not stripped or indent > skip_deeper_than:
                continue
            skip_deeper_than = None
        if _HEADING.match(stripped):
            continue
        if stripped.startswith(".. "):
            if _DROP_DIRECTIVES.match(stripped) or stripped.startswith(".. |") or re.match(r"^\.\. [^:]*$", stripped):
                skip_deeper_than = indent  # the directive and its indented block
                continue
            match = re.match(r"^\.\. [\w:-]+::\s*(.*)$", stripped)  # .. function:: open(file) -> "open(file)"
            if match:
                if match.group(1):
                    out.append(" " * indent + match.group(1))
                continue
        if re.match(r"^:[\w-]+:( .*)?$", stripped):  # directive options such as :maxdepth: 2
            continue
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r":[\w:.-]+:`~?!?([^`<]*?)\s*<[^`>]*>`", r"\1", text)  # :ref:`title <label>` -> title
    text = re.sub(r":[\w:.-]+:`~?!?([^`]*)`", r"\1", text)  # :func:`os.path` -> os.path
    text = re.sub(r"`([^`<]+?)\s*<[^`>]+>`_+", r"\1", text)  # `link <url>`_ -> link
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*", lambda m: m.group(1) or m.group(2), text)
    return re.sub(r"(?m)::$", ":", text)


def documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(base.rglob("*.rst.txt")):
        relative = path.relative_to(base).as_posix()
        if relative.startswith(("whatsnew/changelog", "license", "copyright", "bugs", "about", "contents")):
            continue  # the changelog is a list of issue numbers; the rest is boilerplate
        yield f"debian:python3.11-doc:/{path.relative_to(root)}", strip_rest(path.read_text(encoding="utf-8"))
