"""Cleaning shared by every corpus source: whitespace, paragraphs, length caps, duplicate keys."""

from __future__ import annotations

import hashlib
import re
import unicodedata

MAX_CHARS = 2000


def normalise_whitespace(text: str) -> str:
    """NFC, no trailing spaces, runs of blank lines folded to one paragraph break."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    lines = [line.rstrip() for line in text.split("\n")]
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_paragraphs(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """Cut a long text into documents of at most `max_chars`, on paragraph boundaries where possible."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        while len(paragraph) > max_chars:  # a single huge paragraph: cut on a line or a sentence
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > max_chars // 2 else max(paragraph.rfind("。", 0, max_chars), paragraph.rfind(". ", 0, max_chars)) + 1
            cut = cut if cut > max_chars // 2 else max_chars
            if current:
                pieces.append(current)
                current = ""
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        if current and len(current) + 2 + len(paragraph) > max_chars:
            pieces.append(current)
            current = paragraph
        else:
            current = f"{current}\n\n{paragraph}" if current else paragraph
    if current:
        pieces.append(current)
    return [p for p in pieces if p]


def dedupe_key(text: str) -> str:
    """Equal for texts that differ only in case, whitespace or Unicode form."""
    folded = re.sub(r"\s+", " ", unicodedata.normalize("NFKC", text).lower()).strip()
    return hashlib.sha1(folded.encode("utf-8")).hexdigest()


def cjk_ratio(text: str) -> float:
    """Share of non-space characters that are kana or CJK ideographs."""
    chars = [c for c in text if not c.isspace()]
    if not chars:
        return 0.0
    cjk = sum(1 for c in chars if "\u3040" <= c <= "\u30ff" or "\u3400" <= c <= "\u9fff" or "\uff66" <= c <= "\uff9f")
    return cjk / len(chars)


def document_id(domain: str, text: str) -> str:
    return f"{domain}-{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"
