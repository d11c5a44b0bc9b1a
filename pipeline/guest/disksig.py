"""The MBR disk signature the guest expects (issue 10 item 2).

Windows finds its drive letters (and, from Vista on, its boot manager's disk) by the 4-byte MBR disk
signature at offset 440, as recorded in ``HKLM\\SYSTEM\\MountedDevices``: ``\\DosDevices\\C:`` holds 12
bytes, the disk signature and the partition's byte offset (u64, little-endian). Other forms (GPT
``DMIO:ID:`` + GUID, volume names) carry no MBR signature and are only noted.

* :func:`read_in_guest` runs inside inspect's appliance session (no launch of its own) and returns
  the ``disk_signature`` facts.
* :func:`reconcile` runs inside registry-merge's session on the overlay: for a disk rebuilt by the
  native GHO reader (whose signature is synthesised from the image id) it writes the expected
  signature into the overlay (never the source) and reads it back; for other sources a mismatch is
  a warning only (the disk is the user's own as it was).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import log
from pipeline.core.config import ImageConfig
from pipeline.core.errors import ToolError
from pipeline.registry import hive
from pipeline.tools.guestfs import Guestfish

if TYPE_CHECKING:
    from pipeline.model.inspect import InspectFacts

SIGNATURE_OFFSET = 440
VALUE = "\\DosDevices\\C:"
_PART_START = re.compile(r"part_num:\s*(\d+)\s+part_start:\s*(\d+)")


def _hex(sig: int) -> str:
    return f"0x{sig:08x}"


def read_mbr_signature(g: Guestfish, dev: str, td: str) -> int | None:
    """The signature at offset 440 of ``dev`` (None without a 55 AA MBR)."""
    local = Path(td) / "mbr"
    g("download-offset", dev, str(local), "0", "512")
    mbr = local.read_bytes()
    if len(mbr) < 512 or mbr[510:512] != b"\x55\xaa":
        return None
    return int.from_bytes(mbr[SIGNATURE_OFFSET:SIGNATURE_OFFSET + 4], "little")


def parse_mounted_device(data: bytes) -> tuple[int | None, int | None, str | None]:
    """(signature, partition byte offset, note) of a MountedDevices value."""
    if len(data) == 12:
        return int.from_bytes(data[:4], "little"), int.from_bytes(data[4:], "little"), None
    if data.startswith(b"DMIO:ID:"):
        return None, None, f"{VALUE} names a GPT partition GUID (DMIO:ID:), not an MBR disk signature"
    return None, None, f"{VALUE} is not the 12-byte MBR form ({len(data)} bytes): ignored"


def _partition_starts(g: Guestfish, dev: str) -> dict[int, int]:
    try:
        text = g("part-list", dev)
    except ToolError:
        return {}
    return {int(n): int(s) for n, s in _PART_START.findall(text)}


def _mounted_c(g: Guestfish, systemroot: str, td: str, image_id: str | None, step: str) -> bytes | None:
    """The raw ``\\DosDevices\\C:`` value from the guest's SYSTEM hive (the root is mounted at /)."""
    guest = g("case-sensitive-path", f"{systemroot}/System32/config/system").strip()
    local = Path(td) / "SYSTEM"
    g("download", guest, str(local))
    try:
        ops = hive.export(local, "\\MountedDevices", image_id=image_id, step=step)
    except ToolError:
        return None  # no MountedDevices key (a fresh or sysprepped system)
    for op in ops:
        if op.name is not None and op.name.lower() == VALUE.lower() and op.data is not None:
            return op.data
    return None


def read_in_guest(g: Guestfish, dev: str, systemroot: str, *, image_id: str | None,
                  step: str) -> dict[str, Any]:
    """The ``disk_signature`` facts: the MBR's, the registry's, and whether they agree."""
    facts: dict[str, Any] = {"mbr": None, "registry": None, "registry_offset": None,
                             "registry_partition": None, "matches": None, "note": None}
    with tempfile.TemporaryDirectory(prefix="gho2kvm-disksig-") as td:
        mbr = read_mbr_signature(g, dev, td)
        facts["mbr"] = None if mbr is None else _hex(mbr)
        try:
            data = _mounted_c(g, systemroot, td, image_id, step)
        except ToolError as e:
            facts["note"] = f"SYSTEM hive not readable: {e.message}"
            return facts
    if data is None:
        facts["note"] = f"no {VALUE} in HKLM\\SYSTEM\\MountedDevices"
        return facts
    sig, offset, note = parse_mounted_device(data)
    facts["note"] = note
    if sig is None:
        return facts
    facts["registry"], facts["registry_offset"] = _hex(sig), offset
    starts = _partition_starts(g, dev)
    facts["registry_partition"] = next((n for n, s in sorted(starts.items()) if s == offset), None)
    if facts["registry_partition"] is None:
        facts["note"] = (f"{VALUE} names byte offset {offset}, where no partition starts "
                         f"(partitions start at {sorted(starts.values())})")
    facts["matches"] = mbr == sig
    return facts


def rebuilt_natively(image: ImageConfig) -> bool:
    """The disk was made by the native GHO reader (its signature is ours, not the guest's)."""
    return image.source.suffix.lower() == ".gho" and image.ghost.backend == "native"


def reconcile(g: Guestfish, facts: InspectFacts, *, image_id: str, rebuilt_natively: bool,
              step: str) -> dict[str, Any]:
    """In registry-merge's session (overlay attached read-write): fix or warn; return the receipt part.

    ``{"action": "none"|"fixed"|"warning", "mbr", "registry", "verified", "warnings": [...]}``.
    """
    ds = facts.disk_signature or {}
    out: dict[str, Any] = {"action": "none", "mbr": ds.get("mbr"), "registry": ds.get("registry"),
                           "verified": None, "warnings": []}
    if ds.get("registry") and ds.get("registry_partition") is None:
        out["warnings"].append(f"{ds.get('note')}: Windows may give C: another letter")
    if ds.get("matches") is not False or not ds.get("registry"):
        return out
    want = int(ds["registry"], 16)
    if not rebuilt_natively:
        out["action"] = "warning"
        out["warnings"].append(
            f"disk signature {ds['mbr']} differs from {ds['registry']} that the guest's MountedDevices "
            f"expects for C:; Windows may give C: another letter or not find its boot disk (the disk is "
            f"left as it is)")
        log.get().warning("disk signature mismatch", mbr=ds["mbr"], registry=ds["registry"])
        return out
    dev = (g.lines("list-devices") or ["/dev/sda"])[0]
    with tempfile.TemporaryDirectory(prefix="gho2kvm-disksig-") as td:
        local = Path(td) / "sig"
        local.write_bytes(want.to_bytes(4, "little"))
        g("upload-offset", str(local), dev, str(SIGNATURE_OFFSET))
        g("sync")
        back = read_mbr_signature(g, dev, td)
    if back != want:
        raise ToolError(f"disk signature read back from the overlay is "
                        f"{None if back is None else _hex(back)}, expected {ds['registry']}",
                        tool="guestfish", argv=[], returncode=None, image_id=image_id, step=step)
    log.get().info("disk signature set in the overlay", was=ds["mbr"], now=ds["registry"])
    out.update({"action": "fixed", "verified": True})
    return out
