"""Span discovery: ``NAME.GHO`` followed by ``NAME001.GHS``, ``NAME002.GHS``… (FORMAT.md §4).

Continuation names use the first five characters of the primary's base name plus a 1-based,
three-digit number; the directory is matched case-insensitively and the list stops at the first gap.
"""

from __future__ import annotations

from pathlib import Path


def span_names(first: Path) -> tuple[str, str]:
    """Return (prefix, suffix) used by continuation files of ``first`` (lower-cased)."""
    return first.stem[:5].lower(), ".ghs"


def find_spans(first: Path) -> list[Path]:
    """Return the continuation files of ``first`` in order (may be empty). Does not read them."""
    first = Path(first)
    prefix, suffix = span_names(first)
    by_name = {}
    try:
        for entry in first.parent.iterdir():
            by_name[entry.name.lower()] = entry
    except OSError:
        return []
    spans: list[Path] = []
    n = 1
    while True:
        entry = by_name.get(f"{prefix}{n:03d}{suffix}")
        if entry is None or entry == first:
            return spans
        spans.append(entry)
        n += 1
