"""The NTFS boot sector's drive geometry against the geometry the new BIOS reports.

An NTFS boot sector records sectors per track (offset 0x18, u16) and heads (0x1A, u16) of the
machine that formatted it. Windows 2000/XP/2003 need the heads to match the BIOS's geometry to boot
from the drive, else "A disk read error occurred. Press Ctrl+Alt+Del to restart" (Vista and later
ignore the field). What the BIOS reports under QEMU depends on the disk's size only: virt-v2v found
by testing XP guests (its ``fix_ntfs_heads``) 0x40 heads below 2114445312 bytes, 0x80 below
4228374780, 0xFF above, which is the BIOS's LBA translation of QEMU's 16-head, 63-sector physical
geometry (heads doubled until at most 1024 cylinders remain, 255 at most): :func:`bios_geometry`
computes it the same way for every size, 16 and 32 heads below 1 GiB included.

Rule: an NT 5.x guest booting through BIOS whose system partition's NTFS boot sector disagrees gets
the BIOS geometry written into the boot sector (and its backup copy at the volume's end), in the
overlay, reported in the receipt; ``keep_boot_geometry: true`` leaves it. Vista and later: reported
only.
"""

from __future__ import annotations

import re
import struct
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ToolError
from pipeline.model.guest import GEOMETRY_OFFSET, BootGeometry

if TYPE_CHECKING:
    from pipeline.model.inspect import InspectFacts
    from pipeline.tools.guestfs import Guestfish

def parse(boot: bytes, disk_size: int, partition: str) -> BootGeometry | None:
    """The geometry of an NTFS boot sector (pure); None when the sector is not NTFS."""
    if len(boot) < 512 or boot[3:11] != b"NTFS    ":
        return None
    spt, heads = struct.unpack_from("<HH", boot, GEOMETRY_OFFSET)
    total = struct.unpack_from("<Q", boot, 0x28)[0]
    return BootGeometry(partition, spt, heads, disk_size, total)


def _device_and_number(partition: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(/dev/[a-z]+)(\d+)", partition)
    return (m.group(1), int(m.group(2))) if m else None


def read_in_guest(g: Guestfish, partition: str) -> BootGeometry | None:
    """Read the boot sector of ``partition`` and the size of its disk (one batch)."""
    where = _device_and_number(partition)
    if where is None:
        return None
    with tempfile.TemporaryDirectory(prefix="gho2kvm-geom-") as td:
        boot = Path(td) / "boot"
        _got, size = g.batch(("download-offset", partition, str(boot), "0", "512"),
                             ("blockdev-getsize64", where[0]))
        return parse(boot.read_bytes(), int(size.strip()), partition)


def needs_fix(facts: InspectFacts) -> bool:
    geom = facts.boot_geometry
    return (geom is not None and geom.mismatch and facts.firmware == "bios"
            and facts.major_version is not None and facts.major_version == 5)


def warning(facts: InspectFacts) -> str | None:
    """A mismatch on an XP/2003 guest booting through BIOS, where the boot sector's field matters
    (Vista and later, and UEFI, never read it: the receipt's record is enough)."""
    geom = facts.boot_geometry
    if geom is None or not geom.mismatch or facts.major_version != 5 or facts.firmware != "bios":
        return None
    heads, spt = geom.bios
    return (f"the NTFS boot sector of {geom.partition} says {geom.bpb_heads} heads/{geom.bpb_sectors} "
            f"sectors per track, the BIOS will report {heads}/{spt} for this disk (XP/2003: 'A disk read "
            f"error occurred')")


def reconcile(g: Guestfish, facts: InspectFacts, *, keep: bool) -> dict[str, Any] | None:
    """Write the partition table's geometry into the boot sector and its backup (overlay only) when
    :func:`needs_fix`; the receipt's record of it, None when nothing was to be done."""
    geom = facts.boot_geometry
    if geom is None or not geom.mismatch:
        return None
    heads, spt = geom.bios
    record: dict[str, Any] = {"partition": geom.partition, "was": [geom.bpb_heads, geom.bpb_sectors],
                              "bios": [heads, spt]}
    if keep or not needs_fix(facts):
        return {**record, "action": "kept (keep_boot_geometry)" if keep and needs_fix(facts)
                else "left (Vista and later, and UEFI, do not read it)"}
    data = struct.pack("<HH", spt, heads)
    with tempfile.TemporaryDirectory(prefix="gho2kvm-geom-") as td:
        local = Path(td) / "geometry"
        local.write_bytes(data)
        g("upload-offset", str(local), geom.partition, str(GEOMETRY_OFFSET))
        backup = geom.total_sectors * 512
        probe = Path(td) / "backup"
        try:
            g("download-offset", geom.partition, str(probe), str(backup), "512")
            if probe.read_bytes()[3:11] == b"NTFS    ":
                g("upload-offset", str(local), geom.partition, str(backup + GEOMETRY_OFFSET))
                record["backup"] = True
        except ToolError:  # no backup sector readable there: the primary is what the BIOS boots
            record["backup"] = False
    return {**record, "action": "fixed", "now": [heads, spt]}
