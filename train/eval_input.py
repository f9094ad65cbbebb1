"""The file `senmon eval FILE.jsonl` reads: documents `{"text", "domain"}`, checked line by line.

Apart from train/evaluate.py (which imports torch and transformers, seconds here) so that a bad file is
refused before any of that loads.
"""

from __future__ import annotations

from pathlib import Path


class EvalInputError(ValueError):
    """A line of the evaluation file that is not a usable document."""


def read_eval_file(path: str | Path) -> dict[str, list[str]]:
    """Documents `{"text", "domain"}` from a JSONL file, grouped by domain; errors name the line."""
    import json

    by_domain: dict[str, list[str]] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as error:
                raise EvalInputError(f"{path}:{number}: not JSON ({error.msg})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) or not doc["text"].strip():
                raise EvalInputError(f"{path}:{number}: needs a non-empty string 'text'")
            if not isinstance(doc.get("domain"), str) or not doc["domain"]:
                raise EvalInputError(f"{path}:{number}: needs a string 'domain'")
            by_domain.setdefault(doc["domain"], []).append(doc["text"])
    if not by_domain:
        raise EvalInputError(f"{path}: no documents")
    return by_domain
