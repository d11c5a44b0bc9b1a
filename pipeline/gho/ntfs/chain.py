"""NTFS section layout and the block chain as one byte stream (docs/gho-format.md §11.2, §11.3, §11.4).

The chain is read strictly forward: at most one decoded block plus the bytes asked for are held.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.gho.codecs import HARD_LIMIT, STORED_ESCAPE, BlockDecoder, CodecError
from pipeline.gho.crypto import decrypt
from pipeline.gho.errors import GhoError
from pipeline.gho.header import COMP_NONE
from pipeline.gho.ntfs.mft import Geometry, NtfsFormatError, is_boot_sector, parse_boot
from pipeline.gho.pool import ordered_map
from pipeline.gho.records import K_CATALOGUE, K_END_IMAGE, K_END_RUN, Section, Walker

ID_LEN, LEN_LEN, CHK_LEN = 16, 10, 10
REC_IDS = (0x8004, 0x8008, 0x8010)
ID_DATA, ID_SKIPPED, ID_RUN = 0x8020, 0x8040, 0x0002
CHAIN_SCAN_LIMIT = 16 << 20
UNIT = 32768  # cipher unit of unframed data and the size of stored data pieces
_SCAN = 1 << 20
FRAME_READ = 1 << 20  # stream bytes read at once while the chain's blocks are framed (one pread per MiB)


def parse_id(buf: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(id, value) of a 16-byte ID packet, or None."""
    if len(buf) < ID_LEN or buf[0] != 0x0E or buf[15] != 0x0F or bytes(buf[3:7]) != b"\0\0\0\0":
        return None
    return buf[1] | (buf[2] << 8), int.from_bytes(buf[7:15], "little")


def parse_len(buf: bytes | bytearray | memoryview) -> int | None:
    if len(buf) < LEN_LEN or buf[0] != 0x0F or buf[9] != 0x0E or bytes(buf[5:9]) != b"\0\0\0\0":
        return None
    return int.from_bytes(buf[1:5], "little")


def is_chk(buf: bytes | bytearray | memoryview) -> bool:
    return len(buf) >= CHK_LEN and buf[0] == 0x0A and buf[9] == 0x0B


@dataclass
class NtfsLayout:
    """Where an NTFS section's parts are, found by :func:`locate` (§11.2)."""

    boot: bytes  # the metadata-area copy
    geometry: Geometry
    chain_start: int
    framed: bool
    #: cipher rule of §11.3: None (clear), "a" (one unit per block payload), "b" (32 KiB units from C)
    cipher: str | None
    end: int  # stream offset right after the chain
    locked: bool = False  # encrypted and no password given: contents unknown


class Chain:
    """The decoded packet stream of one section; ``pos`` counts decoded bytes from the chain start."""

    def __init__(self, walker: Walker, lay: NtfsLayout, decoder: BlockDecoder, seed: int | None,
                 where: str) -> None:
        self.walker = walker
        self.stream = walker.stream
        self.lay = lay
        self.decoder = decoder
        self.seed = seed
        self.where = where  # "IMAGE: partition N" for messages
        self.pos = 0
        self._next = lay.chain_start  # stream offset of the next block / raw byte
        self._buf = bytearray()
        self._block = lay.chain_start  # stream offset of the block the buffer's first byte came from
        self._unit: tuple[int, bytes] | None = None
        self._blocks: Iterator[tuple[int, bytes | CodecError | None, int]] | None = None

    def close(self) -> None:
        """Stop the decode workers of a framed chain (:meth:`_fill` starts them)."""
        if self._blocks is not None:
            self._blocks.close()  # type: ignore[attr-defined]
            self._blocks = None

    # -- positions for messages ----------------------------------------------------------------
    def offset(self) -> int:
        """Stream offset of the next byte (raw chains) or of the block holding it (framed chains)."""
        return self._next if not self.lay.framed else self._block

    def fail(self, rule: str, at: int | None = None) -> GhoError:
        off = self.offset() if at is None else at
        return GhoError(f"{self.where} (NTFS), offset {off} (packet stream byte {self.pos}): {rule}")

    # -- block decoding ------------------------------------------------------------------------
    def _read(self, off: int, n: int) -> bytes:
        """Exactly ``n`` stream bytes; a short read is a truncated chain (missing span named)."""
        data = self.stream.read_upto(off, n)
        if len(data) != n:
            e = self.stream.truncated(off + len(data), "the NTFS packet stream")
            raise self.fail(f"truncated chain: {str(e).split(': ', 1)[-1]}", off)
        return data

    def _short(self, what: str, n: int) -> GhoError:
        if self.lay.end >= self.stream.size:  # the stream itself ends: name a missing span
            e = self.stream.truncated(self.stream.size, what)
            return self.fail(f"truncated chain: {str(e).split(': ', 1)[-1]}")
        return self.fail(f"chain ends inside {what} ({n} bytes expected, truncated chain)")

    def _decode_block(self, off: int) -> tuple[bytes, int]:
        """(decoded bytes, stream offset after the block) of the framed block at ``off``."""
        head = self._read(off, 2)
        stored = head[0] | (head[1] << 8)
        if stored < 4:
            raise self.fail(f"block length {stored}, expected at least 4 (truncated chain)", off)
        payload = self._read(off + 2, stored - 2)
        return decode_payload(payload, self.decoder, self.seed if self.lay.cipher == "a" else None,
                              self, off), off + stored

    def _frames(self) -> Iterator[tuple[int, bytes | None, int]]:
        """(offset, payload, offset after) of every framed block from ``_next`` on, read in order; a block
        that cannot be read ends it with payload None (its error is raised in turn, by _decode_block)."""
        off, end = self._next, self.lay.end
        buf, base = b"", off  # stream bytes [base, base + len(buf)): read FRAME_READ at a time
        while off < end:
            rel = off - base
            if len(buf) - rel < 2:
                buf, base, rel = self.stream.read_upto(off, FRAME_READ), off, 0
            stored = buf[rel] | (buf[rel + 1] << 8) if len(buf) - rel >= 2 else 0
            if stored >= 4 and len(buf) - rel < stored:
                buf, base, rel = self.stream.read_upto(off, max(FRAME_READ, stored)), off, 0
            if stored < 4 or len(buf) - rel < stored:
                yield off, None, off
                return
            yield off, buf[rel + 2:rel + stored], off + stored
            off += stored

    def _job(self, frame: tuple[int, bytes | None, int]) -> tuple[int, bytes | CodecError | None, int]:
        """Decode one block (a worker job, pipeline.gho.pool); a codec error is returned for its turn."""
        off, payload, nxt = frame
        if payload is None:
            return frame
        try:
            return off, decode_payload(payload, self.decoder, self.seed if self.lay.cipher == "a" else None,
                                       None, off), nxt
        except CodecError as e:
            return off, e, nxt

    def _next_block(self) -> tuple[bytes, int]:
        """(decoded bytes, stream offset after) of the block at ``_next``: what :meth:`_decode_block` gives,
        decoded ahead on ``walker.threads`` workers."""
        if self._blocks is None:
            self._blocks = ordered_map(self._job, self._frames(), self.walker.decode_threads(self.decoder))
        off, data, nxt = next(self._blocks)
        assert off == self._next
        if isinstance(data, CodecError):
            raise self.fail(f"{data.what}: {data.reason}", off)
        if data is None:
            self.close()
            return self._decode_block(off)  # raises this block's error, as the one-thread path does
        return data, nxt

    def _raw(self, off: int, n: int) -> bytes:
        data = self._read(off, n)
        if self.lay.cipher != "b" or self.seed is None:
            return data
        out = bytearray()
        c = self.lay.chain_start
        while data:
            u = (off - c) // UNIT
            ustart = c + u * UNIT
            if self._unit is None or self._unit[0] != ustart:
                enc = self.stream.read_upto(ustart, UNIT)
                self._unit = (ustart, decrypt(enc, self.seed))
            plain = self._unit[1]
            rel = off - ustart
            take = min(len(data), len(plain) - rel)
            if take <= 0:
                raise self.stream.truncated(off, "the NTFS packet stream")
            out += plain[rel:rel + take]
            data = data[take:]
            off += take
        return bytes(out)

    def _fill(self, n: int) -> bool:
        while len(self._buf) < n:
            if self._next >= self.lay.end:
                return False
            if not self._buf:
                self._block = self._next
            data, self._next = self._next_block()
            self._buf += data
        return True

    # -- the stream interface ------------------------------------------------------------------
    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes without consuming them (fewer only at the end of the chain)."""
        if not self.lay.framed:
            n = min(n, self.lay.end - self._next)
            return self._raw(self._next, n) if n > 0 else b""
        self._fill(n)
        return bytes(self._buf[:n])

    def read(self, n: int, what: str) -> bytes:
        if not self.lay.framed:
            if self._next + n > self.lay.end:
                raise self._short(what, n)
            data = self._raw(self._next, n)
            self._next += n
            self.pos += n
            return data
        if not self._fill(n):
            raise self.fail(f"chain ends inside {what} ({n} bytes expected, {len(self._buf)} left; "
                            "truncated chain)")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        if not self._buf:
            self._block = self._next
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if not self.lay.framed:
            if self._next + n > self.lay.end:
                raise self._short(what, n)
            self._next += n
            self.pos += n
            return
        while n > 0:
            if not self._buf and not self._fill(1):
                raise self.fail(f"chain ends inside {what} (truncated chain)")
            take = min(n, len(self._buf))
            del self._buf[:take]
            if not self._buf:
                self._block = self._next
            n -= take
            self.pos += take


def decode_payload(payload: bytes, decoder: BlockDecoder, seed: int | None, ctx: Chain | None,
                   off: int) -> bytes:
    """§11.3: cipher (rule a), then the stored escape for every compression, else the codec."""
    if seed is not None:
        payload = decrypt(payload, seed)
    if len(payload) > 4 and payload[:4] == STORED_ESCAPE:
        return payload[4:]
    try:
        return decoder.decode(payload, HARD_LIMIT)
    except CodecError as e:
        if ctx is not None:
            raise ctx.fail(f"{e.what}: {e.reason}", off) from None
        raise


# -- locating the parts (§11.2) --------------------------------------------------------------------
def _chain_end(walker: Walker, pos: int, limit: int, where: str | None = None) -> int | None:
    """End of a framed chain from ``pos`` (§11.3 stop rules), or None when it is not a chain.

    With ``where``, a block that runs past the end of the stream is a truncated chain (an error).
    """
    stream = walker.stream
    n = 0
    while True:
        if limit - pos < 2:
            return pos if pos == limit else None
        head = stream.read_upto(pos, 10)
        if walker.part_header_at(pos) is not None:
            return pos if n else None
        if len(head) >= 10 and head[4:8] == b"\xd8\x18\x2f\x01" and head[0] in (K_END_RUN, K_CATALOGUE,
                                                                                  K_END_IMAGE):
            return pos if n else None
        stored = head[0] | (head[1] << 8)
        if where is not None and stored >= 4 and pos + stored > limit >= stream.size:
            raise GhoError(f"{where}: truncated chain: the block at offset {pos} ({stored} bytes) runs past "
                           f"the end of the stream at offset {stream.size}")
        if stored < 4 or pos + stored > limit:
            return pos if n else None
        pos += stored
        n += 1


def _first_block_ok(walker: Walker, c: int, decoder: BlockDecoder, seed: int | None) -> str | None | bool:
    """False, or the cipher rule under which the block at ``c`` decodes to one record-level ID packet."""
    head = walker.stream.read_upto(c, 2)
    if len(head) < 2:
        return False
    stored = head[0] | (head[1] << 8)
    if stored < 4 or stored > 65538:
        return False
    payload = walker.stream.read_upto(c + 2, stored - 2)
    if len(payload) != stored - 2:
        return False
    for rule, s in ((None, None), ("a", seed)):
        if rule == "a" and s is None:
            break
        try:
            data = decode_payload(payload, decoder, s, None, c)
        except CodecError:
            continue
        pid = parse_id(data) if len(data) == ID_LEN else None
        if pid is not None and pid[0] & 0x8000:
            return rule
    return False


def _raw_start_ok(walker: Walker, c: int, seed: int | None) -> str | None | bool:
    buf = walker.stream.read_upto(c, ID_LEN + LEN_LEN)
    for rule, s in ((None, None), ("b", seed)):
        if rule == "b":
            if s is None:
                break
            buf = decrypt(buf, s)
        pid = parse_id(buf)
        if pid is not None and pid[0] & 0x8000 and parse_len(buf[ID_LEN:]) is not None:
            return rule
    return False


def locate(walker: Walker, sec: Section, limit: int, decoder: BlockDecoder, seed: int | None,
           locked: bool) -> NtfsLayout:
    """Boot-sector copy, chain start, framing, cipher rule and chain end of one NTFS section."""
    where = f"{walker.name}: partition {sec.index + 1} (NTFS, header at offset {sec.header_offset})"
    area = sec.body_start
    # the scan for the chain start never crosses the next partition header (nor the trailer, ``limit``):
    # a damaged checksum packet must not make one section swallow the next
    scan_end = min(limit, area + CHAIN_SCAN_LIMIT)
    pos = area
    comp0 = decoder.compression == COMP_NONE
    while pos < scan_end:
        window = min(scan_end, pos + _SCAN + 16)
        hdr = _next_header(walker, pos, window)  # chunk by chunk: nothing past a header is looked at
        if hdr < window:
            scan_end = hdr
        chunk = walker.stream.read_upto(pos, _SCAN + 16)
        j = chunk.find(b"\x0a")
        while j != -1 and j < _SCAN and pos + j < scan_end:
            if j + 9 < len(chunk) and chunk[j + 9] == 0x0B:
                c = pos + j + 10
                rule: str | None | bool = _first_block_ok(walker, c, decoder, seed)
                framed = rule is not False
                enciphered = False
                if comp0 and (framed and walker.stream.read_upto(c, 2) != b"\x12\x00"):
                    rule, framed = False, False
                if rule is False and comp0:
                    rule = _raw_start_ok(walker, c, seed)
                if rule is False and locked and not comp0:
                    rule = None if _chain_end(walker, c, limit) is not None else False
                    framed, enciphered = True, True
                if rule is not False:
                    assert rule is None or isinstance(rule, str)
                    return _finish(walker, where, area, c, framed, rule, limit, enciphered)
            j = chunk.find(b"\x0a", j + 1)
        pos += _SCAN
    hint = " (the image is password-protected: give the password)" if locked else ""
    raise GhoError(f"{where}: NTFS section, layout not understood: no block chain start (a checksum packet "
                   f"followed by an ID packet) within {scan_end - area} bytes of offset {area}{hint}")


def _next_header(walker: Walker, start: int, end: int) -> int:
    """The offset of the first partition header in [start, end), else ``end`` (1 MiB at a time)."""
    pos = start
    while pos < end:
        chunk = walker.stream.read_upto(pos, _SCAN + 8)
        j = chunk.find(b"\xfe\xef")
        while j != -1 and j < _SCAN and pos + j < end:
            if walker.part_header_at(pos + j) is not None:
                return pos + j
            j = chunk.find(b"\xfe\xef", j + 1)
        if len(chunk) <= _SCAN:
            break
        pos += _SCAN
    return end


def _finish(walker: Walker, where: str, area: int, c: int, framed: bool, rule: str | None, limit: int,
            locked: bool) -> NtfsLayout:
    meta = walker.stream.read(area, c - area, "the NTFS metadata area")
    boots = []
    k = meta.find(b"NTFS    ", 3)
    while k != -1 and k - 3 + 512 <= len(meta):
        if is_boot_sector(meta, k - 3):
            boots.append(meta[k - 3:k - 3 + 512])
        k = meta.find(b"NTFS    ", k + 1)
    if not boots:
        raise GhoError(f"{where}: NTFS section, layout not understood: no NTFS boot sector in the metadata "
                       f"area (offsets {area}-{c})")
    if any(b != boots[0] for b in boots):
        raise GhoError(f"{where}: the metadata area holds {len(boots)} different NTFS boot sectors")
    try:
        geo = parse_boot(boots[0])
    except NtfsFormatError as e:
        raise GhoError(f"{where}: boot sector in the metadata area: {e}") from None
    end = limit
    if framed:
        stop = _chain_end(walker, c, limit, where)
        if stop is None:
            raise GhoError(f"{where}: NTFS section, layout not understood: no block chain at offset {c}")
        end = stop
    return NtfsLayout(boots[0], geo, c, framed, rule, end, locked)

