"""Trailer catalogues (kind 0x05, FORMAT.md §6.6): an advisory index of each FAT partition's files."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

CATALOGUE_LIMIT = 64 << 20


@dataclass(frozen=True)
class CatalogueEntry:
    size: int
    offset: int  # stream offset of the file's directory-entry record
    date: int
    time: int
    attributes: int
    name: str


def parse_catalogue(body: bytes) -> list[CatalogueEntry]:
    """Entries of one catalogue body (a zlib stream); raises ``ValueError`` if it is malformed."""
    d = zlib.decompressobj()
    try:
        data = d.decompress(body, CATALOGUE_LIMIT)
    except zlib.error as e:
        raise ValueError(f"catalogue does not inflate: {e}") from None
    out: list[CatalogueEntry] = []
    pos = 0
    while pos + 18 <= len(data):
        size, off, date, time, attr = struct.unpack_from("<IQHHH", data, pos)
        end = data.find(b"\0", pos + 18)
        if end < 0:
            raise ValueError(f"catalogue entry at byte {pos} has no NUL-terminated name")
        name = data[pos + 18:end].decode("cp437")
        pos = end + 1
        if size == 0xFFFFFFFF:
            return out
        out.append(CatalogueEntry(size, off, date, time, attr, name))
    raise ValueError("catalogue has no terminating entry")


def slot_short_name(slot: bytes) -> str:
    """``NAME.EXT`` as the catalogue spells it (no case flags)."""
    base = slot[0:8].rstrip(b" ").decode("cp437")
    ext = slot[8:11].rstrip(b" ").decode("cp437")
    return f"{base}.{ext}" if ext else base
