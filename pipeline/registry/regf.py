"""A reader and checker of Windows registry hive files (``regf``), pure Python, from the published format.

Facts from Maxim Suhanov's "Windows registry file format specification" (github.com/msuhanov/regf):

* the base block is 4096 bytes: ``regf``, primary and secondary sequence numbers (equal after a
  complete write: a hive whose numbers differ, or whose checksum is wrong, is *dirty*), last written
  timestamp, version 1.x, file type (0 primary, 1/2 old-format log, 6 new-format log), root cell
  offset and hive bins data size (both relative to the start of the hive bins data at 4096), and the
  XOR-32 checksum of the first 508 bytes at 508 (0 written as 1, 0xFFFFFFFF as 0xFFFFFFFE);
* hive bins (``hbin``, offset of the bin, size a multiple of 4096) hold cells: a signed size
  (negative = allocated) then the record: ``nk`` key node, ``vk`` value, ``sk`` security, ``li``/
  ``lf``/``lh`` subkey lists, ``ri`` an index root of subkey lists, ``db`` big data (segments of
  at most 16344 bytes).

:class:`Hive` looks keys up by path and reads their values on demand from the bytes it is given;
:func:`check` walks the whole tree and raises :class:`HiveDamage` naming the first thing that is
wrong (one short phrase with the offset, for the user's one-line message).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

BASE = 4096
HBIN_HEADER = 0x20
_NONE = 0xFFFFFFFF
KEY_COMP_NAME = 0x0020
VALUE_COMP_NAME = 0x0001
BIG_DATA_SEGMENT = 16344
FILE_TYPES = {0: "primary", 1: "log (old format)", 2: "log (old format)", 6: "log (new format)"}


class HiveDamage(Exception):
    """The hive file is not what the format says; ``str()`` is a short phrase naming the offset."""


def checksum(base: bytes | bytearray | memoryview) -> int:
    """The base block checksum: XOR-32 of the first 508 bytes (0 → 1, 0xFFFFFFFF → 0xFFFFFFFE)."""
    x = 0
    for (d,) in struct.iter_unpack("<I", bytes(base[:0x1FC])):
        x ^= d
    if x == 0xFFFFFFFF:
        return 0xFFFFFFFE
    return x or 1


@dataclass(frozen=True)
class BaseBlock:
    """The fields of a base block (of a hive or of a log's first sector)."""

    signature: bytes
    primary_seq: int
    secondary_seq: int
    timestamp: int
    major: int
    minor: int
    file_type: int
    file_format: int
    root: int
    bins_size: int
    clustering: int
    flags: int
    stored_checksum: int
    computed_checksum: int

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> BaseBlock:
        if len(data) < 512:
            raise HiveDamage(f"base block truncated ({len(data)} bytes, expected 4096)")
        b = bytes(data[:512])
        sig, s1, s2, ts, major, minor, ftype, fmt, root, size, clus = struct.unpack_from(
            "<4sIIQIIIIIII", b, 0)
        flags = struct.unpack_from("<I", b, 0x90)[0]
        return cls(sig, s1, s2, ts, major, minor, ftype, fmt, root, size, clus, flags,
                   struct.unpack_from("<I", b, 0x1FC)[0], checksum(b))

    @property
    def checksum_ok(self) -> bool:
        return self.stored_checksum == self.computed_checksum

    @property
    def dirty(self) -> bool:
        """Dirty in the format's sense: sequence numbers differ or the checksum is wrong."""
        return self.primary_seq != self.secondary_seq or not self.checksum_ok

    @property
    def version(self) -> str:
        return f"{self.major}.{self.minor}"


def fix_base_block(data: bytearray, seq: int, *, timestamp: int | None = None) -> None:
    """Set both sequence numbers to ``seq`` (a clean hive), the file type to primary, optionally
    the timestamp, and recompute the checksum, in place."""
    struct.pack_into("<II", data, 4, seq & 0xFFFFFFFF, seq & 0xFFFFFFFF)
    if timestamp is not None:
        struct.pack_into("<Q", data, 12, timestamp)
    struct.pack_into("<I", data, 28, 0)
    struct.pack_into("<I", data, 0x1FC, checksum(data[:BASE]))


@dataclass(frozen=True)
class Value:
    name: str
    type: int
    data: bytes


class Hive:
    """Read access to a hive held in memory (``bytes``/``bytearray``/``mmap``). Offsets are relative
    to the hive bins data, as the format stores them. Every read is bounds-checked."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self.data = memoryview(data)
        self.base = BaseBlock.parse(self.data)
        if self.base.signature != b"regf":
            raise HiveDamage(f"no regf signature at 0x0 (found {self.base.signature!r})")
        # bins actually present: the declared size, capped by the file (check() reports the cut)
        self.end = min(self.base.bins_size, max(0, len(self.data) - BASE))
        self._children: dict[int, dict[str, int]] = {}  # key offset → {lower child name: offset}

    # -- cells
    def cell(self, off: int, what: str = "cell") -> memoryview:
        """The data of the allocated cell at ``off`` (without its size field)."""
        if off == _NONE or off < HBIN_HEADER or off % 8 or off + 4 > self.end:
            raise HiveDamage(f"{what} at 0x{off:x} lies outside the hive bins (0x{self.end:x} bytes)")
        size = struct.unpack_from("<i", self.data, BASE + off)[0]
        if size >= 0:
            raise HiveDamage(f"{what} at 0x{off:x} points to a free cell")
        size = -size
        if size < 8 or off + size > self.end:
            raise HiveDamage(f"{what} at 0x{off:x} runs past the end of the hive bins (size 0x{size:x})")
        return self.data[BASE + off + 4:BASE + off + size]

    def nk(self, off: int) -> memoryview:
        c = self.cell(off, "key")
        if len(c) < 76 or bytes(c[:2]) != b"nk":
            raise HiveDamage(f"key cell at 0x{off:x} is not a key node (nk)")
        return c

    def key_name(self, off: int) -> str:
        c = self.nk(off)
        flags, nlen = struct.unpack_from("<H", c, 2)[0], struct.unpack_from("<H", c, 72)[0]
        raw = bytes(c[76:76 + nlen])
        if len(raw) < nlen:
            raise HiveDamage(f"key name at 0x{off:x} runs past its cell")
        return raw.decode("latin-1") if flags & KEY_COMP_NAME else raw.decode("utf-16-le", "replace")

    @property
    def root(self) -> int:
        return self.base.root

    def subkeys(self, off: int) -> list[int]:
        """Offsets of the key nodes of ``off``'s (non-volatile) subkeys."""
        c = self.nk(off)
        count, lst = struct.unpack_from("<I", c, 20)[0], struct.unpack_from("<I", c, 28)[0]
        if count == 0:
            return []
        out = self._list(lst, top=True)
        if len(out) != count:
            raise HiveDamage(f"key at 0x{off:x} says {count} subkeys, its list holds {len(out)}")
        return out

    def _list(self, off: int, *, top: bool) -> list[int]:
        c = self.cell(off, "subkey list")
        if len(c) < 4:
            raise HiveDamage(f"subkey list at 0x{off:x} is too short")
        sig, n = bytes(c[:2]), struct.unpack_from("<H", c, 2)[0]
        if sig in (b"lf", b"lh"):
            step = 8
        elif sig in (b"li", b"ri"):
            step = 4
        else:
            raise HiveDamage(f"subkey list at 0x{off:x} has no li/lf/lh/ri signature")
        if 4 + n * step > len(c):
            raise HiveDamage(f"subkey list at 0x{off:x} ({n} elements) runs past its cell")
        items = [struct.unpack_from("<I", c, 4 + i * step)[0] for i in range(n)]
        if sig == b"ri":
            if not top:
                raise HiveDamage(f"index root at 0x{off:x} points to another index root")
            return [k for sub in items for k in self._list(sub, top=False)]
        return items

    def values(self, off: int) -> list[Value]:
        c = self.nk(off)
        count, lst = struct.unpack_from("<I", c, 36)[0], struct.unpack_from("<I", c, 40)[0]
        if count == 0:
            return []
        vl = self.cell(lst, "value list")
        if count * 4 > len(vl):
            raise HiveDamage(f"value list at 0x{lst:x} ({count} values) runs past its cell")
        return [self.value(struct.unpack_from("<I", vl, i * 4)[0]) for i in range(count)]

    def value(self, off: int) -> Value:
        c = self.cell(off, "value")
        if len(c) < 20 or bytes(c[:2]) != b"vk":
            raise HiveDamage(f"value cell at 0x{off:x} is not a key value (vk)")
        nlen, size, doff, vtype, flags = struct.unpack_from("<HIIIH", c, 2)
        raw = bytes(c[20:20 + nlen])
        if len(raw) < nlen:
            raise HiveDamage(f"value name at 0x{off:x} runs past its cell")
        name = raw.decode("latin-1") if flags & VALUE_COMP_NAME else raw.decode("utf-16-le", "replace")
        return Value(name, vtype, self._data(off, size, doff))

    def _data(self, voff: int, size: int, doff: int) -> bytes:
        if size & 0x80000000:  # stored in the offset field itself
            n = size & 0x7FFFFFFF
            return struct.pack("<I", doff)[:min(n, 4)]
        if size == 0:
            return b""
        c = self.cell(doff, f"data of the value at 0x{voff:x}")
        if not (size > BIG_DATA_SEGMENT and self.base.minor >= 4 and bytes(c[:2]) == b"db"):
            if size > len(c):
                raise HiveDamage(f"data of the value at 0x{voff:x} ({size} bytes) runs past its cell")
            return bytes(c[:size])
        nseg, lst = struct.unpack_from("<HI", c, 2)
        segs = self.cell(lst, "big data segment list")
        if nseg * 4 > len(segs):
            raise HiveDamage(f"big data segment list at 0x{lst:x} runs past its cell")
        out = bytearray()
        for i in range(nseg):
            out += self.cell(struct.unpack_from("<I", segs, i * 4)[0], "big data segment")[:BIG_DATA_SEGMENT]
        if len(out) < size:
            raise HiveDamage(f"big data of the value at 0x{voff:x} is shorter than {size} bytes")
        return bytes(out[:size])

    # -- paths
    def find(self, path: str) -> int | None:
        """Key node offset of ``path`` (``\\A\\B``, case-insensitive; ``\\`` = the root), None if absent."""
        off = self.root
        for part in [p for p in path.split("\\") if p]:
            children = self._children.get(off)
            if children is None:
                children = self._children[off] = {self.key_name(s).lower(): s for s in self.subkeys(off)}
            found = children.get(part.lower())
            if found is None:
                return None
            off = found
        return off

    def child_names(self, path: str) -> list[str] | None:
        off = self.find(path)
        return None if off is None else [self.key_name(s) for s in self.subkeys(off)]

    def key_values(self, path: str) -> dict[str, Value] | None:
        """``{lower name: Value}`` of key ``path``; None when the key does not exist."""
        off = self.find(path)
        if off is None:
            return None
        return {v.name.lower(): v for v in self.values(off)}

    def walk(self) -> Iterator[tuple[str, list[Value]]]:
        """Every key (``\\A\\B`` paths, the root as ``\\``) with its values, depth first; raises
        :class:`HiveDamage` on a loop or anything that does not follow the format."""
        seen: set[int] = set()
        stack: list[tuple[int, str]] = [(self.root, "")]
        while stack:
            off, path = stack.pop()
            if off in seen:
                raise HiveDamage(f"subkey list loop: key '{path or chr(92)}' (cell 0x{off:x}) is reached "
                                 f"twice")
            seen.add(off)
            yield path or "\\", self.values(off)
            subs = self.subkeys(off)
            stack.extend((s, f"{path}\\{self.key_name(s)}") for s in reversed(subs))


def check(data: bytes | bytearray | memoryview) -> Hive:
    """The hive, after checking what the format defines: signature, checksum, version, every hive
    bin (signature, offset, size, no truncation), every cell's size, and the whole key tree (every
    offset inside the bins, record signatures, subkey counts, no loops). Raises :class:`HiveDamage`."""
    h = Hive(data)
    b = h.base
    if not b.checksum_ok:
        raise HiveDamage(f"base block checksum is 0x{b.stored_checksum:08x}, expected "
                         f"0x{b.computed_checksum:08x}")
    if b.major != 1 or b.minor not in (2, 3, 4, 5, 6):
        raise HiveDamage(f"unknown hive format version {b.version}")
    if b.bins_size % BASE or b.bins_size == 0:
        raise HiveDamage(f"hive bins data size 0x{b.bins_size:x} is not a multiple of 4096")
    scan_bins(h)
    for _ in h.walk():
        pass
    return h


def scan_bins(h: Hive) -> None:
    """Every hive bin header and every cell size inside the declared hive bins data."""
    data, size = h.data, h.base.bins_size
    pos = 0
    while pos < size:
        if BASE + pos + HBIN_HEADER > len(data):
            raise HiveDamage(f"hive bins truncated at 0x{BASE + pos:x} (file ends at 0x{len(data):x}, "
                             f"the base block says 0x{BASE + size:x})")
        sig, boff, bsize = struct.unpack_from("<4sII", data, BASE + pos)
        if sig != b"hbin":
            raise HiveDamage(f"no hive bin at 0x{BASE + pos:x} (found {bytes(sig)!r})")
        if boff != pos or bsize < BASE or bsize % BASE or pos + bsize > size:
            raise HiveDamage(f"hive bin at 0x{BASE + pos:x} has offset 0x{boff:x} and size 0x{bsize:x}")
        if BASE + pos + bsize > len(data):
            raise HiveDamage(f"hive bins truncated at 0x{BASE + pos:x} (file ends at 0x{len(data):x}, "
                             f"the base block says 0x{BASE + size:x})")
        cell = pos + HBIN_HEADER
        while cell < pos + bsize:
            csize = abs(struct.unpack_from("<i", data, BASE + cell)[0])
            if csize < 8 or csize % 8 or cell + csize > pos + bsize:
                raise HiveDamage(f"cell at 0x{cell:x} has size 0x{csize:x} (outside its hive bin)")
            cell += csize
        pos += bsize
