"""Trailer catalogues (kind 0x05, docs/gho-format.md §6.6): an advisory index of each FAT partition's files.

A catalogue is inflated in bounded pieces and walked entry by entry; the number of entries is capped,
so a small zlib bomb costs neither memory nor time.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.gho.errors import MAX_CATALOGUE_ENTRIES

if TYPE_CHECKING:
    from pipeline.gho.image import Image

_PIECE = 1 << 16
MAX_ENTRY = 18 + 256  # fixed part + the longest name we accept


@dataclass(frozen=True)
class CatalogueEntry:
    size: int
    offset: int  # stream offset of the file's directory-entry record
    date: int
    time: int
    attributes: int
    name: str


def iter_catalogue(body: bytes, limit: int = MAX_CATALOGUE_ENTRIES) -> Iterator[CatalogueEntry]:
    """Entries of one catalogue body (a zlib stream); raises ``ValueError`` if it is malformed or has more
    than ``limit`` entries."""
    d = zlib.decompressobj()
    buf, pos, pending, count = b"", 0, body, 0
    while True:
        if len(buf) - pos < MAX_ENTRY and not d.eof:
            buf = buf[pos:]
            pos = 0
            while len(buf) < MAX_ENTRY and not d.eof:
                try:
                    more = d.decompress(pending, _PIECE)
                except zlib.error as e:
                    raise ValueError(f"catalogue does not inflate: {e}") from None
                pending = d.unconsumed_tail
                if not more and not pending:
                    break
                buf += more
        if len(buf) - pos < 18:
            raise ValueError("catalogue has no terminating entry" if d.eof
                             else "catalogue zlib stream is truncated")
        size, off, date, time, attr = struct.unpack_from("<IQHHH", buf, pos)
        end = buf.find(b"\0", pos + 18, pos + MAX_ENTRY)
        if end < 0:
            raise ValueError(f"catalogue entry {count} has no NUL-terminated name")
        name = buf[pos + 18:end].decode("cp437")
        pos = end + 1
        if size == 0xFFFFFFFF:
            return
        count += 1
        if count > limit:
            raise ValueError(f"catalogue has more than {limit} entries")
        yield CatalogueEntry(size, off, date, time, attr, name)


def parse_catalogue(body: bytes) -> list[CatalogueEntry]:
    return list(iter_catalogue(body))


def slot_short_name(slot: bytes) -> str:
    """``NAME.EXT`` as the catalogue spells it (no case flags)."""
    base = slot[0:8].rstrip(b" ").decode("cp437")
    ext = slot[8:11].rstrip(b" ").decode("cp437")
    return f"{base}.{ext}" if ext else base


def check_catalogues(img: Image) -> list[int | None]:
    """Compare the trailer catalogues (one per FAT partition, in order) with the walked trees.

    Mismatches are advisory (``img.advisories``); returns the entry count of each FAT volume's catalogue.
    """
    from pipeline.gho.fat import FatSection

    fat = [v for v in img.volumes_cache if v.kind == "fat"]
    cats = img.layout.catalogues
    counts: list[int | None] = [None] * len(fat)
    if not cats or len(cats) != len(fat):
        return counts  # the count itself is checked by the layout scan
    for k, (rec, v) in enumerate(zip(cats, fat, strict=True)):
        where = f"{img.name}: partition {v.index + 1}: catalogue at offset {rec.offset}"
        body = img.stream.read(rec.body_offset, rec.length, "a catalogue")
        by_off = {n.entry_offset: n for n in v.reader.nodes} if isinstance(v.reader, FatSection) else None
        n = 0
        try:
            for e in iter_catalogue(body):
                n += 1
                if by_off is None:
                    continue
                node = by_off.get(e.offset)
                if node is None or node.size != e.size or slot_short_name(node.slot) != e.name:
                    img.advisories.add(f"{where}: entry {e.name!r} ({e.size} bytes, entry offset {e.offset}) "
                                       "does not match the directory records")
        except (ValueError, UnicodeDecodeError) as err:
            img.advisories.add(f"{where}: {err}")
            continue
        counts[k] = n
    return counts
