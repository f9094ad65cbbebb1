"""literature: quotations, poems and jokes from the fortune cookie files (fortunes, fortunes-min; no off/)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

DEBIAN_PACKAGES = ["fortunes", "fortunes-min"]


def documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/games/fortunes"
    for path in sorted(base.glob("*")):
        if not path.is_file() or path.suffix in (".dat", ".u8") or path.is_symlink():
            continue
        group, size = [], 0
        for cookie in path.read_text(encoding="utf-8", errors="replace").split("\n%\n"):
            cookie = cookie.strip("%\n ")
            if not cookie:
                continue
            group.append(cookie)
            size += len(cookie)
            if size >= 500:  # short fortunes from one file grouped into a document
                yield f"debian:fortunes:/{path.relative_to(root)}", "\n\n".join(group)
                group, size = [], 0
        if group:
            yield f"debian:fortunes:/{path.relative_to(root)}", "\n\n".join(group)
