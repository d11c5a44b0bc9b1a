"""NTFS on-disk structures the reader needs (docs/gho-format.md §11.2, §11.5): boot sector, FILE
records, runs."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

AT_STANDARD_INFORMATION = 0x10
AT_ATTRIBUTE_LIST = 0x20
AT_FILE_NAME = 0x30
AT_VOLUME_NAME = 0x60
AT_VOLUME_INFORMATION = 0x70
AT_DATA = 0x80
AT_END = 0xFFFFFFFF

REC_MFT, REC_MFTMIRR, REC_LOGFILE, REC_VOLUME, REC_BITMAP, REC_BOOT, REC_BADCLUS = 0, 1, 2, 3, 6, 7, 8
REC_EXTEND = 11
FIRST_USER_RECORD = 16
#: files Ghost leaves out on purpose (§11.5); their data reads as zeros, nothing else is lost
SKIPPED_NAMES = ("pagefile.sys", "hiberfil.sys", "swapfile.sys")


class NtfsFormatError(ValueError):
    """Malformed NTFS structure; the caller adds image, partition and offset."""


@dataclass(frozen=True)
class Geometry:
    bytes_per_sector: int
    sectors_per_cluster: int
    total_sectors: int
    mft_lcn: int
    mftmirr_lcn: int
    record_size: int
    hidden_sectors: int
    serial: int

    @property
    def cluster_size(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster

    @property
    def clusters(self) -> int:
        return self.total_sectors * self.bytes_per_sector // self.cluster_size

    @property
    def volume_size(self) -> int:
        """(T + 1) × B: the backup boot sector follows the T counted sectors (§11.7 step 1)."""
        return (self.total_sectors + 1) * self.bytes_per_sector


def is_boot_sector(buf: bytes | memoryview, off: int = 0) -> bool:
    return bytes(buf[off + 3:off + 11]) == b"NTFS    " and bytes(buf[off + 510:off + 512]) == b"\x55\xaa"


def parse_boot(boot: bytes) -> Geometry:
    """Geometry from an NTFS boot sector; plausibility rules of §11.2 (clusters ≤ 64 KiB)."""
    if not is_boot_sector(boot):
        raise NtfsFormatError("not an NTFS boot sector ('NTFS    ' at +3 and 55 AA at +510)")
    bps, spc = struct.unpack_from("<HB", boot, 0x0B)
    hidden = struct.unpack_from("<I", boot, 0x1C)[0]
    total, mft, mirr = struct.unpack_from("<QQQ", boot, 0x28)
    if bps < 512 or bps > 4096 or bps & (bps - 1):
        raise NtfsFormatError(f"bytes per sector {bps}, expected a power of two in 512…4096")
    if spc == 0 or spc & (spc - 1) or bps * spc > 65536:
        raise NtfsFormatError(f"sectors per cluster {spc}: clusters above 64 KiB are not supported")
    if total == 0:
        raise NtfsFormatError("total sectors is 0")
    k = bps * spc
    clusters = total * bps // k
    if mft >= clusters or mirr >= clusters:
        raise NtfsFormatError(f"$MFT LCN {mft} or $MFTMirr LCN {mirr} beyond the {clusters} clusters")
    v = struct.unpack_from("<b", boot, 0x40)[0]
    rec = 1 << -v if v < 0 else v * k
    if rec < 256 or rec > 65536:
        raise NtfsFormatError(f"MFT record size {rec} (byte 0x40 = {v}), expected 256…65536")
    serial = struct.unpack_from("<Q", boot, 0x48)[0]
    return Geometry(bps, spc, total, mft, mirr, rec, hidden, serial)


def apply_fixups(raw: bytes | bytearray, sector: int = 512) -> bytearray:
    """The record with its update sequence applied; accepts on-disk and already fixed-up form (§11.5)."""
    rec = bytearray(raw)
    if len(rec) < 0x30:
        raise NtfsFormatError(f"record of {len(rec)} bytes is too short")
    usa_off, usa_n = struct.unpack_from("<HH", rec, 4)
    if usa_n < 2:
        raise NtfsFormatError(f"update sequence of {usa_n} entries")
    stride = len(rec) // (usa_n - 1)
    if stride * (usa_n - 1) != len(rec) or stride < 256 or usa_off + 2 * usa_n > len(rec):
        raise NtfsFormatError(f"update sequence (offset {usa_off}, {usa_n} entries) does not fit the "
                              f"record size {len(rec)}")
    seq = rec[usa_off:usa_off + 2]
    for i in range(1, usa_n):
        end = i * stride
        orig = rec[usa_off + 2 * i:usa_off + 2 * i + 2]
        tail = rec[end - 2:end]
        if tail == seq:
            rec[end - 2:end] = orig
        elif tail != orig:
            raise NtfsFormatError(f"update sequence mismatch in stride {i}")
    return rec


@dataclass(frozen=True)
class Run:
    """One mapping-pairs entry: ``count`` clusters at ``lcn`` (None = sparse)."""

    count: int
    lcn: int | None


def decode_runs(buf: bytes | bytearray, start: int, end: int) -> list[Run]:
    """Mapping pairs (§11.5): length and signed LCN delta per entry; O = 0 is sparse."""
    out = []
    lcn = 0
    pos = start
    while pos < end:
        h = buf[pos]
        if h == 0:
            break
        ln, on = h & 0x0F, h >> 4
        if ln == 0 or ln > 8 or on > 8 or pos + 1 + ln + on > end:
            raise NtfsFormatError(f"bad mapping-pairs header 0x{h:02x}")
        count = int.from_bytes(buf[pos + 1:pos + 1 + ln], "little")
        if count == 0:
            raise NtfsFormatError("mapping-pairs entry of 0 clusters")
        if on:
            lcn += int.from_bytes(buf[pos + 1 + ln:pos + 1 + ln + on], "little", signed=True)
            if lcn < 0:
                raise NtfsFormatError("negative LCN in the mapping pairs")
            out.append(Run(count, lcn))
        else:
            out.append(Run(count, None))
        pos += 1 + ln + on
    return out


@dataclass
class Attribute:
    type: int
    name: str
    resident: bool
    offset: int  # in the record
    value: bytes = b""  # resident value
    runs: list[Run] = field(default_factory=list)
    start_vcn: int = 0
    data_size: int = 0
    flags: int = 0


@dataclass
class FileRecord:
    number: int
    in_use: bool
    is_dir: bool
    base: int
    attributes: list[Attribute]
    extension: bool = False  # an extension record of the record ``base`` (0 is the $MFT itself)

    def nonresident(self) -> list[Attribute]:
        return [a for a in self.attributes if not a.resident]

    def find(self, atype: int, name: str = "") -> Attribute | None:
        for a in self.attributes:
            if a.type == atype and a.name == name:
                return a
        return None

    def file_name(self) -> tuple[str, int] | None:
        """(name, parent record) from $FILE_NAME, the Win32 (long) name preferred over the DOS one."""
        best = None
        for a in self.attributes:
            if a.type == AT_FILE_NAME and a.resident and len(a.value) >= 66:
                parent = int.from_bytes(a.value[0:6], "little")
                n, ns = a.value[64], a.value[65]
                name = a.value[66:66 + 2 * n].decode("utf-16-le", "replace")
                if best is None or ns != 2:
                    best = (name, parent)
        return best


def parse_record(rec: bytes | bytearray, number: int) -> FileRecord:
    """Attribute walk of a fixed-up FILE record (§11.5, FsRover's bounds)."""
    if rec[0:4] != b"FILE":
        raise NtfsFormatError(f"record does not begin with FILE ({bytes(rec[0:4])!r})")
    first, flags = struct.unpack_from("<HH", rec, 0x14)
    used = min(struct.unpack_from("<I", rec, 0x18)[0], len(rec))
    base_ref = struct.unpack_from("<Q", rec, 0x20)[0]
    base = base_ref & 0xFFFFFFFFFFFF
    attrs: list[Attribute] = []
    pos = first
    while pos + 16 <= used:
        atype, alen = struct.unpack_from("<II", rec, pos)
        if atype == AT_END:
            break
        if alen < 16 or pos + alen > used:
            raise NtfsFormatError(f"attribute 0x{atype:x} at +{pos} has length {alen} outside the record")
        nonres, name_len = rec[pos + 8], rec[pos + 9]
        name_off, aflags = struct.unpack_from("<HH", rec, pos + 10)
        name = bytes(rec[pos + name_off:pos + name_off + 2 * name_len]).decode("utf-16-le", "replace")
        if nonres:
            if alen < 0x40:
                raise NtfsFormatError(f"non-resident attribute 0x{atype:x} at +{pos} shorter than 0x40")
            start_vcn = struct.unpack_from("<Q", rec, pos + 0x10)[0]
            mp = struct.unpack_from("<H", rec, pos + 0x20)[0]
            size = struct.unpack_from("<Q", rec, pos + 0x30)[0]
            if mp < 0x40 or mp > alen:
                raise NtfsFormatError(f"mapping pairs of attribute 0x{atype:x} at +{pos} outside it")
            runs = decode_runs(rec, pos + mp, pos + alen)
            attrs.append(Attribute(atype, name, False, pos, runs=runs, start_vcn=start_vcn, data_size=size,
                                   flags=aflags))
        else:
            vlen, voff = struct.unpack_from("<IH", rec, pos + 0x10)
            if voff + vlen > alen:
                raise NtfsFormatError(f"resident value of attribute 0x{atype:x} at +{pos} outside it")
            value = bytes(rec[pos + voff:pos + voff + vlen])
            attrs.append(Attribute(atype, name, True, pos, value=value, data_size=vlen, flags=aflags))
        pos += alen
    return FileRecord(number, bool(flags & 1), bool(flags & 2), base, attrs, base_ref != 0)


def volume_facts(rec: FileRecord) -> tuple[str | None, bool]:
    """(label, dirty) from the $Volume record (§11.7 step 8)."""
    label = None
    dirty = False
    a = rec.find(AT_VOLUME_NAME)
    if a is not None and a.resident:
        label = a.value.decode("utf-16-le", "replace")
    v = rec.find(AT_VOLUME_INFORMATION)
    if v is not None and v.resident and len(v.value) >= 12:
        dirty = bool(struct.unpack_from("<H", v.value, 0x0A)[0] & 1)
    return label, dirty
