"""dictionary: GCIDE, the GNU Collaborative International Dictionary of English (dict-gcide, dictd format)."""

from __future__ import annotations

import gzip
import re
import unicodedata
from pathlib import Path
from typing import Iterator

DEBIAN_PACKAGES = ["dict-gcide"]
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_ACCENTS = {"^": "\u0302", "`": "\u0300", "'": "\u0301", "=": "\u0304", ":": "\u0308", "~": "\u0303", ".": "\u0307"}


def b64_number(text: str) -> int:
    value = 0
    for char in text:
        value = value * 64 + _B64.index(char)
    return value


def strip_gcide(entry: str) -> str:
    entry = re.sub(r"(?m)^\s*\[[^\]\n]*\]\s*$", "", entry)  # [1913 Webster], [PJC] source lines
    entry = re.sub(r"\[[^\]\n]*Webster[^\]\n]*\]|\[[A-Z]{2,4}\]", "", entry)  # the same markers inline
    entry = re.sub(r"\\[^\\\n]*\\", "", entry)  # \pronunciation\
    entry = re.sub(r"\[([a-zA-Z])([\^`'=:~.])\]", lambda m: m.group(1) + _ACCENTS[m.group(2)], entry)  # [a^] -> â
    entry = re.sub(r"\[([\^`'=:~.])([a-zA-Z])\]", lambda m: m.group(2) + _ACCENTS[m.group(1)], entry)  # [.a]
    entry = re.sub(r"\[([a-zA-Z])um\]", lambda m: m.group(1) + "\u0308", entry)  # [aum] -> ä
    entry = re.sub(r"\(\?(; ?\d+)?\)", "", entry)  # (?; 277): pronunciation placeholders
    entry = entry.replace("{", "").replace("}", "").replace(" --", " —")
    entry = re.sub(r"\(\s*\)", "", entry)
    return unicodedata.normalize("NFC", re.sub(r"[ \t]{2,}", " ", entry))


def documents(root: Path) -> Iterator[tuple[str, str]]:
    base = root / "usr/share/dictd"
    data = gzip.open(base / "gcide.dict.dz").read()
    group, size = [], 0
    for line in (base / "gcide.index").read_text(encoding="utf-8").splitlines():
        headword, offset, length = line.split("\t")[:3]
        if headword.startswith("00-database"):
            continue
        start = b64_number(offset)
        entry = strip_gcide(data[start:start + b64_number(length)].decode("utf-8", errors="replace"))
        group.append(entry.strip())
        size += len(entry)
        if size >= 600:  # adjacent short entries together make a document of useful length
            yield "debian:dict-gcide:/usr/share/dictd/gcide.dict.dz", "\n\n".join(group)
            group, size = [], 0
