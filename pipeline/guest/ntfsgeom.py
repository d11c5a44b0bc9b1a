"""The NTFS boot sector's drive geometry against the geometry the new BIOS reports.

An NTFS boot sector records sectors per track (offset 0x18, u16) and heads (0x1A, u16) of the
machine that formatted it. Windows 2000/XP/2003's boot code falls back to CHS reads with these when
it does not use the BIOS's extended (LBA) reads, and then stops with "A disk read error occurred"
when they differ from the BIOS's geometry (virt-v2v rewrites the heads field for this reason).
QEMU takes the BIOS geometry of a disk from its MBR partition table (heads = end head + 1, sectors =
the end sector of the entries), so the rule is: for an NT 5.x guest booting through BIOS, when the
system partition's boot sector disagrees with its own partition table entry, registry-merge writes
the table's geometry into the boot sector (and its backup copy at the volume's end) in the overlay,
and says so in the receipt (``keep_boot_geometry: true`` leaves it). Vista and later boot through
bootmgr with LBA reads only: reported, left.
"""

from __future__ import annotations

import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ToolError
from pipeline.core.receipts import JsonRecord

if TYPE_CHECKING:
    from pipeline.steps.inspect import InspectFacts
    from pipeline.tools.guestfs import Guestfish

GEOMETRY_OFFSET = 0x18  # sectors per track (u16), then heads (u16)


@dataclass(frozen=True)
class BootGeometry(JsonRecord):
    partition: str  # the system partition (/dev/sda1)
    bpb_sectors: int  # the boot sector's sectors per track
    bpb_heads: int
    table_sectors: int | None = None  # from the partition's MBR entry (None: not a primary MBR partition)
    table_heads: int | None = None
    total_sectors: int = 0  # of the volume: the backup boot sector is the sector after them

    @property
    def mismatch(self) -> bool:
        return self.table_heads is not None and (self.bpb_heads, self.bpb_sectors) != (
            self.table_heads, self.table_sectors)


def parse(boot: bytes, mbr: bytes, partnum: int, partition: str) -> BootGeometry | None:
    """The geometry of an NTFS boot sector and of its partition's MBR entry (pure); None when the
    boot sector is not NTFS."""
    if len(boot) < 512 or boot[3:11] != b"NTFS    ":
        return None
    spt, heads = struct.unpack_from("<HH", boot, GEOMETRY_OFFSET)
    total = struct.unpack_from("<Q", boot, 0x28)[0]
    t_heads = t_spt = None
    if 1 <= partnum <= 4 and len(mbr) >= 512 and mbr[510:512] == b"\x55\xaa":
        entry = mbr[446 + 16 * (partnum - 1):446 + 16 * partnum]
        end_head, end_sector = entry[5], entry[6] & 0x3F
        if entry[4] != 0 and end_sector:
            t_heads, t_spt = end_head + 1, end_sector
    return BootGeometry(partition, spt, heads, t_spt, t_heads, total)


def _device_and_number(partition: str) -> tuple[str, int] | None:
    m = re.fullmatch(r"(/dev/[a-z]+)(\d+)", partition)
    return (m.group(1), int(m.group(2))) if m else None


def read_in_guest(g: Guestfish, partition: str) -> BootGeometry | None:
    """Read the boot sector of ``partition`` and its disk's MBR (two 512-byte downloads)."""
    where = _device_and_number(partition)
    if where is None:
        return None
    with tempfile.TemporaryDirectory(prefix="gho2kvm-geom-") as td:
        boot, mbr = Path(td) / "boot", Path(td) / "mbr"
        g.batch(("download-offset", partition, str(boot), "0", "512"),
                ("download-offset", where[0], str(mbr), "0", "512"))
        return parse(boot.read_bytes(), mbr.read_bytes(), where[1], partition)


def needs_fix(facts: InspectFacts) -> bool:
    geom = facts.boot_geometry
    return (geom is not None and geom.mismatch and facts.firmware == "bios"
            and facts.major_version is not None and facts.major_version == 5)


def warning(facts: InspectFacts) -> str | None:
    """A mismatch on a guest where it does not matter (Vista and later) or that is kept."""
    geom = facts.boot_geometry
    if geom is None or not geom.mismatch:
        return None
    return (f"the NTFS boot sector of {geom.partition} says {geom.bpb_heads} heads/{geom.bpb_sectors} "
            f"sectors per track, its partition table {geom.table_heads}/{geom.table_sectors} (what the BIOS "
            f"will report)")


def reconcile(g: Guestfish, facts: InspectFacts, *, keep: bool) -> dict[str, Any] | None:
    """Write the partition table's geometry into the boot sector and its backup (overlay only) when
    :func:`needs_fix`; the receipt's record of it, None when nothing was to be done."""
    geom = facts.boot_geometry
    if geom is None or not geom.mismatch:
        return None
    record = {"partition": geom.partition, "was": [geom.bpb_heads, geom.bpb_sectors],
              "table": [geom.table_heads, geom.table_sectors]}
    if keep or not needs_fix(facts):
        return {**record, "action": "kept" if keep else "left (boots with LBA reads)"}
    data = struct.pack("<HH", geom.table_sectors or 0, geom.table_heads or 0)
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
    return {**record, "action": "fixed", "now": [geom.table_heads, geom.table_sectors]}
