"""Finish a rebuilt disk's boot chain so that a PC BIOS boots it (issue 10).

A BIOS loads the MBR and runs its first 440 bytes; standard MBR code loads the boot sector of the one
active primary partition; that boot sector's code reads its file system from "hidden sectors" (its
partition's absolute start LBA). Ghost's file-aware images keep neither the MBR code (docs/gho-format.md
§10.10) nor always an absolute hidden-sectors value (a logical partition's is relative to its EBR).

:func:`mbr_code` chooses the MBR code before anything is written: the image's own when its MBR carries
some, else the first 440 bytes of syslinux's ``mbr.bin`` (Debian ``syslinux-common``, a maintained
loader that chain-loads the active partition as DOS and Windows expect). :func:`finish_boot_chain`
then runs on the written disk: MBR code in, exactly one active primary partition (the first whose
boot sector carries boot code, the image's own choice first; else the first), every FAT/NTFS boot
sector's hidden sectors (and its backup copy's) set to its partition's start. Every rebuild path
(sector mode, FAT, NTFS) calls it once, after its volumes are written.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import Gho2KvmError
from pipeline.gho.bootsector import detect_fs
from pipeline.gho.disk import DEFAULT_GEOMETRY, EXTENDED_TYPES, SECTOR, Placement, parse_mbr
from pipeline.gho.sparse import Disk

MBR_BIN = Path("/usr/lib/syslinux/mbr/mbr.bin")
MBR_PACKAGE = "syslinux-common"
CODE_BYTES = 440  # the MBR's boot code area; the disk signature follows at 440
HIDDEN_OFFSET = 28  # BPB hidden sectors (u32), same place in FAT12/16/32 and NTFS boot sectors
IMAGE, SYSLINUX = "image", "syslinux mbr.bin"


class BootCodeMissing(Gho2KvmError):
    """The standard MBR code file is not installed."""


@dataclass(frozen=True)
class MbrCode:
    data: bytes  # CODE_BYTES bytes
    source: str  # IMAGE | SYSLINUX


def mbr_code(mbr: bytes | None, path: Path | None = None) -> MbrCode:
    """The code for a disk whose MBR is ``mbr`` (None = synthesised): the image's, or mbr.bin's."""
    if mbr and any(mbr[:CODE_BYTES]):
        return MbrCode(bytes(mbr[:CODE_BYTES]), IMAGE)
    path = path or MBR_BIN
    try:
        with open(path, "rb") as fh:
            data = fh.read(CODE_BYTES)
    except OSError as e:
        raise BootCodeMissing(f"standard MBR boot code {path} cannot be read ({e.strerror}): install the "
                              f"Debian package {MBR_PACKAGE} (scripts/setup-system.sh does)") from None
    if not any(data):
        raise BootCodeMissing(f"standard MBR boot code {path} is empty: reinstall the Debian package "
                              f"{MBR_PACKAGE}")
    return MbrCode(data.ljust(CODE_BYTES, b"\0"), SYSLINUX)


def disk_geometry(boots: list[bytes]) -> tuple[int, int]:
    """(heads, sectors per track) for CHS values: the first plausible BPB's, else 255/63."""
    for b in boots:
        if len(b) >= 512 and b[510:512] == b"\x55\xaa" and detect_fs(b)[0]:
            spt, heads = struct.unpack_from("<HH", b, 24)
            if 1 <= heads <= 255 and 1 <= spt <= 63:
                return heads, spt
    return DEFAULT_GEOMETRY


def _code_area(fs: str) -> slice:
    return slice(90 if fs == "FAT32" else 84 if fs == "NTFS" else 62, 510)


def has_boot_code(boot: bytes) -> bool:
    """A FAT/NTFS boot sector with a jump at 0 and non-zero code after its BPB."""
    fs = detect_fs(boot)[0]
    return bool(fs) and boot[0] in (0xEB, 0xE9) and any(boot[_code_area(fs or "")])


def _backup_lbas(boot: bytes, fs: str, p: Placement) -> list[int]:
    """LBAs of the boot sector's backup copy inside its partition (FAT32: BPB field; NTFS: last sector)."""
    if fs == "FAT32":
        rel = struct.unpack_from("<H", boot, 50)[0]
    elif fs == "NTFS":
        rel = struct.unpack_from("<Q", boot, 0x28)[0]
    else:
        return []
    return [p.start + rel] if 0 < rel < p.sectors else []


def _pread(disk: Disk, lba: int) -> bytes:
    return disk.pread(SECTOR, lba * SECTOR)


def _pwrite(disk: Disk, lba: int, data: bytes) -> None:
    disk.pwrite(data, lba * SECTOR)


def choose_active(places: list[Placement], bootable: list[bool], mbr: bytes) -> int | None:
    """Index (0-based) of the partition to mark active: the image's own active one if it carries boot
    code, else the first primary that does, else the first primary; None without primaries."""
    primaries = [k for k, p in enumerate(places) if not p.logical]
    if not primaries:
        return None
    marked = {e.start for e in parse_mbr(mbr) or [] if e.status & 0x80 and e.ptype}
    for k in primaries:
        if places[k].start in marked and bootable[k]:
            return k
    return next((k for k in primaries if bootable[k]), primaries[0])


def finish_boot_chain(disk: Disk, places: list[Placement], code: MbrCode) -> dict[str, Any]:
    """Finish ``disk`` (its MBR and volumes written); return what was done.

    ``places`` are the partitions in the caller's order (reported 1-based). The result is
    ``{mbr_code, active_partition, hidden_sectors_fixed: [{partition, was, now}]}``.
    """
    fixes: list[dict[str, int]] = []
    bootable: list[bool] = []
    for k, p in enumerate(places, 1):
        boot = _pread(disk, p.start)
        fs = detect_fs(boot)[0]
        bootable.append(has_boot_code(boot))
        if not fs:
            continue
        was = struct.unpack_from("<I", boot, HIDDEN_OFFSET)[0]
        if was == p.start:
            continue
        for lba in [p.start, *_backup_lbas(boot, fs, p)]:
            copy = bytearray(_pread(disk, lba))
            if copy[3:11] == boot[3:11] and copy[510:512] == b"\x55\xaa" and \
                    struct.unpack_from("<I", copy, HIDDEN_OFFSET)[0] == was:
                struct.pack_into("<I", copy, HIDDEN_OFFSET, p.start)
                _pwrite(disk, lba, bytes(copy))
        fixes.append({"partition": k, "was": was, "now": p.start})
    mbr = bytearray(_pread(disk, 0))
    if code.source != IMAGE:
        mbr[:CODE_BYTES] = code.data
    active = choose_active(places, bootable, bytes(mbr))
    active_start = places[active].start if active is not None else None
    for slot in range(4):
        o = 446 + 16 * slot
        ptype, start = mbr[o + 4], struct.unpack_from("<I", mbr, o + 8)[0]
        mbr[o] = 0x80 if ptype and ptype not in EXTENDED_TYPES and start == active_start else 0x00
    _pwrite(disk, 0, bytes(mbr))
    return {"mbr_code": code.source, "active_partition": None if active is None else active + 1,
            "hidden_sectors_fixed": fixes}
