"""Extractors of real text, one module per Debian source; each yields (source, raw text) pairs."""

from . import fortunes, gcide, japanese, licences, pydoc

SOURCES = {"law": licences, "code": pydoc, "dictionary": gcide, "literature": fortunes, "japanese": japanese}
