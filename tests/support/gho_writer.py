"""Test-only Ghost image WRITER, written from docs/gho-format.md (not from the reader's code).

Makes sector-mode images (compression none / Fast / High, optional password, track 0, several
partitions), FAT file-aware images from an existing FAT volume, and spanned sets.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

MAGIC = b"\xfe\xef"
REC_MAGIC = 0x012F18D8
BLOCK = 32768
COMP = {"none": 0, "fast": 2, "high": 3, "high0a": 0x0A}


# -- cipher (§9) ---------------------------------------------------------------------------------
def crc32_msb_bytes(data: bytes) -> int:
    crc = 0
    for b in data:
        crc ^= b << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) & 0xFFFFFFFF if crc & 0x80000000 else (crc << 1) & 0xFFFFFFFF
    return crc


def password_seed(pw: str) -> int:
    crc = crc32_msb_bytes(pw.upper().encode()[:11])
    return (crc ^ (crc >> 16)) & 0xFFFF


def _ktab() -> list[int]:
    out = []
    for i in range(256):
        r = 0x07A2 ^ (i << 8)
        for _ in range(8):
            r = ((r << 1) ^ 0x1021) & 0xFFFF if r & 0x8000 else (r << 1) & 0xFFFF
        out.append(r)
    return out


_K = _ktab()


def encrypt(plain: bytes, seed: int) -> bytes:
    st = seed
    out = bytearray()
    for p in plain:
        c = p ^ (st & 0xFF)
        out.append(c)
        st = ((st & 0xFF) << 8) ^ _K[(st >> 8) ^ c]
    return bytes(out)


# -- Fast-LZ encoder (§7.4): a greedy encoder that keeps the decoder's table ----------------------
def _h(x: int, y: int, z: int) -> int:
    v = z ^ ((y ^ (x << 4)) << 4)
    return (((v * 0xFFFF9E5F) & 0xFFFFFFFF) >> 4) & 0xFFF


def fast_encode(data: bytes, store_if_larger: bool = True) -> bytes:
    table = [-1] * 4096
    tokens: list[tuple[bool, bytes]] = []
    pending: list[int] = []  # literal positions not yet registered
    q = 0
    n = len(data)
    while q < n:
        match_len = 0
        slot = -1
        if q + 3 <= n:
            slot = _h(data[q], data[q + 1], data[q + 2])
            src = table[slot]
            if src >= 0:
                while match_len < 18 and q + match_len < n and data[src + match_len] == data[q + match_len]:
                    match_len += 1
        if match_len >= 3:
            tokens.append((True, bytes([((slot >> 8) << 4) | (match_len - 3), slot & 0xFF])))
            for p in pending:
                table[_h(data[p], data[p + 1], data[p + 2])] = p
            pending = []
            table[slot] = q
            q += match_len
        else:
            tokens.append((False, data[q:q + 1]))
            pending.append(q)
            if len(pending) == 3:
                p = pending.pop(0)
                table[_h(data[p], data[p + 1], data[p + 2])] = p
            q += 1
    out = bytearray(b"\x00\x00\x00\x00")
    for k in range(0, len(tokens), 16):
        group = tokens[k:k + 16]
        word = sum(1 << b for b, (is_m, _) in enumerate(group) if is_m)
        out += struct.pack("<H", word)
        for _, tok in group:
            out += tok
    if store_if_larger and len(out) >= len(data) + 4:
        return b"\x01\x00\x00\x00" + data
    return bytes(out)


def encode_block(data: bytes, compression: str) -> bytes:
    if compression == "none":
        return data
    if compression == "fast":
        return fast_encode(data)
    return zlib.compress(data, 6)


# -- headers and records ---------------------------------------------------------------------------
def file_header(compression: str, image_id: int, *, password: str | None = None, image_type: int = 1,
                kind: int = 1) -> bytes:
    h = bytearray(512)
    h[0:2] = MAGIC
    h[2] = kind
    h[3] = COMP[compression]
    struct.pack_into("<I", h, 4, image_id)
    h[8] = h[9] = 1
    h[0x0A] = image_type
    if password is not None:
        seed = password_seed(password)
        h[0x0B] = 1
        h[0x0C:0x1B] = encrypt(b"BinaryResearch\x00", seed)
        h[0x1B:0x25] = encrypt(password.upper().encode()[:10].ljust(10, b"\0"), seed)
    return bytes(h)


def with_subtype(header: bytes, subtype: int) -> bytes:
    return header[:2] + bytes([subtype]) + header[3:]


def record(kind: int, body: bytes, flags: int = 0, length: int | None = None) -> bytes:
    return struct.pack("<BBHIH", kind, flags, 0, REC_MAGIC, len(body) if length is None else length) + body


def end_of_run(checksum: int = 0) -> bytes:
    return record(0x03, struct.pack("<II", checksum, checksum) + bytes(12))


class ImageWriter:
    """Streams an image to ``path``; blocks with identical content are encoded once."""

    def __init__(self, path: Path, compression: str, *, image_id: int = 0x5EC70001,
                 password: str | None = None, image_type: int = 1, descriptor: int = 0x800) -> None:
        self.f = open(path, "wb")  # noqa: SIM115
        self.compression = compression
        self.password = password
        self.seed = password_seed(password) if password is not None else None
        self.header = file_header(compression, image_id, password=password, image_type=image_type)
        self.descriptor = bytes((k * 7 + 3) & 0xFF for k in range(descriptor))
        self.f.write(self.header + self.descriptor)
        self._cache: dict[bytes, bytes] = {}

    def tell(self) -> int:
        return self.f.tell()

    def payload(self, data: bytes) -> bytes:
        p = self._cache.get(data)
        if p is None:
            p = encode_block(data, self.compression)
            if len(self._cache) < 256:
                self._cache[data] = p
        return p

    def track0(self, data: bytes) -> None:
        for k in range(0, len(data), BLOCK):
            chunk = data[k:k + BLOCK]
            p = self.payload(chunk)
            if self.seed is not None and self.compression == "none":
                p = encrypt(p, self.seed)
            self.f.write(record(0x06, struct.pack("<H", len(p) + 2) + p, length=len(chunk)))
        self.f.write(end_of_run())

    def sector_partition(self, blocks: Iterable[bytes], *, raw_none: bool = False) -> None:
        self.f.write(with_subtype(self.header, 0x02))
        if raw_none:
            assert self.compression == "none"
            unit = bytearray()
            for b in blocks:
                unit += b
                while len(unit) >= BLOCK:
                    u, unit = bytes(unit[:BLOCK]), unit[BLOCK:]
                    self.f.write(encrypt(u, self.seed) if self.seed is not None else u)
            if unit:
                self.f.write(encrypt(bytes(unit), self.seed) if self.seed is not None else bytes(unit))
        else:
            for b in blocks:
                p = self.payload(b)
                if self.seed is not None and self.compression == "none":
                    p = encrypt(p, self.seed)
                self.f.write(struct.pack("<H", len(p) + 2) + p)
        self.f.write(end_of_run())

    def raw(self, data: bytes) -> None:
        self.f.write(data)

    def close(self, catalogues: int = 0) -> None:
        trailer_start = self.f.tell()
        self.f.write(self.descriptor)
        end_pos = self.f.tell()
        self.f.write(record(0x23, struct.pack("<QQQ", 0, end_pos - trailer_start, 0)))
        self.f.close()


def blocks_of(data: bytes, size: int = BLOCK) -> Iterator[bytes]:
    for k in range(0, len(data), size):
        yield data[k:k + size]


def mbr(parts: list[tuple[int, int, int]], disk_id: int = 0x1234ABCD) -> bytes:
    m = bytearray(512)
    struct.pack_into("<I", m, 440, disk_id)
    for k, (ptype, start, count) in enumerate(parts):
        o = 446 + 16 * k
        m[o] = 0x80 if k == 0 else 0
        m[o + 1:o + 4] = b"\xfe\xff\xff"
        m[o + 4] = ptype
        m[o + 5:o + 8] = b"\xfe\xff\xff"
        struct.pack_into("<II", m, o + 8, start, count)
    m[510:512] = b"\x55\xaa"
    return bytes(m)


def write_sector_disk(path: Path, disk: bytes, parts: list[tuple[int, int, int]], compression: str, *,
                      password: str | None = None, raw_none: bool = False) -> None:
    """Image the whole ``disk`` (whose MBR lists ``parts`` = (type, start LBA, sectors)) in sector mode."""
    w = ImageWriter(path, compression, password=password)
    first = min(s for _, s, _ in parts)
    w.track0(disk[:first * 512])
    for _, start, count in sorted(parts, key=lambda p: p[1]):
        w.sector_partition(blocks_of(disk[start * 512:(start + count) * 512]), raw_none=raw_none)
    w.close()


def split_spans(image: Path, span_size: int) -> list[Path]:
    """Split ``image`` (NAME.GHO) into NAME.GHO + NAME001.GHS…; each continuation gets a 512-byte header."""
    data = image.read_bytes()
    head = data[:512]
    image_id = struct.unpack_from("<I", head, 4)[0]
    first, rest = data[:span_size], data[span_size:]
    image.write_bytes(first)
    out = [image]
    n = 1
    body = span_size - 512
    while rest:
        h = bytearray(head)
        h[2] = 0x09
        struct.pack_into("<I", h, 4, (image_id + n) & 0xFFFFFFFF)
        p = image.with_name(f"{image.stem[:5]}{n:03d}.GHS")
        p.write_bytes(bytes(h) + rest[:body])
        out.append(p)
        rest = rest[body:]
        n += 1
    return out


# -- FAT file-aware images from an existing FAT volume (§10) ---------------------------------------
class FatSource:
    """Minimal FAT12/16/32 reader for volumes made by mkfs.fat + mtools."""

    def __init__(self, vol: bytes) -> None:
        self.v = vol
        b = vol[:512]
        self.bps, self.spc, self.rsvd, self.nfats, self.root_ent, tot16, _m, fatsz16 = \
            struct.unpack_from("<HBHBHHBH", b, 11)
        tot32, fatsz32 = struct.unpack_from("<I", b, 32)[0], struct.unpack_from("<I", b, 36)[0]
        self.fatsz = fatsz16 or fatsz32
        self.tot = tot16 or tot32
        self.root_sectors = (self.root_ent * 32 + self.bps - 1) // self.bps
        self.first_data = self.rsvd + self.nfats * self.fatsz + self.root_sectors
        clusters = (self.tot - self.first_data) // self.spc
        self.bits = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
        self.root_clus = struct.unpack_from("<I", b, 44)[0] if self.bits == 32 else 0

    def fat(self, n: int) -> int:
        o = self.rsvd * self.bps
        if self.bits == 12:
            v = struct.unpack_from("<H", self.v, o + n * 3 // 2)[0]
            return v >> 4 if n & 1 else v & 0xFFF
        if self.bits == 16:
            return struct.unpack_from("<H", self.v, o + 2 * n)[0]
        return struct.unpack_from("<I", self.v, o + 4 * n)[0] & 0x0FFFFFFF

    def chain_bytes(self, first: int) -> bytes:
        out = bytearray()
        cb = self.bps * self.spc
        n = first
        eoc = {12: 0xFF8, 16: 0xFFF8, 32: 0x0FFFFFF8}[self.bits]
        while 2 <= n < eoc:
            o = (self.first_data + (n - 2) * self.spc) * self.bps
            out += self.v[o:o + cb]
            n = self.fat(n)
        return bytes(out)

    def dir_slots(self, first: int | None) -> list[bytes]:
        if first is None:
            o = (self.rsvd + self.nfats * self.fatsz) * self.bps
            raw = self.v[o:o + self.root_sectors * self.bps]
        else:
            raw = self.chain_bytes(first)
        slots = []
        for k in range(0, len(raw), 32):
            s = raw[k:k + 32]
            slots.append(s)
            if s[0] == 0:
                break
        if not slots or slots[-1][0] != 0:
            slots.append(bytes(32))
        return slots


def write_fat_image(path: Path, volumes: list[tuple[bytes, int]], compression: str, *,
                    password: str | None = None, image_id: int = 0x5EC70002,
                    descriptor: int = 0x2000) -> None:
    """A file-aware image of ``volumes`` = [(volume bytes, hidden sectors)], one subtype-3 section each."""
    w = ImageWriter(path, compression, password=password, image_type=0, image_id=image_id,
                    descriptor=descriptor)
    for vol, _hidden in volumes:
        write_fat_section(w, vol)
    w.close()


def write_fat_section(w: ImageWriter, vol: bytes) -> None:
    """One subtype-3 section of the FAT volume ``vol`` (§10)."""
    seed = w.seed

    def body(b: bytes) -> bytes:
        return encrypt(b, seed) if seed is not None else b

    src = FatSource(vol)
    w.raw(with_subtype(w.header, 0x03))
    w.raw(record(0x17, body(vol[:512])))

    def walk(first: int | None, src: FatSource = src) -> None:
        for s in src.dir_slots(first):
            crc = 0x12EED357 if s == bytes(32) else crc32_msb_bytes(s)
            w.raw(record(0x04, body(s + struct.pack("<I", crc) + bytes(20))))
            if s[0] in (0, 0xE5) or s[11] & 0x3F == 0x0F or s[11] & 0x08 or s[0:2] in (b". ", b".."):
                continue
            clus = struct.unpack_from("<H", s, 26)[0] | (struct.unpack_from("<H", s, 20)[0] << 16 if
                                                         src.bits == 32 else 0)
            if s[11] & 0x10:
                walk(clus)
                continue
            size = struct.unpack_from("<I", s, 28)[0]
            data = src.chain_bytes(clus)[:size] if size else b""
            chunks = [data[k:k + BLOCK] for k in range(0, len(data), BLOCK)]
            for k, c in enumerate(chunks):
                w.raw(record(0x02, body(w.payload(c)), flags=1 if k == len(chunks) - 1 else 0))
            if chunks:
                c = crc32_msb_bytes(data)
                w.raw(record(0x03, body(struct.pack("<II", c, c) + bytes(12))))

    walk(src.root_clus if src.bits == 32 else None)
    if src.bits == 32:
        w.raw(record(0x18, body(vol[:16384])))
    w.raw(record(0x17, body(vol[:512])))


def truncate(path: Path, size: int) -> None:
    os.truncate(path, size)
