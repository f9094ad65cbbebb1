"""law: licence texts, from /usr/share/common-licenses and the DEP-5 copyright files' License paragraphs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

DEBIAN_PACKAGES: list[str] = []  # base-files and every installed package's copyright file: already present


def _dep5_licence_bodies(text: str) -> Iterator[str]:
    """The indented body of every `License:` field; ' .' lines are paragraph breaks."""
    for match in re.finditer(r"(?m)^License:[^\n]*\n((?:[ \t]+[^\n]*\n?)+)", text):
        lines = [line[1:] if line.startswith(" ") else line for line in match.group(1).splitlines()]
        yield "\n".join("" if line.strip() == "." else line for line in lines)


def documents(root: Path) -> Iterator[tuple[str, str]]:
    for path in sorted((root / "usr/share/common-licenses").glob("*")):
        if path.is_file():
            yield f"debian:base-files:{path.relative_to(root)}", path.read_text(encoding="utf-8", errors="replace")
    for path in sorted((root / "usr/share/doc").glob("*/copyright")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.startswith("Format:"):  # machine-readable (DEP-5): licence paragraphs only
            for body in _dep5_licence_bodies(text):
                yield f"debian:{path.parent.name}:{path.relative_to(root)}", body
