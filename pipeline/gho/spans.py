"""Span discovery: ``NAME.GHO`` followed by ``NAME001.GHS``, ``NAME002.GHS``… (docs/gho-format.md §4).

Continuation names use the first five characters of the primary's base name plus a 1-based,
three-digit number; the directory is matched case-insensitively and the list stops at the first gap.
A candidate is accepted only if its header says so: magic, byte 0x02 = 9, the image's compression
byte and image id = base id + n.
"""

from __future__ import annotations

import os
import re
import struct
from pathlib import Path

from pipeline.core.safeio import file_kind, open_nonblocking
from pipeline.gho.header import HEADER_SIZE, MAGIC, is_span_header


def span_names(first: Path) -> tuple[str, str]:
    """Return (prefix, suffix) used by continuation files of ``first`` (lower-cased)."""
    return first.stem[:5].lower(), ".ghs"


def span_display_name(first: Path, n: int) -> str:
    """The conventional name of continuation ``n`` (upper-case suffix, as Ghost writes it)."""
    return f"{first.stem[:5]}{n:03d}.GHS"


def is_regular(path: Path) -> bool:
    """True if ``path`` (after symlinks) is a regular file; FIFOs, devices and folders are never opened."""
    try:
        return file_kind(os.stat(path).st_mode) is None
    except (OSError, ValueError):
        return False


def read_head(path: Path, n: int = HEADER_SIZE) -> bytes:
    """The first ``n`` bytes of a regular file; b"" for anything else (never blocks on a FIFO)."""
    if not is_regular(path):
        return b""
    try:
        fd, st = open_nonblocking(path)
    except OSError:
        return b""
    try:
        if file_kind(st.st_mode) is not None:
            return b""
        return os.pread(fd, n, 0)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _listing(first: Path) -> dict[str, Path]:
    by_name: dict[str, Path] = {}
    try:
        for entry in first.parent.iterdir():
            by_name[entry.name.lower()] = entry
    except OSError:
        pass
    return by_name


def find_spans(first: Path, listing: dict[str, Path] | None = None) -> list[Path]:
    """Return the continuation files of ``first`` in order (may be empty).

    Reads the 512-byte header of ``first`` and of each candidate; stops at the first missing or
    non-matching candidate. ``listing`` (lower-cased name → path of the files in ``first``'s folder)
    saves listing the folder again when the caller has (a shelf scan opens many images of one folder).
    """
    first = Path(first)
    head = read_head(first)
    checked = len(head) >= HEADER_SIZE and head[0:2] == MAGIC
    comp = head[3] if checked else 0
    base_id = struct.unpack_from("<I", head, 4)[0] if checked else 0
    prefix, suffix = span_names(first)
    by_name = _listing(first) if listing is None else listing
    spans: list[Path] = []
    n = 1
    while True:
        entry = by_name.get(f"{prefix}{n:03d}{suffix}")
        if entry is None or entry == first or not is_regular(entry):
            return spans
        if checked and not is_span_header(read_head(entry), comp, base_id, n):
            return spans
        spans.append(entry)
        n += 1


def later_spans(first: Path, after: int) -> list[str]:
    """Names of continuation-like files numbered above ``after`` (used to tell a gap from the end)."""
    prefix, suffix = span_names(Path(first))
    pat = re.compile(re.escape(prefix) + r"(\d{3})" + re.escape(suffix) + "$")
    found = []
    for name, entry in _listing(Path(first)).items():
        m = pat.match(name)
        if m and int(m.group(1)) > after:
            found.append(entry.name)
    return sorted(found)


def resolve_first(path: Path) -> Path | None:
    """For a ``.GHS`` continuation file, find the ``.GHO`` it belongs to (same id − n), else None."""
    path = Path(path)
    head = read_head(path)
    if len(head) < HEADER_SIZE or head[0:2] != MAGIC or head[2] != 0x09:
        return None
    m = re.search(r"(\d{3})$", path.stem)
    if not m:
        return None
    n = int(m.group(1))
    span_id = struct.unpack_from("<I", head, 4)[0]
    prefix = path.stem[:-3].lower()
    for name, entry in sorted(_listing(path).items()):
        if name.endswith(".gho") and name[:5] == prefix[:5] and is_regular(entry):
            h = read_head(entry)
            if len(h) >= 8 and h[0:2] == MAGIC and h[2] == 0x01 and \
                    (struct.unpack_from("<I", h, 4)[0] + n) & 0xFFFFFFFF == span_id:
                return entry
    return None
