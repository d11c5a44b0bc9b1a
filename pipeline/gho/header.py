"""File header, partition headers and continuation headers (docs/gho-format.md §2, §4, §5)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.gho.errors import GhoError

HEADER_SIZE = 512
MAGIC = b"\xfe\xef"
KIND_FIRST = 0x01
KIND_SPAN = 0x09

SUBTYPE_SECTOR = 0x02
SUBTYPE_FAT = 0x03
SUBTYPE_NTFS = 0x04
SUBTYPE_EXT = 0x05
SUBTYPE_NAMES = {SUBTYPE_SECTOR: "sector", SUBTYPE_FAT: "fat", SUBTYPE_NTFS: "ntfs", SUBTYPE_EXT: "ext"}

COMP_NONE = 0x00
COMP_FAST = 0x02


def compression_name(code: int) -> str:
    if code == COMP_NONE:
        return "none"
    if code == COMP_FAST:
        return "fast"
    if 0x03 <= code <= 0x0A:
        return "high"
    return f"unknown-0x{code:02x}"


def compression_supported(code: int) -> bool:
    return code in (COMP_NONE, COMP_FAST) or 0x03 <= code <= 0x0A


@dataclass(frozen=True)
class FileHeader:
    raw: bytes
    kind: int
    compression: int
    image_id: int
    image_type: int
    password: bool
    byte34: int
    bytes40: bytes
    description: str

    @property
    def compression_name(self) -> str:
        return compression_name(self.compression)


def parse_file_header(buf: bytes, name: str) -> FileHeader:
    """Parse and validate the first 512 bytes of the first file of an image."""
    if len(buf) < HEADER_SIZE:
        raise GhoError(f"{name}: not a Ghost image: file is {len(buf)} bytes, expected a 512-byte header")
    if buf[0:2] != MAGIC:
        raise GhoError(f"{name}: not a Ghost image: bad magic {buf[0:2].hex()} at offset 0, expected feef")
    kind = buf[2]
    if kind == KIND_SPAN:
        raise GhoError(f"{name}: is a span continuation file (.GHS); open the first file (.GHO) of the set")
    if kind != KIND_FIRST:
        raise GhoError(f"{name}: unexpected file kind 0x{kind:02x} at offset 2, expected 0x01 (first file)")
    comp = buf[3]
    if not compression_supported(comp):
        raise GhoError(f"{name}: unsupported compression byte 0x{comp:02x} at offset 3")
    flag = buf[0x0B]
    if flag not in (0, 1):
        raise GhoError(f"{name}: unexpected password flag 0x{flag:02x} at offset 0x0b, expected 0 or 1")
    (image_id,) = struct.unpack_from("<I", buf, 4)
    desc = buf[0xFF:0xFF + 257].split(b"\0", 1)[0].decode("ascii", "replace")
    return FileHeader(
        raw=bytes(buf[:HEADER_SIZE]), kind=kind, compression=comp, image_id=image_id,
        image_type=buf[0x0A], password=flag == 1, byte34=buf[0x34], bytes40=bytes(buf[0x40:0x44]),
        description=desc,
    )


def is_partition_header(buf: bytes | memoryview, pos: int, compression: int, image_id: int) -> bool:
    """True if a partition header of this image starts at ``buf[pos]`` (§5.2)."""
    return (
        len(buf) >= pos + 8
        and buf[pos] == 0xFE and buf[pos + 1] == 0xEF
        and buf[pos + 3] == compression
        and struct.unpack_from("<I", buf, pos + 4)[0] == image_id
        and buf[pos + 2] not in (KIND_FIRST, KIND_SPAN)
    )


def is_span_header(buf: bytes, compression: int, image_id: int, n: int) -> bool:
    """True if ``buf`` starts with the header of continuation file number ``n`` (§4)."""
    return (
        len(buf) >= HEADER_SIZE
        and buf[0:2] == MAGIC
        and buf[2] == KIND_SPAN
        and buf[3] == compression
        and struct.unpack_from("<I", buf, 4)[0] == (image_id + n) & 0xFFFFFFFF
    )
