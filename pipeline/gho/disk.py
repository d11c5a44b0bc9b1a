"""Partition tables: parse an MBR, place volumes on a disk and synthesise MBR + EBRs (§8.6, §10.10)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

SECTOR = 512
EXTENDED_TYPES = (0x05, 0x0F, 0x85)
CHS_LBA = b"\xfe\xff\xff"  # "use LBA" CHS value (the address is past cylinder 1023)
MBR_LIMIT = 1 << 32  # an MBR entry holds 32-bit LBAs and counts: partitions end at or below 2^32 sectors
DEFAULT_GEOMETRY = (255, 63)  # (heads, sectors per track) of every BIOS since the 1990s


class TableError(ValueError):
    """A partition does not fit an MBR entry (``partition`` is 1-based, in placement order)."""

    def __init__(self, partition: int, field: str, value: int) -> None:
        self.partition, self.field, self.value = partition, field, value
        super().__init__(f"partition {partition}: {field} {value} does not fit an MBR partition entry "
                         f"(expected below {MBR_LIMIT} sectors)")


@dataclass(frozen=True)
class MbrEntry:
    status: int
    ptype: int
    start: int
    sectors: int


def parse_mbr(sector: bytes) -> list[MbrEntry] | None:
    """The four primary entries (empty ones included), or None without the 55 AA signature."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    out = []
    for k in range(4):
        o = 446 + 16 * k
        status, ptype, start, count = sector[o], sector[o + 4], *struct.unpack_from("<II", sector, o + 8)
        out.append(MbrEntry(status, ptype, start, count))
    return out


def primary_partitions(sector: bytes) -> list[MbrEntry] | None:
    """The used, non-extended primary entries in disk order: the k-th partition section of a disk image
    is the k-th of these (§8.6); None without an MBR."""
    entries = parse_mbr(sector)
    if entries is None:
        return None
    return sorted((e for e in entries if e.ptype and e.ptype not in EXTENDED_TYPES and e.sectors),
                  key=lambda e: e.start)


@dataclass
class Placement:
    start: int  # LBA
    sectors: int
    ptype: int
    logical: bool = False
    ebr: int | None = None  # LBA of the EBR before a logical partition


def plan_logicals(first_ebr: int, volumes: list[tuple[int, int, int]]) -> list[Placement]:
    """Place (hidden sectors, sectors, type) volumes as logical partitions from ``first_ebr`` on.

    A hidden-sectors value past the previous partition's end (with room for an EBR) is taken as an
    absolute LBA; a smaller one is relative to the partition's EBR (the DOS convention, §10.10).
    """
    out: list[Placement] = []
    prev_end = first_ebr
    for hidden, sectors, ptype in volumes:
        if hidden > prev_end:
            start = hidden
            ebr = start - 63 if start - 63 >= prev_end else prev_end
        else:
            ebr = prev_end
            start = prev_end + (hidden if hidden > 0 else 63)
        out.append(Placement(start, sectors, ptype, logical=True, ebr=ebr))
        prev_end = start + sectors
    return out


def plan_synthetic(volumes: list[tuple[int, int, int]]) -> list[Placement]:
    """Place (hidden sectors, sectors, type) volumes as §10.10: one primary, the rest logical."""
    if not volumes:
        return []
    hidden, sectors, ptype = volumes[0]
    first = Placement(hidden if hidden > 0 else 63, sectors, ptype)
    return [first, *plan_logicals(first.start + first.sectors, volumes[1:])]


def extended_start(mbr: bytes) -> int | None:
    for e in parse_mbr(mbr) or []:
        if e.ptype in EXTENDED_TYPES:
            return e.start
    return None


def chs(lba: int, geometry: tuple[int, int] = DEFAULT_GEOMETRY) -> bytes:
    """The 3-byte CHS address of ``lba`` (head, sector | cylinder bits 8-9, cylinder), or the LBA marker."""
    heads, spt = geometry
    cyl, rest = divmod(lba, heads * spt)
    if cyl > 1023:
        return CHS_LBA
    head, sec = divmod(rest, spt)
    return bytes([head, (sec + 1) | (cyl >> 2 & 0xC0), cyl & 0xFF])


def _entry(status: int, ptype: int, start: int, count: int, base: int = 0,
           geometry: tuple[int, int] = DEFAULT_GEOMETRY) -> bytes:
    """A 16-byte entry; ``start`` is relative to ``base`` (an EBR's frame), CHS values are absolute."""
    if not (0 <= start < MBR_LIMIT and 0 <= count < MBR_LIMIT and base + start + count <= MBR_LIMIT):
        raise ValueError(f"entry start {start} count {count} (base {base}) outside 32 bits")
    first, last = base + start, base + start + max(count, 1) - 1
    return (bytes([status]) + chs(first, geometry) + bytes([ptype]) + chs(last, geometry)
            + struct.pack("<II", start, count))


def check_fits(places: list[Placement]) -> None:
    """Raise :class:`TableError` for the first partition whose start, size or end does not fit an MBR."""
    for k, p in enumerate(places, 1):
        if not 0 <= p.start < MBR_LIMIT:
            raise TableError(k, "start LBA", p.start)
        if not 0 <= p.sectors < MBR_LIMIT:
            raise TableError(k, "size in sectors", p.sectors)
        if p.start + p.sectors > MBR_LIMIT:
            raise TableError(k, "end LBA", p.start + p.sectors - 1)


def table_sectors(places: list[Placement], disk_id: int, mbr: bytes | None = None,
                  geometry: tuple[int, int] = DEFAULT_GEOMETRY) -> list[tuple[int, bytes]]:
    """(LBA, sector) pairs: the MBR (synthesised unless ``mbr`` is given) and every EBR.

    Raises :class:`TableError` when a partition does not fit an MBR (before anything is built). The
    MBR's boot code area stays zero and no partition is active: :mod:`pipeline.gho.bootchain` finishes
    the disk once its volumes are written.
    """
    check_fits(places)
    out: list[tuple[int, bytes]] = []
    logical = [p for p in places if p.logical]
    ext_start = logical[0].ebr if logical else None
    if mbr is not None and logical:
        ext_start = extended_start(mbr)
        if ext_start is None:
            raise ValueError("logical partitions without an extended partition in the MBR")
    if mbr is None:
        m = bytearray(512)
        struct.pack_into("<I", m, 440, disk_id & 0xFFFFFFFF)
        slot = 0
        for p in places:
            if not p.logical:
                m[446 + 16 * slot: 462 + 16 * slot] = _entry(0, p.ptype, p.start, p.sectors, 0, geometry)
                slot += 1
        if logical and ext_start is not None and slot < 4:
            end = logical[-1].start + logical[-1].sectors
            m[446 + 16 * slot: 462 + 16 * slot] = _entry(0, 0x0F, ext_start, end - ext_start, 0, geometry)
        m[510:512] = b"\x55\xaa"
        out.append((0, bytes(m)))
    for k, p in enumerate(logical):
        assert p.ebr is not None and ext_start is not None
        e = bytearray(512)
        e[446:462] = _entry(0, p.ptype, p.start - p.ebr, p.sectors, p.ebr, geometry)
        if k + 1 < len(logical):
            nxt = logical[k + 1]
            assert nxt.ebr is not None
            e[462:478] = _entry(0, 0x05, nxt.ebr - ext_start, nxt.start + nxt.sectors - nxt.ebr, ext_start,
                                geometry)
        e[510:512] = b"\x55\xaa"
        out.append((p.ebr, bytes(e)))
    return out


def fs_partition_type(fs: str | None) -> int:
    return {"FAT12": 0x01, "FAT16": 0x0E, "FAT32": 0x0C, "NTFS": 0x07}.get(fs or "", 0x83)
