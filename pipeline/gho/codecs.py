"""Block codecs (docs/gho-format.md §7): none, Fast (Ghost's LZ77 variant) and High (zlib).

Fast-LZ path: the C extension (:mod:`pipeline.gho.native`, the same algorithm, built at install time,
~40x faster) when it is installed; otherwise pure Python, table-driven. Per
control word the 16 token bits are looked up as a precomputed tuple of literal-run lengths, so
literal runs are copied with one slice; hash registrations of literal positions are batched right
before the next match's lookup (the only place the table is read, so the result is identical to
registering them one by one); the three-byte hash is one index into a 65536-entry table keyed by
``x<<8 ^ y<<4 ^ z``. Blocks whose payload was seen recently (zero-filled or repeated space is common
in disk images) are served from a small cache keyed by the payload itself.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict

from pipeline.gho.header import COMP_FAST, COMP_NONE
from pipeline.gho.native import fast_decoder

BLOCK_SIZE = 32768
HARD_LIMIT = 65536
STORED_ESCAPE = b"\x01\x00\x00\x00"
_DIGITS = b"123456789012345678"
_MUL = 0xFFFF9E5F


class CodecError(ValueError):
    """A block does not decode; the caller adds file name and offset (see :meth:`at`)."""

    def __init__(self, what: str, reason: str) -> None:
        self.what = what
        self.reason = reason
        super().__init__(f"{what}: {reason}")

    def at(self, name: str, offset: int, context: str = "") -> str:
        ctx = f" ({context})" if context else ""
        return f"{name}: {self.what} at offset {offset}{ctx}: {self.reason}"


def fast_hash(x: int, y: int, z: int) -> int:
    v = z ^ ((y ^ (x << 4)) << 4)
    return (((v * _MUL) & 0xFFFFFFFF) >> 4) & 0xFFF


_HV = [(((v * _MUL) & 0xFFFFFFFF) >> 4) & 0xFFF for v in range(1 << 16)]


def _segments(w: int) -> tuple[int, ...]:
    """Literal-run lengths of control word ``w``: r0, match, r1, match, …, r_last (16 tokens)."""
    runs = []
    run = 0
    for bit in range(16):
        if (w >> bit) & 1:
            runs.append(run)
            run = 0
        else:
            run += 1
    runs.append(run)
    return tuple(runs)


_SEGS: list[tuple[int, ...]] = [_segments(w) for w in range(1 << 16)]


def fast_decode(payload: bytes, limit: int = HARD_LIMIT) -> bytes:
    """Decode one Fast-compressed block payload (4-byte prefix + token stream)."""
    if len(payload) < 4:
        raise CodecError("corrupt Fast block", f"{len(payload)} bytes, shorter than its 4-byte prefix")
    if payload[0] == 1:
        if len(payload) - 4 > limit:
            raise CodecError("oversized block", f"stored block of {len(payload) - 4} bytes exceeds {limit}")
        return bytes(payload[4:])
    s = payload
    n = len(s)
    i = 4
    out = bytearray()
    table = [-1] * 4096
    hv = _HV
    segs_of = _SEGS
    digits = _DIGITS
    run_start = 0
    while n - i >= 2:
        segs = segs_of[s[i] | (s[i + 1] << 8)]
        i += 2
        last = len(segs) - 1
        for idx, k in enumerate(segs):
            if k:
                out += s[i:i + k]
                i += k
            if idx == last:
                break
            if n - i < 2:
                i = n
                break
            b0 = s[i]
            slot = ((b0 & 0xF0) << 4) | s[i + 1]
            ln = 3 + (b0 & 0x0F)
            i += 2
            start = len(out)
            p = run_start
            end = start - 2
            while p < end:
                table[hv[(out[p] << 8) ^ (out[p + 1] << 4) ^ out[p + 2]]] = p
                p += 1
            src = table[slot]
            if src < 0:
                out += digits[:ln]
            elif start - src >= ln:
                out += out[src:src + ln]
            else:
                d = start - src
                out += (out[src:start] * (ln // d + 1))[:ln]
            while p < start:
                table[hv[(out[p] << 8) ^ (out[p + 1] << 4) ^ out[p + 2]]] = p
                p += 1
            table[slot] = start
            run_start = start + ln
        if len(out) > limit:
            raise CodecError("corrupt Fast block", f"decodes to more than {limit} bytes")
    return bytes(out)


class BlockDecoder:
    """Decodes block payloads of one image's compression; errors become :class:`CodecError`."""

    def __init__(self, compression: int, cache_blocks: int = 64, native: bool = True) -> None:
        self.compression = compression
        self._native = fast_decoder() if native and compression == COMP_FAST else None
        #: True when Fast blocks go through the C extension, False for the pure-Python decoder
        self.uses_native = self._native is not None
        #: True when decode() may run on several threads at once and gains from it (zlib and the C
        #: extension release the GIL); the pure-Python Fast decoder holds it and shares its cache
        self.parallel = compression != COMP_FAST or self.uses_native
        self._cache: OrderedDict[bytes, bytes] = OrderedDict()
        self._cache_blocks = cache_blocks

    def decode(self, payload: bytes, limit: int = HARD_LIMIT) -> bytes:
        comp = self.compression
        if comp == COMP_NONE:
            if len(payload) > limit:
                raise CodecError("oversized block", f"{len(payload)} bytes exceed {limit}")
            return payload
        if payload[:4] == STORED_ESCAPE:
            if len(payload) - 4 > limit:
                raise CodecError("oversized block",
                                 f"stored block of {len(payload) - 4} bytes exceeds {limit}")
            return payload[4:]
        if comp == COMP_FAST:
            if self._native is not None and len(payload) >= 4 and payload[0] != 1:
                out = self._native(payload, limit)
                if out is None:
                    raise CodecError("corrupt Fast block", f"decodes to more than {limit} bytes")
                return out
            if len(payload) <= 4096:
                hit = self._cache.get(payload)
                if hit is not None:
                    self._cache.move_to_end(payload)
                    return hit
                out = fast_decode(payload, limit)
                self._cache[payload] = out
                if len(self._cache) > self._cache_blocks:
                    self._cache.popitem(last=False)
                return out
            return fast_decode(payload, limit)
        return zlib_decode(payload, limit)


def zlib_decode(payload: bytes, limit: int = HARD_LIMIT) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(payload, limit + 1)
    except zlib.error as e:
        raise CodecError("corrupt zlib block", str(e)) from None
    if len(out) > limit:
        raise CodecError("corrupt zlib block", f"decodes to more than {limit} bytes")
    if not d.eof:
        raise CodecError("corrupt zlib block", "stream ends before its final block")
    if d.unused_data:
        raise CodecError("corrupt zlib block", f"{len(d.unused_data)} bytes after the end of the stream")
    return out
