"""Hive transaction logs (``.LOG``, ``.LOG1``, ``.LOG2``): read them and replay them into a copy of the hive.

Pure Python, from Maxim Suhanov's "Windows registry file format specification"
(github.com/msuhanov/regf, "Format of transaction log files", "Dirty state of a hive"):

* **old format** (XP .. 8): the log's first sector is a partial copy of the base block (file type
  1 or 2; valid when its sequence numbers are equal and its checksum right), a ``DIRT`` dirty vector
  at 512 (one bit per 512-byte page of the hive bins data, ``bins size / 512`` bits), then the dirty
  pages from the next sector on, one 512-byte page per set bit, written to ``4096 + 512 * bit``. A
  log applies when its last written timestamp equals the hive's; the dirty hive bins are checked
  and a bad one stops the recovery (nothing of that log is applied here).
* **new format** (8.1 / 2012 R2 and later, file type 6): log entries from 512 on, each at a
  multiple of 512: ``HvLE``, size, flags, sequence number, hive bins data size, dirty page count,
  Hash-1 (Marvin32 of the bytes from 40 to the entry's end), Hash-2 (Marvin32 of its first 32
  bytes), seed ``82 EF 4D 88 7A 4E 55 C5``; then ``(offset, size)`` page references and the pages.
  Only entries from the hive's *secondary* sequence number on are applied, each next one numbered
  +1, first ``.LOG1`` then ``.LOG2``; a bad entry (signature, size, hashes, a bins size not a
  multiple of 4096) ends what its log offers. Applying an entry grows the hive to the entry's bins
  size and writes the entry's sequence number into both sequence numbers.
* a hive is dirty when its sequence numbers differ or its checksum is wrong; a clean hive's logs are
  ignored by Windows even when they hold entries.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.registry import regf
from pipeline.registry.regf import BASE, BaseBlock, HiveDamage

SECTOR = 512
#: Hash-1/Hash-2 seed, bytes 82 EF 4D 88 7A 4E 55 C5 read little-endian
MARVIN_SEED = 0xC5554E7A884DEF82
_M32 = 0xFFFFFFFF


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _M32


def marvin32(data: bytes | memoryview, seed: int = MARVIN_SEED) -> int:
    """Microsoft's Marvin32 checksum (64-bit result, low word first as stored in a log entry)."""
    lo, hi = seed & _M32, seed >> 32

    def block(lo: int, hi: int) -> tuple[int, int]:
        hi ^= lo
        lo = _rotl(lo, 20)
        lo = (lo + hi) & _M32
        hi = _rotl(hi, 9)
        hi ^= lo
        lo = _rotl(lo, 27)
        lo = (lo + hi) & _M32
        hi = _rotl(hi, 19)
        return lo, hi

    b = bytes(data)
    n4 = len(b) // 4 * 4
    for (word,) in struct.iter_unpack("<I", b[:n4]):
        lo, hi = block((lo + word) & _M32, hi)
    tail = b[n4:]
    final = 0x80
    for byte in reversed(tail):
        final = (final << 8) | byte
    lo, hi = block((lo + final) & _M32, hi)
    lo, hi = block(lo, hi)
    return (hi << 32) | lo


@dataclass(frozen=True)
class LogEntry:
    """One new-format entry: ``pages`` are ``(offset in the hive bins data, bytes)``."""

    seq: int
    flags: int
    bins_size: int
    pages: tuple[tuple[int, bytes], ...]
    at: int  # offset in the log file


@dataclass(frozen=True)
class LogFile:
    """What one log file holds. ``kind``: ``empty``, ``old``, ``new`` or ``invalid``; ``stop`` says
    why reading ended before the file did (a bad or truncated entry), None when it did not."""

    name: str
    size: int
    kind: str
    base: BaseBlock | None = None
    entries: tuple[LogEntry, ...] = ()
    old_pages: tuple[tuple[int, bytes], ...] = ()  # old format: (offset in the bins data, 512 bytes)
    stop: str | None = None
    head: bytes = b""  # the log's first sector (its copy of the base block)

    @property
    def seqs(self) -> list[int]:
        if self.kind == "new":
            return [e.seq for e in self.entries]
        if self.kind == "old" and self.base is not None:
            return [self.base.secondary_seq]
        return []


def read_log(name: str, data: bytes) -> LogFile:
    """Parse a log file (never raises: a log that is not one is ``invalid`` with the reason)."""
    if len(data) == 0 or not data[:SECTOR].strip(b"\0"):
        return LogFile(name, len(data), "empty")
    try:
        base = BaseBlock.parse(data)
    except HiveDamage as e:
        return LogFile(name, len(data), "invalid", stop=str(e))
    if base.signature != b"regf":
        return LogFile(name, len(data), "invalid", base, stop="no regf signature")
    if base.file_type == 6:
        entries, stop = _new_entries(data)
        return LogFile(name, len(data), "new", base, tuple(entries), stop=stop, head=data[:SECTOR])
    if base.file_type in (1, 2):
        pages, stop = _old_pages(data, base)
        return LogFile(name, len(data), "old", base, old_pages=tuple(pages), stop=stop, head=data[:SECTOR])
    return LogFile(name, len(data), "invalid", base, stop=f"file type {base.file_type} is not a log")


def _new_entries(data: bytes) -> tuple[list[LogEntry], str | None]:
    out: list[LogEntry] = []
    pos = SECTOR
    while pos + 40 <= len(data):
        head = data[pos:pos + 40]
        if head[:4] != b"HvLE":
            if not head.strip(b"\0"):
                return out, None  # zero fill after the last entry
            return out, f"no log entry signature at 0x{pos:x}"
        size, flags, seq, bins_size, count, h1, h2 = struct.unpack_from("<IIIIIQQ", head, 4)
        if size < 40 or size % SECTOR:
            return out, f"log entry at 0x{pos:x} has size 0x{size:x}"
        if pos + size > len(data):
            return out, (f"log entry at 0x{pos:x} (seq {seq}) truncated: 0x{size:x} bytes, "
                         f"0x{len(data) - pos:x} left")
        if bins_size % BASE or bins_size == 0:
            return out, f"log entry at 0x{pos:x} (seq {seq}) has hive bins size 0x{bins_size:x}"
        body = data[pos + 40:pos + size]
        if marvin32(body) != h1 or marvin32(data[pos:pos + 32]) != h2:
            return out, f"log entry at 0x{pos:x} (seq {seq}) has a wrong hash"
        refs = ([struct.unpack_from("<II", body, 8 * i) for i in range(count)]
                if 8 * count <= len(body) else None)
        if refs is None:
            return out, f"log entry at 0x{pos:x} (seq {seq}) has {count} page references, too many"
        at = 8 * count
        pages = []
        for off, psize in refs:
            if at + psize > len(body) or off + psize > bins_size:
                return out, f"log entry at 0x{pos:x} (seq {seq}) has a page outside the entry or the hive"
            pages.append((off, body[at:at + psize]))
            at += psize
        out.append(LogEntry(seq, flags, bins_size, tuple(pages), pos))
        pos += size
    return out, None


def _old_pages(data: bytes, base: BaseBlock) -> tuple[list[tuple[int, bytes]], str | None]:
    if base.primary_seq != base.secondary_seq or not base.checksum_ok:
        return [], (f"log base block not valid (sequence numbers {base.primary_seq}/{base.secondary_seq}, "
                    f"checksum {'ok' if base.checksum_ok else 'wrong'})")
    if data[SECTOR:SECTOR + 4] != b"DIRT":
        return [], "no DIRT dirty vector at 0x200"
    nbits = base.bins_size // SECTOR
    bitmap = data[SECTOR + 4:SECTOR + 4 + (nbits + 7) // 8]
    if len(bitmap) < (nbits + 7) // 8:
        return [], "dirty vector truncated"
    pos = -(-(SECTOR + 4 + len(bitmap)) // SECTOR) * SECTOR
    pages = []
    for bit in range(nbits):
        if bitmap[bit // 8] >> (bit % 8) & 1:
            page = data[pos:pos + SECTOR]
            if len(page) < SECTOR:
                return [], f"dirty page for 0x{bit * SECTOR:x} truncated at 0x{pos:x}"
            pages.append((bit * SECTOR, page))
            pos += SECTOR
    return pages, None


@dataclass(frozen=True)
class Replay:
    """The hive after replaying its logs; ``data`` has a fixed base block (sequence numbers equal,
    above every sequence number any log holds; checksum recomputed)."""

    data: bytes
    entries_replayed: int
    logs_used: tuple[str, ...]
    first_seq: int | None
    last_seq: int | None
    stopped: str | None  # why the replay ended before a log did
    notes: tuple[str, ...] = field(default=())


def replay(primary: bytes, logs: Sequence[LogFile]) -> Replay:
    """Replay ``logs`` (in the order ``.LOG``, ``.LOG1``, ``.LOG2``) into a copy of ``primary``.

    Raises :class:`HiveDamage` when the primary's base block is unreadable and no log can replace it.
    """
    data = bytearray(primary)
    base = BaseBlock.parse(data) if len(data) >= SECTOR else None
    notes: list[str] = []
    if base is None or base.signature != b"regf" or not base.checksum_ok:
        donor = next((lg for lg in logs if lg.base is not None and lg.base.checksum_ok
                      and lg.base.signature == b"regf"), None)
        if donor is None:
            raise HiveDamage("base block checksum is wrong and no log holds a valid copy")
        if len(data) < BASE:
            data.extend(b"\0" * (BASE - len(data)))
        data[:SECTOR] = donor.head
        notes.append(f"base block recovered from {donor.name}")
        base = BaseBlock.parse(data)
    replayed, used = 0, []
    first = last = None
    stopped = None
    new_logs = [lg for lg in logs if lg.kind == "new"]
    if new_logs:
        by_seq: dict[int, tuple[LogFile, LogEntry]] = {}
        for lg in new_logs:
            for e in lg.entries:
                by_seq.setdefault(e.seq, (lg, e))
        seq = base.secondary_seq
        while seq in by_seq:
            lg, e = by_seq[seq]
            _grow(data, e.bins_size)
            for off, page in e.pages:
                data[BASE + off:BASE + off + len(page)] = page
            struct.pack_into("<I", data, 40, e.bins_size)
            struct.pack_into("<I", data, 0x90, e.flags)
            replayed += 1
            first = seq if first is None else first
            last = seq
            if lg.name not in used:
                used.append(lg.name)
            seq += 1
        later = sorted(s for s in by_seq if s >= seq)
        bad = [f"{lg.name}: {lg.stop}" for lg in new_logs if lg.stop]
        if later:
            stopped = f"no entry with sequence number {seq} (next found: {later[0]})"
        elif bad:
            stopped = "; ".join(bad)
        elif replayed == 0:
            stopped = f"no entry with sequence number {base.secondary_seq} in the logs"
    else:
        for lg in logs:
            if lg.kind != "old":
                continue
            assert lg.base is not None
            if lg.stop:
                stopped = f"{lg.name}: {lg.stop}"
                continue
            if lg.base.timestamp != base.timestamp:
                notes.append(f"{lg.name}: last written timestamp differs from the hive's, not applicable")
                continue
            trial = bytearray(data)
            _grow(trial, lg.base.bins_size)
            for off, page in lg.old_pages:
                trial[BASE + off:BASE + off + SECTOR] = page
            struct.pack_into("<I", trial, 40, lg.base.bins_size)
            try:
                regf.scan_bins(regf.Hive(trial))
            except HiveDamage as e:
                stopped = f"{lg.name}: a dirty hive bin is invalid ({e})"
                continue
            data = trial
            replayed, used, first, last = 1, [lg.name], lg.base.secondary_seq, lg.base.secondary_seq
            break
    top = max([base.primary_seq, base.secondary_seq, *(s for lg in logs for s in lg.seqs)])
    bins = struct.unpack_from("<I", data, 40)[0]
    del data[BASE + bins:]
    regf.fix_base_block(data, top + 1)
    return Replay(bytes(data), replayed, tuple(used), first, last, stopped, tuple(notes))


def _grow(data: bytearray, bins_size: int) -> None:
    if len(data) < BASE + bins_size:
        data.extend(b"\0" * (BASE + bins_size - len(data)))
