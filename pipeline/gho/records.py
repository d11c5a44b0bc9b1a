"""Record layer, block chains and the section layout of the stream (docs/gho-format.md §5, §6, §8)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeline.gho.bootsector import detect_fs
from pipeline.gho.codecs import BlockDecoder
from pipeline.gho.crypto import decrypt
from pipeline.gho.disk import SECTOR, primary_partitions
from pipeline.gho.errors import MAX_RECORDS, MAX_SECTIONS, MAX_TRACK0_BYTES, GhoError
from pipeline.gho.header import (
    HEADER_SIZE,
    SUBTYPE_EXT,
    SUBTYPE_FAT,
    SUBTYPE_NAMES,
    SUBTYPE_NTFS,
    SUBTYPE_SECTOR,
    FileHeader,
    is_partition_header,
)
from pipeline.gho.stream import SpanStream

RECORD_MAGIC = 0x012F18D8
RECORD_MAGIC_BYTES = struct.pack("<I", RECORD_MAGIC)
RECORD_HEADER = 10

K_DATA = 0x02
K_END_RUN = 0x03
K_DIRENT = 0x04
K_CATALOGUE = 0x05
K_TRACK0 = 0x06
K_BOOT = 0x17
K_RESERVED = 0x18
K_END_IMAGE = 0x23
END_RECORD_SIZE = RECORD_HEADER + 24

#: the record kinds of a FAT section (§10.1) and the body lengths each may have
FAT_RECORD_LENGTHS = {
    K_DATA: lambda n: n > 0, K_END_RUN: lambda n: n == 20, K_DIRENT: lambda n: n == 56,
    K_BOOT: lambda n: n == 512, K_RESERVED: lambda n: n > 0 and n % 512 == 0,
}

_SCAN_CHUNK = 1 << 20


@dataclass(frozen=True)
class Record:
    offset: int
    kind: int
    flags: int
    aux: int
    length: int

    @property
    def body_offset(self) -> int:
        return self.offset + RECORD_HEADER

    @property
    def end(self) -> int:
        return self.offset + RECORD_HEADER + self.length


def parse_record_header(buf: bytes, offset: int) -> Record | None:
    if len(buf) < RECORD_HEADER:
        return None
    kind, flags, aux, magic, length = struct.unpack_from("<BBHIH", buf, 0)
    if magic != RECORD_MAGIC:
        return None
    return Record(offset, kind, flags, aux, length)


@dataclass
class Section:
    index: int
    header_offset: int
    subtype: int
    body_start: int
    end: int = 0
    #: sector chains: (payload offset, payload length) of the first and the last block, block count
    first_block: tuple[int, int] | None = None
    last_block: tuple[int, int] | None = None
    blocks: int = 0
    raw: bool = False  # uncompressed sector data without [u16] framing (§8.4)
    records: int = 0
    ntfs: Any = None  # NTFS sections: where their parts are (pipeline.gho.ntfs.NtfsLayout)

    @property
    def kind(self) -> str:
        return SUBTYPE_NAMES.get(self.subtype, f"unknown-0x{self.subtype:02x}")


@dataclass
class Layout:
    first_structure: int
    sections: list[Section] = field(default_factory=list)
    track0: list[Record] = field(default_factory=list)
    trailer_start: int | None = None
    end_record: int | None = None
    catalogues: list[Record] = field(default_factory=list)

    @property
    def descriptor_size(self) -> int:
        return self.first_structure - HEADER_SIZE


class Walker:
    """Walks one image's structures; every read goes through the stream (bounded sizes)."""

    def __init__(self, stream: SpanStream, header: FileHeader) -> None:
        self.stream = stream
        self.header = header
        self.name = stream.name
        #: cipher seed once the password is known (needed to read unframed encrypted sector data)
        self.seed: int | None = None
        #: directory entries parsed so far in the whole image (capped, see errors.MAX_ENTRIES)
        self.slots = 0
        #: threads that decode blocks while a section is written (``ghost.decode_threads``, pipeline.gho.pool)
        self.threads = 1
        #: byte sizes of the primary partitions in track 0's MBR, disk order (set by scan)
        self.table: list[int] | None = None

    def decode_threads(self, decoder: BlockDecoder) -> int:
        """Threads for a decode loop with ``decoder``: 1 where parallel decoding gains nothing."""
        return self.threads if decoder.parallel else 1

    # -- primitives -------------------------------------------------------------------------
    def part_header_at(self, pos: int) -> int | None:
        buf = self.stream.read_upto(pos, 8)
        if is_partition_header(buf, 0, self.header.compression, self.header.image_id):
            return buf[2]
        return None

    def record_at(self, pos: int) -> Record | None:
        return parse_record_header(self.stream.read_upto(pos, RECORD_HEADER), pos)

    def find_end_record(self) -> tuple[int, int, int] | None:
        """(trailer start, first catalogue, end-record offset) from the end record (§6.6), or None.

        A = bytes from the trailer start to the end record, B = bytes of catalogue records; the
        descriptor copy between them has the descriptor area's size, A − B.
        """
        e = self.stream.size - END_RECORD_SIZE
        if e < HEADER_SIZE:
            return None
        buf = self.stream.read_upto(e, END_RECORD_SIZE)
        rec = parse_record_header(buf, e)
        if rec is None or rec.kind != K_END_IMAGE or rec.length != 24:
            return None
        zero, a, b = struct.unpack_from("<QQQ", buf, RECORD_HEADER)
        if zero != 0 or b > a or a > e - HEADER_SIZE:
            raise GhoError(f"{self.name}: end record at offset {e}: fields ({zero}, {a}, {b}) are "
                           f"inconsistent with a {self.stream.size}-byte stream "
                           f"(expected 0, A ≤ {e - HEADER_SIZE}, B ≤ A)")
        return e - a, e - b, e

    def first_structure_at(self, expect: int, limit: int) -> int:
        """The first partition header (or track-0 record) must sit right after the descriptor area, whose
        size the trailer gives (its copy, §6.6); anything else there is a corrupt header."""
        if not HEADER_SIZE < expect < limit:
            raise GhoError(f"{self.name}: end record implies a descriptor area of "
                           f"{expect - HEADER_SIZE} bytes, "
                           f"which does not fit before the trailer at offset {limit}")
        if self.part_header_at(expect) is not None:
            return expect
        rec = self.record_at(expect)
        if rec is not None and rec.kind == K_TRACK0:
            return expect
        buf = self.stream.read(expect, 8, "the first partition header")
        hdr = self.header
        if buf[0:2] != b"\xfe\xef":
            what = f"magic {buf[0:2].hex()}, expected feef"
        elif buf[3] != hdr.compression:
            what = (f"compression byte 0x{buf[3]:02x} (offset +3), the file header says "
                    f"0x{hdr.compression:02x}")
        elif struct.unpack_from("<I", buf, 4)[0] != hdr.image_id:
            what = (f"image id 0x{struct.unpack_from('<I', buf, 4)[0]:08x} (offset +4), the file header says "
                    f"0x{hdr.image_id:08x}")
        else:
            what = f"byte +2 is 0x{buf[2]:02x}, a file kind, not a partition subtype"
        raise GhoError(f"{self.name}: corrupt first partition header at offset {expect} (after the "
                       f"{expect - HEADER_SIZE}-byte descriptor area the trailer implies): {what}")

    # -- record walk (FAT sections) ----------------------------------------------------------
    def iter_records(self, pos: int, limit: int, what: str = "record") -> Iterator[Record]:
        """Records from ``pos`` until a partition header, ``limit`` or a non-record (``self.stop``)."""
        self.stop = pos
        read, size = self.stream.read_upto, self.stream.size
        comp, ident = self.header.compression, self.header.image_id
        while pos < limit:
            buf = read(pos, RECORD_HEADER)
            if is_partition_header(buf, 0, comp, ident):
                break
            if len(buf) < RECORD_HEADER:
                raise self.stream.truncated(pos + len(buf), f"a {what} header")
            rec = parse_record_header(buf, pos)
            if rec is None:
                break
            if rec.end > size:
                raise self.stream.truncated(size, f"the body of the record at offset {pos}")
            yield rec
            pos = rec.end
            self.stop = pos
        self.stop = pos

    # -- block chains (sector sections, §8.3) ---------------------------------------------
    def iter_blocks(self, pos: int, limit: int) -> Iterator[tuple[int, int]]:
        """(payload offset, payload length) of each ``[u16 stored_len][payload]`` block."""
        self.stop = pos
        while pos < limit:
            buf = self.stream.read_upto(pos, 8)
            if len(buf) >= 8 and buf[4:8] == RECORD_MAGIC_BYTES:
                break
            if len(buf) < 2:
                raise self.stream.truncated(pos + len(buf), "a block length")
            stored = buf[0] | (buf[1] << 8)
            if stored < 3:
                raise GhoError(f"{self.name}: corrupt block chain at offset {pos}: "
                               f"block length {stored}, expected at least 3")
            if pos + stored > self.stream.size:
                raise self.stream.truncated(self.stream.size, f"the block at offset {pos}")
            yield pos + 2, stored - 2
            pos += stored
            self.stop = pos
        self.stop = pos

    # -- the whole layout ------------------------------------------------------------------
    def scan_track0(self, layout: Layout, pos: int, limit: int) -> int:
        """Track 0 of a disk sector image (§8.2): the kind 0x06 records from ``pos``, closed by a kind
        0x03 record, are added to ``layout.track0`` (headers only, nothing decoded); returns the offset
        after them."""
        track0_bytes = 0
        while pos < limit and self.part_header_at(pos) is None:
            rec = self.record_at(pos)
            if rec is None:
                break
            if rec.kind == K_TRACK0:
                lenbuf = self.stream.read(rec.body_offset, 2, "a track-0 block")
                stored = lenbuf[0] | (lenbuf[1] << 8)
                if stored < 3:
                    raise GhoError(f"{self.name}: corrupt track-0 record at offset {pos}: "
                                   f"block length {stored}")
                layout.track0.append(Record(pos, rec.kind, rec.flags, rec.aux, stored))
                track0_bytes += rec.length
                if track0_bytes > MAX_TRACK0_BYTES:
                    raise GhoError(f"{self.name}: track-0 records at offset {pos} announce more than "
                                   f"{MAX_TRACK0_BYTES} bytes before the first partition")
                pos = rec.body_offset + stored
            elif rec.kind == K_END_RUN:
                pos = rec.end
            else:
                break
        return pos

    def scan_catalogues(self, layout: Layout, pos: int, end_rec: int) -> None:
        """The trailer's catalogue records (§6.6) from ``pos`` to the end record, into
        ``layout.catalogues``."""
        while pos < end_rec:
            rec = self.record_at(pos)
            if rec is None or rec.kind != K_CATALOGUE or rec.end > end_rec:
                raise GhoError(f"{self.name}: trailer: expected a catalogue record (kind 0x05) at "
                               f"offset {pos}, "
                               f"catalogues ending at the end record (offset {end_rec})")
            layout.catalogues.append(rec)
            pos = rec.end

    def scan(self) -> Layout:
        found = self.find_end_record()
        if not found:
            raise self.stream.truncated(self.stream.size,
                                        "the trailer (the file does not end with an end record)")
        limit, first_cat, end_rec = found
        first = self.first_structure_at(HEADER_SIZE + first_cat - limit, limit)
        layout = Layout(first_structure=first)
        layout.trailer_start, layout.end_record = limit, end_rec
        pos = self.scan_track0(layout, layout.first_structure, limit)
        self.table = self._track0_table(layout)
        records = 0
        while pos < limit:
            subtype = self.part_header_at(pos)
            if subtype is None:
                break
            if len(layout.sections) >= MAX_SECTIONS:
                raise GhoError(f"{self.name}: more than {MAX_SECTIONS} partition sections (the next at "
                               f"offset {pos})")
            sec = Section(len(layout.sections), pos, subtype, pos + HEADER_SIZE)
            layout.sections.append(sec)
            pos = sec.body_start
            if subtype == SUBTYPE_FAT:
                for rec in self.iter_records(pos, limit):
                    sec.records += 1
                    records += 1
                    if records > MAX_RECORDS:
                        raise GhoError(f"{self.name}: more than {MAX_RECORDS} records (at offset "
                                       f"{rec.offset}); the reader's limit")
                    want = FAT_RECORD_LENGTHS.get(rec.kind)
                    if want is None or not want(rec.length):
                        raise GhoError(f"{self.name}: partition {sec.index + 1}: record at offset "
                                       f"{rec.offset} has kind 0x{rec.kind:02x} and a {rec.length}-byte "
                                       "body; a FAT section holds kinds 0x02 (non-empty), 0x03 (20 bytes), "
                                       "0x04 (56), 0x17 (512) and 0x18 (whole sectors)")
                pos = self.stop
                first_rec = self.record_at(sec.body_start) if sec.records else None
                if first_rec is None or first_rec.kind != K_BOOT:
                    raise GhoError(f"{self.name}: partition {sec.index + 1} (offset {sec.header_offset}) is "
                                   f"marked FAT file-aware (subtype 0x03) but its body at offset "
                                   f"{sec.body_start} does not start with a boot-sector record")
            elif subtype == SUBTYPE_SECTOR:
                head = self.record_at(pos)
                if head is not None:
                    raise GhoError(f"{self.name}: partition {sec.index + 1} (offset {sec.header_offset}) is "
                                   f"marked sector (subtype 0x02) but its body at offset {pos} starts with a "
                                   f"kind 0x{head.kind:02x} record, not a block chain")
                pos = self._scan_chain(sec, pos, limit)
                if sec.blocks == 0:
                    raise GhoError(f"{self.name}: partition {sec.index + 1} (offset {sec.header_offset}) is "
                                   f"marked sector (subtype 0x02) but has no data blocks at offset "
                                   f"{sec.body_start}")
            elif subtype == SUBTYPE_NTFS:
                from pipeline.gho.ntfs import scan_section  # local: the NTFS reader builds on this module

                pos = scan_section(self, sec, limit)
            elif subtype == SUBTYPE_EXT:
                sec.end = limit
                return layout  # cannot be walked; extract() refuses it with a clear message
            else:
                raise GhoError(f"{self.name}: partition {sec.index + 1}: unsupported partition subtype "
                               f"0x{subtype:02x} (byte 2 of the partition header at offset "
                               f"{sec.header_offset}; "
                               "expected 0x02-0x05)")
            sec.end = pos
        if not layout.sections:
            raise GhoError(f"{self.name}: no partition section found after offset {layout.first_structure}")
        if pos != limit:
            raise GhoError(f"{self.name}: unexpected bytes at offset {pos}: expected a record, a partition "
                           f"header or the trailer at offset {limit}")
        self.scan_catalogues(layout, first_cat, end_rec)
        fat = sum(1 for s in layout.sections if s.subtype == SUBTYPE_FAT)
        if layout.catalogues and len(layout.catalogues) != fat:
            raise GhoError(f"{self.name}: trailer has {len(layout.catalogues)} catalogues for {fat} FAT "
                           f"partition sections (one per FAT partition expected): a partition header or the "
                           "trailer is corrupt")
        return layout

    def _track0_table(self, layout: Layout) -> list[int] | None:
        """Byte sizes of the primary partitions the MBR in track 0 lists, in disk order (§8.6), where
        the walk needs them: unframed uncompressed data stores no length (§8.4). None when there is no
        track 0, the image is not uncompressed or its (encrypted) MBR cannot be read yet."""
        if self.header.compression != 0 or not layout.track0:
            return None
        if self.header.password and self.seed is None:
            return None
        rec = layout.track0[0]
        mbr = self.stream.read_upto(rec.body_offset + 2, min(SECTOR, rec.length - 2))
        if self.seed is not None:
            mbr = decrypt(mbr, self.seed)  # a prefix of the record's cipher unit
        prim = primary_partitions(mbr)
        return None if prim is None else [e.sectors * SECTOR for e in prim]

    def _scan_chain(self, sec: Section, pos: int, limit: int) -> int:
        if self.header.compression == 0 and self._looks_raw(pos, limit):
            sec.raw = True
            return self._scan_raw(sec, pos, limit)
        for off, ln in self.iter_blocks(pos, limit):
            if sec.first_block is None:
                sec.first_block = (off, ln)
            sec.last_block = (off, ln)
            sec.blocks += 1
        pos = self.stop
        rec = self.record_at(pos) if pos < limit else None
        if rec is not None and rec.kind == K_END_RUN:
            pos = rec.end
        return pos

    def _looks_raw(self, pos: int, limit: int) -> bool:
        """§8.4 probe: framed if the u16 at the data start is 32770 and another prefix follows."""
        buf = self.stream.read_upto(pos, 2)
        if len(buf) == 2 and buf[0] | (buf[1] << 8) == 32770:
            nxt = self.stream.read_upto(pos + 32770, 8)
            if len(nxt) >= 8 and nxt[4:8] == RECORD_MAGIC_BYTES:
                return False
            if len(nxt) >= 2 and 3 <= nxt[0] | (nxt[1] << 8) <= 32770:
                return False
            if pos + 32770 >= limit:
                return False
        if len(buf) == 2 and pos + 2 + (buf[0] | (buf[1] << 8)) - 2 <= limit:
            stored = buf[0] | (buf[1] << 8)
            rec = self.record_at(pos + stored)
            if 3 <= stored < 32770 and (rec is not None or pos + stored == limit):
                return False  # a single short framed block
        return True

    def _scan_raw(self, sec: Section, pos: int, limit: int) -> int:
        """Raw uncompressed sector data: runs to the closing kind 0x03 record or the trailer."""
        # the data length is not stored: look for the end-of-run record before the limit
        table = self.table[sec.index] if self.table and sec.index < len(self.table) else None
        length = raw_section_length(self, pos, limit, table, f"partition {sec.index + 1}")
        sec.first_block = (pos, min(length, 32768))
        sec.last_block = (pos, length)
        sec.blocks = 1
        pos += length
        rec = self.record_at(pos) if pos < limit else None
        if rec is not None and rec.kind == K_END_RUN:
            pos = rec.end
        return pos


def raw_section_length(walker: Walker, pos: int, limit: int, table: int | None = None,
                       what: str = "partition") -> int:
    """Length of unframed uncompressed sector data starting at ``pos`` (§8.4).

    The length is not stored: it is taken from the partition table entry (``table``, bytes) or the
    boot sector where the data ends there (§8.3: a kind 0x03 record and the next partition header or
    the trailer); otherwise it is the first sector boundary where such an end is found. Never the end
    of a later partition: that would swallow every partition in between."""
    boot = walker.stream.read_upto(pos, SECTOR)
    if walker.seed is not None:
        boot = decrypt(boot, walker.seed)  # a prefix of the first cipher unit
    cands: list[int] = [table] if table else []
    if not (walker.header.password and walker.seed is None):
        _fs, size, _label = detect_fs(boot)
        if size:
            cands += [size, size - SECTOR]
    for n in cands:
        if n > 0 and raw_data_ends_at(walker, pos + n, limit):
            return n
    found = _first_raw_end(walker, pos, limit)
    if found is None:
        raise GhoError(f"{walker.name}: {what}: cannot tell where the uncompressed sector data starting at "
                       f"offset {pos} ends: no end-of-run record (kind 0x03) followed by a partition header "
                       f"or the trailer (offset {limit}) at a sector boundary, and no partition table entry "
                       "or boot sector gives its size")
    return found


def raw_data_ends_at(walker: Walker, end: int, limit: int) -> bool:
    """True if unframed sector data may end at ``end``: the trailer, a partition header, or an end-of-run
    record followed by one of them (§8)."""
    if end > limit:
        return False
    if end == limit or walker.part_header_at(end) is not None:
        return True
    rec = walker.record_at(end)
    if rec is None or rec.kind != K_END_RUN or rec.length != 20 or rec.end > limit:
        return False
    return rec.end == limit or walker.part_header_at(rec.end) is not None


def _first_raw_end(walker: Walker, pos: int, limit: int) -> int | None:
    """Bytes from ``pos`` to the first sector boundary where unframed data may end (one bounded read at a
    time; the structures looked for start with the record magic at +4 or the header magic ``FE EF``)."""
    at = pos + SECTOR
    while at <= limit:
        n = min(_SCAN_CHUNK, limit - at + 1)
        chunk = walker.stream.read_upto(at, n + 8)
        for k in range(0, n, SECTOR):
            hit = chunk[k + 4:k + 8] == RECORD_MAGIC_BYTES or chunk[k:k + 2] == b"\xfe\xef" or at + k == limit
            if hit and raw_data_ends_at(walker, at + k, limit):
                return at + k - pos
        at += (n + SECTOR - 1) // SECTOR * SECTOR
    return None
