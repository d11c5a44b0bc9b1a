"""FAT12/16/32 file-aware sections (docs/gho-format.md §10): parse the record stream, rebuild the volume.

Two passes over the section: pass 1 reads only boot, reserved-area and directory-entry records
(data bodies are skipped) and builds the directory tree; clusters are then allocated with the
placement-preserving strategy (§10.8 A); pass 2 decodes file data straight to its final place.
Memory holds the tree (32 bytes + a small object per entry), never file data.
"""

from __future__ import annotations

import bisect
import datetime as _dt
import struct
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.gho.bootsector import Geometry, parse_geometry
from pipeline.gho.codecs import BLOCK_SIZE, BlockDecoder, CodecError
from pipeline.gho.crypto import crc32_msb, decrypt
from pipeline.gho.errors import MAX_ENTRIES, Advisories, GhoError
from pipeline.gho.pool import ordered_map
from pipeline.gho.records import (
    K_BOOT,
    K_DATA,
    K_DIRENT,
    K_END_RUN,
    K_RESERVED,
    Record,
    Section,
    Walker,
)
from pipeline.gho.sparse import SparseWriter

ZERO_SLOT_CRC = 0x12EED357
MAX_DEPTH = 256
DOT = b".          "
DOTDOT = b"..         "


_BAD_NAME_BYTES = (frozenset(b'"*+,./:;<=>?[\\]|') | frozenset(range(0x20)) | {0x7F}
                   | frozenset(range(0x61, 0x7B)))


def bad_name_byte(name11: bytes, label: bool) -> int | None:
    """Index of the first byte of an 8.3 name (or volume label) that fsck.fat rejects, else None."""
    for k, b in enumerate(name11):
        if k == 0 and b == 0x05 and not label:
            continue
        if b in _BAD_NAME_BYTES and not (label and b in b".") or label and b >= 0x80:
            return k
    if name11[0] == 0x20:
        return 0
    return None


def short_name(slot: bytes) -> str:
    base = bytearray(slot[0:8].rstrip(b" "))
    ext = slot[8:11].rstrip(b" ")
    if base[:1] == b"\x05":
        base[0] = 0xE5
    b = bytes(base).decode("cp437")
    e = ext.decode("cp437")
    if slot[12] & 0x08:
        b = b.lower()
    if slot[12] & 0x10:
        e = e.lower()
    return f"{b}.{e}" if e else b


def lfn_checksum(name11: bytes) -> int:
    s = 0
    for b in name11:
        s = (((s & 1) << 7) + (s >> 1) + b) & 0xFF
    return s


def _lfn_name(parts: list[bytes], name11: bytes) -> str | None:
    if not parts:
        return None
    csum = lfn_checksum(name11)
    by_seq: dict[int, bytes] = {}
    last = 0
    for e in parts:
        if e[13] != csum:
            return None
        seq = e[0] & 0x3F
        if e[0] & 0x40:
            last = seq
        by_seq[seq] = e[1:11] + e[14:26] + e[28:32]
    if not last or sorted(by_seq) != list(range(1, last + 1)):
        return None
    raw = b"".join(by_seq[k] for k in range(1, last + 1))
    chars = []
    for k in range(0, len(raw), 2):
        c = raw[k] | (raw[k + 1] << 8)
        if c == 0:
            break
        chars.append(c)
    try:
        return b"".join(struct.pack("<H", c) for c in chars).decode("utf-16-le")
    except UnicodeDecodeError:
        return None


def fat_datetime(date: int, time: int) -> str | None:
    try:
        return _dt.datetime(1980 + (date >> 9), (date >> 5) & 15, date & 31,
                            time >> 11, (time >> 5) & 63, (time & 31) * 2).isoformat()
    except ValueError:
        return None


@dataclass(eq=False, slots=True)
class Node:
    slot: bytes
    name: str
    is_dir: bool
    parent: Node | None
    entry_offset: int
    orig_cluster: int
    size: int = 0
    #: directories: their recorded slots in order; an entry is (slot bytes, child node or None)
    items: list[tuple[bytes, Node | None]] = field(default_factory=list)
    extents: list[tuple[int, int]] = field(default_factory=list)
    checksum: int | None = None
    checksum_verified: bool | None = None
    decoded: int = 0
    records: int = 0

    @property
    def first_cluster(self) -> int:
        return self.extents[0][0] if self.extents else 0

    @property
    def path(self) -> str:
        names = []
        n: Node | None = self
        while n is not None and n.parent is not None:
            names.append(n.name)
            n = n.parent
        return "/" + "/".join(reversed(names))

    def to_dict(self) -> dict[str, Any]:
        s = self.slot
        date, time = struct.unpack_from("<H", s, 24)[0], struct.unpack_from("<H", s, 22)[0]
        return {
            "path": self.path, "type": "dir" if self.is_dir else "file", "size": self.size,
            "attributes": s[11], "mtime": fat_datetime(date, time), "date": date, "time": time,
            "entry_offset": self.entry_offset, "original_cluster": self.orig_cluster,
            "first_cluster": self.first_cluster,
            "checksum": None if self.checksum is None else f"{self.checksum:08X}",
            "checksum_verified": self.checksum_verified, "data_records": self.records,
        }


class _Allocator:
    """Cluster allocation over [2, clusters + 2) with sorted used intervals."""

    def __init__(self, clusters: int) -> None:
        self.lo, self.hi = 2, clusters + 2
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.used = 0

    def is_free(self, start: int, n: int) -> bool:
        if start < self.lo or start + n > self.hi:
            return False
        k = bisect.bisect_right(self.starts, start)
        if k > 0 and self.ends[k - 1] > start:
            return False
        return not (k < len(self.starts) and self.starts[k] < start + n)

    def take(self, start: int, n: int) -> None:
        k = bisect.bisect_right(self.starts, start)
        self.starts.insert(k, start)
        self.ends.insert(k, start + n)
        self.used += n

    def gaps(self) -> list[list[int]]:
        out, cur = [], self.lo
        for s, e in zip(self.starts, self.ends, strict=True):
            if s > cur:
                out.append([cur, s])
            cur = max(cur, e)
        if cur < self.hi:
            out.append([cur, self.hi])
        return out


class FatSection:
    """One FAT file-aware section of an image."""

    def __init__(self, walker: Walker, section: Section, decoder: BlockDecoder, seed: int | None,
                 advisories: Advisories | None = None) -> None:
        self.walker = walker
        self.section = section
        self.decoder = decoder
        self.seed = seed
        self.where = f"{walker.name}: partition {section.index + 1} (offset {section.header_offset})"
        self.boot: bytes | None = None
        self.reserved: bytes | None = None
        self.geometry: Geometry | None = None
        self.label: str | None = None
        self.root: Node | None = None
        self.nodes: list[Node] = []
        self.advisories = advisories if advisories is not None else Advisories()
        self._closed = False
        self.kind_counts: dict[int, int] = {}
        self._by_offset: dict[int, Node] = {}

    # -- helpers ----------------------------------------------------------------------------
    def body(self, rec: Record) -> bytes:
        what = f"the body of the record at offset {rec.offset}"
        data = self.walker.stream.read(rec.body_offset, rec.length, what)
        return decrypt(data, self.seed) if self.seed is not None else data

    # -- pass 1 -----------------------------------------------------------------------------
    def parse(self) -> None:
        sec = self.section
        stack: list[Node] = []
        lfn: list[bytes] = []
        in_file = False  # after a file's entry, until its kind 0x03 record
        had_data = False  # the current file has data records (so needs its kind 0x03 record)
        for rec in self.walker.iter_records(sec.body_start, sec.end):
            self.kind_counts[rec.kind] = self.kind_counts.get(rec.kind, 0) + 1
            if rec.kind == K_BOOT:
                body = self.body(rec)
                if self.boot is None:
                    self._set_boot(body, rec)
                    assert self.root is not None
                    stack = [self.root]
                elif body != self.boot:
                    raise GhoError(f"{self.where}: closing boot-sector record at offset {rec.offset} "
                                   "differs from the first (they must be identical)")
                if had_data:
                    raise GhoError(f"{self.where}: boot-sector record at offset {rec.offset} before the "
                                   "last file's end-of-data record")
                in_file = False
            elif rec.kind == K_RESERVED:
                if had_data:
                    raise GhoError(f"{self.where}: reserved-area record at offset {rec.offset} before the "
                                   "last file's end-of-data record")
                self._set_reserved(self.body(rec), rec)
                in_file = False
            elif rec.kind == K_DIRENT:
                if self.root is None:
                    raise GhoError(f"{self.where}: directory entry at offset {rec.offset} "
                                   "before the boot record")
                if rec.length != 56:
                    raise GhoError(f"{self.where}: directory-entry record at offset {rec.offset} has "
                                   f"{rec.length} bytes, expected 56")
                self.walker.slots += 1  # counted over the whole image: the cap bounds its memory
                if self.walker.slots > MAX_ENTRIES:
                    raise GhoError(f"{self.where}: more than {MAX_ENTRIES} directory entries in the image "
                                   f"(at offset {rec.offset}); the reader's limit")
                if self._closed:
                    raise GhoError(f"{self.where}: directory entry at offset {rec.offset} after the root "
                                   "directory was closed by its zero slot")
                if had_data:
                    raise GhoError(f"{self.where}: directory entry at offset {rec.offset} before the "
                                   "previous file's end-of-data record")
                node_before = len(self.nodes)
                lfn = self._entry(self.body(rec), rec, stack, lfn)
                in_file = len(self.nodes) > node_before and not self.nodes[-1].is_dir
            elif rec.kind == K_DATA:
                if not in_file or rec.length == 0:
                    raise GhoError(f"{self.where}: data record at offset {rec.offset} "
                                   + ("is empty" if rec.length == 0 else "outside a file"))
                had_data = True
            elif rec.kind == K_END_RUN:
                if not had_data or rec.length != 20:
                    raise GhoError(f"{self.where}: end-of-data record at offset {rec.offset} "
                                   + ("without file data before it" if not had_data
                                      else f"has {rec.length} bytes, expected 20"))
                in_file = had_data = False
            else:
                raise GhoError(f"{self.where}: unexpected record kind 0x{rec.kind:02x} at offset {rec.offset}"
                               " "
                               "in a FAT section (expected 0x02, 0x03, 0x04, 0x17 or 0x18)")
        if self.boot is None:
            raise GhoError(f"{self.where}: no boot-sector record")
        if self.kind_counts.get(K_BOOT, 0) != 2:
            raise GhoError(f"{self.where}: {self.kind_counts.get(K_BOOT, 0)} boot-sector records, expected 2 "
                           "(one opening, one closing the section)")
        if had_data:
            raise GhoError(f"{self.where}: the last file's data is not closed by an end-of-data record")
        if len(stack) > 1:
            self.advisories.add(f"{self.where}: directory {stack[-1].path} not closed by a zero slot")
        g = self.geometry
        assert g is not None
        sig, off = (66, 71) if g.fat_type == 32 else (38, 43)
        boot_label = self.boot[off:off + 11].decode("cp437").rstrip()
        if self.boot[sig] != 0x29:
            boot_label = ""  # no extended boot signature: no label field (fsck.fat reads it as empty)
        if self.label is not None and boot_label not in (self.label, "NO NAME"):
            raise GhoError(f"{self.where}: volume label {boot_label!r} in the boot sector (byte {off}) "
                           f"differs from the root directory's label {self.label!r}")

    def _set_reserved(self, body: bytes, rec: Record) -> None:
        """The FAT32 reserved-area record (§10.7): verbatim sectors, the first equal to the boot record."""
        g = self.geometry
        where = f"{self.where}: reserved-area record at offset {rec.offset}"
        if g is None or g.fat_type != 32 or self.reserved is not None:
            why = "a second one" if self.reserved is not None else "not FAT32"
            raise GhoError(f"{where}: unexpected ({why})")
        bps = g.bytes_per_sector
        if not body or len(body) % bps:
            raise GhoError(f"{where}: {len(body)} bytes, expected whole {bps}-byte sectors")
        if body[:bps] != (self.boot or b"")[:bps]:
            raise GhoError(f"{where}: its first sector differs from the boot-sector record")
        have = len(body) // bps
        bk, fsi = g.backup_boot_sector, g.fsinfo_sector
        boot = self.boot or b""
        backup = body[bk * bps:bk * bps + 512]
        # the geometry (BPB, bytes 11-66) and the signature must match; Ghost's copies differ in the label
        if bk not in (0, 0xFFFF) and bk < have and \
                (backup[11:67] != boot[11:67] or backup[510:512] != b"\x55\xaa"):
            raise GhoError(f"{where}: backup boot sector {bk} has other geometry than the boot sector")
        for sec in (fsi, bk + 1 if bk not in (0, 0xFFFF) else 0):
            o = sec * bps
            if sec and sec < have and fsi not in (0, 0xFFFF):
                sigs = struct.unpack_from("<I", body, o)[0], struct.unpack_from("<I", body, o + 484)[0], \
                    struct.unpack_from("<I", body, o + 508)[0]
                if sigs != (0x41615252, 0x61417272, 0xAA550000):
                    raise GhoError(f"{where}: FSInfo sector {sec} has bad signatures "
                                   f"{' '.join(f'{x:08x}' for x in sigs)}")
        self.reserved = body

    def _set_boot(self, body: bytes, rec: Record) -> None:
        if len(body) != 512 or body[510:512] != b"\x55\xaa":
            raise GhoError(f"{self.where}: boot-sector record at offset {rec.offset} is not a 512-byte "
                           f"boot sector ending 55 AA (wrong password?)")
        self.boot = body
        g = self.geometry = parse_geometry(body, self.where)
        root_cluster = g.root_cluster if g.fat_type == 32 else 0
        self.root = Node(b"", "", True, None, rec.offset, root_cluster)

    def _entry(self, body: bytes, rec: Record, stack: list[Node], lfn: list[bytes]) -> list[bytes]:
        e = body[:32]
        crc = struct.unpack_from("<I", body, 32)[0] if len(body) >= 36 else None
        want = ZERO_SLOT_CRC if e == bytes(32) else crc32_msb(e)
        if crc is not None and crc != want:
            self.advisories.add(f"{self.where}: directory entry at offset {rec.offset}: CRC {crc:08X}, "
                                f"expected {want:08X}")
        cur = stack[-1]
        if e[0] == 0:
            if len(stack) > 1:
                stack.pop()
            else:
                self._closed = True
            return []
        if e[0] == 0xE5:
            cur.items.append((e, None))
            return []
        attr = e[11]
        if attr & 0x3F == 0x0F:
            cur.items.append((e, None))
            return [*lfn, e]
        if attr & 0x3F != 0x0F and e[0:11] not in (DOT, DOTDOT):
            self._check_slot(e, rec)
        if attr & 0x18 == 0x08:
            if cur is self.root and self.label is None:
                self.label = e[0:11].decode("cp437").rstrip()
            cur.items.append((e, None))
            return []
        if e[0:11] in (DOT, DOTDOT):
            g = self.geometry
            assert g is not None
            clus = struct.unpack_from("<H", e, 26)[0]
            if g.fat_type == 32:
                clus |= struct.unpack_from("<H", e, 20)[0] << 16
            if e[0:11] == DOT and cur is not self.root and clus != cur.orig_cluster:
                self.advisories.add(f"{self.where}: '.' entry at offset {rec.offset} names cluster {clus}, "
                                    f"its directory {cur.path} starts at {cur.orig_cluster}")
            cur.items.append((e, None))
            return []
        name = _lfn_name(lfn, e[0:11]) or short_name(e)
        orig = struct.unpack_from("<H", e, 26)[0]
        g = self.geometry
        assert g is not None
        if g.fat_type == 32:
            orig |= struct.unpack_from("<H", e, 20)[0] << 16
        is_dir = bool(attr & 0x10)
        size = 0 if is_dir else struct.unpack_from("<I", e, 28)[0]
        node = Node(e, name, is_dir, cur, rec.offset, orig, size)
        cur.items.append((e, node))
        self.nodes.append(node)
        if is_dir:
            if len(stack) >= MAX_DEPTH:
                raise GhoError(f"{self.where}: directories nested deeper than {MAX_DEPTH} "
                               f"at offset {rec.offset}")
            stack.append(node)
        else:
            self._by_offset[rec.offset] = node
        return []

    def _check_slot(self, e: bytes, rec: Record) -> None:
        """What fsck.fat rejects in an 8.3 slot or volume label: bad name bytes, reserved attribute bits,
        a label that is also a directory, a label with clusters or a size."""
        attr = e[11]
        label = attr & 0x18 == 0x08
        where = f"{self.where}: directory entry at offset {rec.offset}"
        bad = bad_name_byte(e[0:11], label=label)
        if bad is not None:
            raise GhoError(f"{where}: name {e[0:11]!r} has an invalid byte 0x{e[bad]:02x} at position {bad}")
        if attr & 0xC0 or attr & 0x18 == 0x18:
            raise GhoError(f"{where}: invalid attributes 0x{attr:02x} (byte 11)")
        if label and (any(e[20:22]) or any(e[26:32])):
            raise GhoError(f"{where}: volume label {e[0:11]!r} has a cluster or size (bytes 20-21, 26-31)")

    # -- allocation -------------------------------------------------------------------------
    def _dir_slots(self, d: Node) -> list[tuple[bytes, Node | None]]:
        """The slots to write for directory ``d`` (synthesises missing ``.``/``..``, §10.8 step 7)."""
        items = d.items
        if d is self.root:
            return items
        names = [s[0:11] for s, _ in items[:2]]
        if names == [DOT, DOTDOT]:
            return items
        base = bytearray(d.slot)
        dot = bytes(DOT) + bytes(base[11:32])
        dotdot = bytes(DOTDOT) + bytes(base[11:32])
        rest = [it for it in items if it[0][0:11] not in (DOT, DOTDOT)]
        return [(dot, None), (dotdot, None), *rest]

    def allocate(self) -> None:
        g = self.geometry
        assert g is not None and self.root is not None
        cb = g.cluster_bytes
        alloc = _Allocator(g.clusters)
        ents: list[tuple[Node, int]] = []
        if g.fat_type == 32:
            ents.append((self.root, max(1, -(-len(self.root.items) * 32 // cb))))
        elif len(self.root.items) > g.root_entries:
            raise GhoError(f"{self.where}: root directory has {len(self.root.items)} slots, "
                           f"the volume allows {g.root_entries}")
        for n in self.nodes:
            need = max(1, -(-len(self._dir_slots(n)) * 32 // cb)) if n.is_dir else -(-n.size // cb)
            ents.append((n, need))
        total = sum(need for _, need in ents)
        if total > g.clusters:
            raise GhoError(f"{self.where}: files need {total} clusters, the volume has {g.clusters}")
        rest = []
        for n, need in ents:
            if need and alloc.is_free(n.orig_cluster, need):
                alloc.take(n.orig_cluster, need)
                n.extents = [(n.orig_cluster, need)]
            elif need:
                rest.append((n, need))
        gaps = alloc.gaps()
        gi = 0
        for n, need in rest:
            while need:
                start, end = gaps[gi]
                take = min(need, end - start)
                n.extents.append((start, take))
                gaps[gi][0] += take
                if gaps[gi][0] == end:
                    gi += 1
                need -= take
                alloc.used += take
        self.used_clusters = alloc.used

    # -- writing ----------------------------------------------------------------------------
    def write(self, out: SparseWriter, base: int, progress: Callable[[int], None] | None = None) -> None:
        """Write the rebuilt volume at byte ``base`` of ``out`` (parse() and allocate() first)."""
        g = self.geometry
        assert g is not None and self.boot is not None and self.root is not None
        bps = g.bytes_per_sector
        if self.reserved:
            res = bytearray(self.reserved[: g.reserved_sectors * bps])
            if g.fat_type == 32:
                for sec in {g.fsinfo_sector, g.backup_boot_sector + 1 if g.backup_boot_sector else 0}:
                    o = sec * bps
                    if sec and o + 512 <= len(res) and struct.unpack_from("<I", res, o)[0] == 0x41615252:
                        struct.pack_into("<II", res, o + 488, g.clusters - self.used_clusters, 0xFFFFFFFF)
            out.write_at(base, bytes(res))
        out.write_at(base, self.boot)
        self._write_fats(out, base)
        self._write_dirs(out, base)
        self._write_files(out, base, progress)

    def _chains(self) -> list[list[tuple[int, int]]]:
        chains = [n.extents for n in self.nodes if n.extents]
        if self.root is not None and self.root.extents:
            chains.append(self.root.extents)
        return chains

    def _write_fats(self, out: SparseWriter, base: int) -> None:
        g = self.geometry
        assert g is not None
        fat_off = [base + (g.reserved_sectors + k * g.fat_sectors) * g.bytes_per_sector
                   for k in range(g.num_fats)]
        if g.fat_type == 12:
            fat = bytearray((g.clusters + 2) * 3 // 2 + 2)

            def put(n: int, v: int) -> None:
                o = n * 3 // 2
                cur = fat[o] | (fat[o + 1] << 8)
                cur = (cur & 0x000F) | (v << 4) if n & 1 else (cur & 0xF000) | v
                fat[o], fat[o + 1] = cur & 0xFF, cur >> 8

            put(0, 0xF00 | g.media)
            put(1, 0xFFF)
            for chain in self._chains():
                for k, (s, c) in enumerate(chain):
                    for x in range(s, s + c - 1):
                        put(x, x + 1)
                    put(s + c - 1, chain[k + 1][0] if k + 1 < len(chain) else 0xFFF)
            for o in fat_off:
                out.write_at(o, bytes(fat))
            return
        code, eoc, head = ("H", 0xFFFF, 0xFF00) if g.fat_type == 16 else ("I", 0x0FFFFFFF, 0x0FFFFF00)
        es = 2 if g.fat_type == 16 else 4
        first = array(code, [head | g.media, eoc]).tobytes()
        for o in fat_off:
            out.write_at(o, first)
        for chain in self._chains():
            for k, (s, c) in enumerate(chain):
                ents = array(code, range(s + 1, s + c))
                ents.append(chain[k + 1][0] if k + 1 < len(chain) else eoc)
                data = ents.tobytes()
                for o in fat_off:
                    out.write_at(o + s * es, data)

    def _patch(self, slot: bytes, cluster: int) -> bytes:
        g = self.geometry
        assert g is not None
        b = bytearray(slot)
        struct.pack_into("<H", b, 26, cluster & 0xFFFF)
        if g.fat_type == 32:
            struct.pack_into("<H", b, 20, cluster >> 16)
        return bytes(b)

    def _write_dirs(self, out: SparseWriter, base: int) -> None:
        g = self.geometry
        assert g is not None and self.root is not None
        for d in [self.root, *[n for n in self.nodes if n.is_dir]]:
            parts = []
            for slot, child in self._dir_slots(d):
                if child is not None:
                    parts.append(self._patch(slot, child.first_cluster))
                elif slot[0:11] == DOT:
                    parts.append(self._patch(slot, d.first_cluster))
                elif slot[0:11] == DOTDOT:
                    p = d.parent
                    parts.append(self._patch(slot, 0 if p is None or p is self.root else p.first_cluster))
                else:
                    parts.append(slot)
            data = b"".join(parts)
            if d is self.root and g.fat_type != 32:
                root_sector = g.reserved_sectors + g.num_fats * g.fat_sectors
                out.write_at(base + root_sector * g.bytes_per_sector, data)
            else:
                self._write_extents(out, base, d.extents, 0, data)

    def _write_extents(self, out: SparseWriter, base: int, extents: list[tuple[int, int]], pos: int,
                       data: bytes) -> None:
        """Write ``data`` at byte ``pos`` of the cluster chain ``extents``."""
        g = self.geometry
        assert g is not None
        cb = g.cluster_bytes
        view = memoryview(data)
        start = 0
        for s, c in extents:
            ext_bytes = c * cb
            if pos >= ext_bytes:
                pos -= ext_bytes
                continue
            take = min(len(view) - start, ext_bytes - pos)
            out.write_at(base + g.cluster_offset(s) + pos, view[start:start + take])
            start += take
            pos = 0
            if start >= len(view):
                return
        if start < len(view):
            raise GhoError(f"{self.where}: file data exceeds its allocation")

    def _write_files(self, out: SparseWriter, base: int, progress: Callable[[int], None] | None) -> None:
        sec = self.section
        cur: Node | None = None
        first_block = b""
        last_flag = False
        stream = self.walker.stream

        def bodies() -> Iterator[tuple[Record, bytes | GhoError | None]]:
            """Every record with the raw body of its data records (a read error kept for its turn)."""
            for rec in self.walker.iter_records(sec.body_start, sec.end):
                raw: bytes | GhoError | None = None
                if rec.kind == K_DATA:
                    try:
                        raw = stream.read(rec.body_offset, rec.length, f"the body of the record at offset "
                                                                        f"{rec.offset}")
                    except GhoError as e:
                        raw = e
                yield rec, raw

        def job(item: tuple[Record, bytes | GhoError | None]) -> tuple[Record, bytes | Exception | None]:
            """Decrypt + decode one data record's body (a worker job, pipeline.gho.pool)."""
            rec, raw = item
            if not isinstance(raw, bytes):
                return rec, raw
            body = decrypt(raw, self.seed) if self.seed is not None else raw
            try:
                return rec, self.decoder.decode(body, BLOCK_SIZE)
            except CodecError as e:
                return rec, e

        for rec, decoded in ordered_map(job, bodies(), self.walker.decode_threads(self.decoder)):
            if rec.kind == K_DIRENT:
                cur = self._by_offset.get(rec.offset)
                first_block = b""
                last_flag = False
            elif rec.kind == K_DATA:
                if cur is None:
                    raise GhoError(f"{self.where}: data record at offset {rec.offset} outside a file")
                if last_flag:
                    raise GhoError(f"{self.where}: data record at offset {rec.offset} follows the record "
                                   f"flagged as the last one of {cur.path}")
                if cur.decoded % BLOCK_SIZE:
                    raise GhoError(f"{self.where}: data record at offset {rec.offset} follows a short "
                                   f"({cur.decoded % BLOCK_SIZE}-byte) block of {cur.path}; only the last "
                                   "block may be short")
                if isinstance(decoded, GhoError):
                    raise decoded
                if isinstance(decoded, CodecError):
                    raise GhoError(decoded.at(self.walker.name, rec.offset,
                                              f"data record of {cur.path}")) from None
                assert isinstance(decoded, bytes)
                data = decoded
                if cur.decoded + len(data) > cur.size:
                    raise GhoError(f"{self.where}: {cur.path} decodes to more than its {cur.size} bytes "
                                   f"(data record at offset {rec.offset})")
                if cur.records == 0:
                    first_block = data
                self._write_extents(out, base, cur.extents, cur.decoded, data)
                cur.decoded += len(data)
                cur.records += 1
                last_flag = bool(rec.flags & 1)
                if last_flag != (cur.decoded == cur.size):
                    raise GhoError(f"{self.where}: data record at offset {rec.offset} of {cur.path} has the "
                                   f"last-record flag {'set' if last_flag else 'clear'} after {cur.decoded} "
                                   f"of {cur.size} bytes")
                if progress:
                    progress(rec.end)
            elif rec.kind == K_END_RUN and cur is not None:
                self._checksum(cur, self.body(rec), first_block, rec)
                self._finish(cur, rec)
                cur = None
        for n in self.nodes:
            if not n.is_dir and n.decoded != n.size:
                raise GhoError(f"{self.where}: {n.path} has {n.decoded} bytes of data, "
                               f"its entry says {n.size}")

    def _checksum(self, node: Node, body: bytes, first_block: bytes, rec: Record) -> None:
        """The kind 0x03 record (§10.6): u32 C twice, 12 zero bytes; C is CRC32-MSB of the content for the
        files where the algorithm is known (one data record, at least 16 bytes: every such fixture file);
        a shorter one-record file that matches is "verified", else unverified;
        a mismatch is advisory, like every checksum of the format (§13)."""
        c1, c2 = struct.unpack_from("<II", body, 0)
        node.checksum = c1
        where = f"{self.where}: {node.path}: end-of-data record at offset {rec.offset}"
        if c1 != c2 or any(body[8:20]):
            self.advisories.add(f"{where}: checksum copies {c1:08X}/{c2:08X} and padding "
                                f"{body[8:20].hex()} are inconsistent")
            return
        if node.records == 1:
            got = crc32_msb(first_block)
            # a shorter file may use another rule (the fixtures' 6-byte MSDOS.SYS): unverified, not wrong
            node.checksum_verified = True if got == c1 else False if node.size >= 16 else None
            if node.checksum_verified is False:
                self.advisories.add(f"{where}: content CRC {got:08X} does not match the stored "
                                    f"checksum {c1:08X}")

    def _finish(self, node: Node, rec: Record) -> None:
        if node.decoded != node.size:
            raise GhoError(f"{self.where}: {node.path} has {node.decoded} bytes of data, its entry says "
                           f"{node.size} (end record at offset {rec.offset})")

    # -- reporting --------------------------------------------------------------------------
    def files(self) -> list[Node]:
        return [n for n in self.nodes if not n.is_dir]
