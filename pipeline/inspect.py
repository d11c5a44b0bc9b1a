"""The inspect step: what the source image is (qemu-img), whether it is safe, and what guest it holds.

Safety first: VMDK descriptors are read by us *before* qemu-img opens anything, and an extent or
backing/data file outside the source's own folder (absolute path, ``..``, a symlink pointing out) is
refused — the class of bug in OpenStack's OSSA-2023-002. Then one libguestfs appliance launch gathers
the guest facts, read-only.
"""

from __future__ import annotations

import os
import re
import struct
import tempfile
from pathlib import Path
from typing import Any

from pipeline import guest
from pipeline.errors import InputError, ToolError
from pipeline.registry import hive
from pipeline.tools import qemu_img
from pipeline.tools.guestfs import Guestfish

STEP = "inspect"
FORMAT_BY_SUFFIX = {".vmdk": "vmdk", ".qcow2": "qcow2", ".raw": "raw", ".img": "raw", ".vhd": "vpc",
                    ".vhdx": "vhdx"}
SAFE_VMDK_TYPES = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "streamOptimized", "vmfs", "vmfsSparse", "vmfsThin", "seSparse",
}
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
_EXTENT_RE = re.compile(r'^\s*(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+"([^"]*)"(?:\s+\d+)?\s*$', re.I)
# qemu's own extent parser (sscanf) is looser than _EXTENT_RE (e.g. "RW +8 FLAT ..." or
# 'RW 8 VMFSSPARSE"x"' are extents to qemu): every line that may be an extent must match strictly.
_EXTENT_LIKE_RE = re.compile(r"^\s*(RW|RDONLY|NOACCESS)", re.I)
_QEMU_MAX_EXTENT_NAME = 511  # qemu truncates longer names, which would open a different file


def format_of(path: Path) -> str:
    fmt = FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unsupported source type; expected one of {', '.join(FORMAT_BY_SUFFIX)}")
    return fmt


def read_vmdk_descriptor(path: Path, image_id: str | None) -> str:
    """Return the text descriptor of a VMDK (embedded in a sparse file or a separate text file)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
            if head[:4] == b"KDMV":
                desc_off, desc_size = struct.unpack_from("<QQ", head, 28)
                if desc_off == 0 or desc_size == 0:
                    # streamOptimized/monolithicSparse always embed one; without it qemu can't read either
                    raise InputError(f"{path}: VMDK sparse header has no embedded descriptor",
                                     image_id=image_id, step=STEP)
                fh.seek(desc_off * 512)
                raw = fh.read(min(desc_size * 512, 1 << 20))
            else:
                fh.seek(0)
                raw = fh.read(1 << 20)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}", image_id=image_id, step=STEP) from None
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if "createType" not in text:
        raise InputError(f"{path}: not a VMDK (no descriptor with createType found)", image_id=image_id,
                         step=STEP)
    return text


def vmdk_safety(path: Path, image_id: str | None) -> dict[str, Any]:
    """Check a VMDK descriptor: known create type, every extent inside the source's folder."""
    text = read_vmdk_descriptor(path, image_id)
    m = re.search(r'^\s*createType\s*=\s*"?([^"\s]+)"?', text, re.M)
    create_type = m.group(1) if m else "?"
    if create_type not in SAFE_VMDK_TYPES:
        raise InputError(f"{path}: VMDK createType {create_type!r} refused; expected one of "
                         f"{', '.join(sorted(SAFE_VMDK_TYPES))}", image_id=image_id, step=STEP)
    if re.search(r"^\s*parentFileNameHint\s*=", text, re.M):
        raise InputError(f"{path}: VMDK has a parent (delta disk); merge it into a standalone disk first",
                         image_id=image_id, step=STEP)
    folder = path.parent.resolve()
    # a sparse VMDK with an embedded descriptor is its own (only) extent: qemu ignores the file name
    # written in the descriptor, which still names the file as it was called when created
    embedded = _is_sparse_vmdk(path)
    extents = []
    for line in text.splitlines():
        em = _EXTENT_RE.match(line)
        if not em:
            if _EXTENT_LIKE_RE.match(line):
                raise InputError(f"{path}: VMDK extent line {line.strip()[:200]!r} not understood; refused",
                                 image_id=image_id, step=STEP)
            continue
        access, sectors, kind, name = em.groups()
        target = _inside(folder, name) if len(name.encode()) <= _QEMU_MAX_EXTENT_NAME else None
        if target is None:
            raise InputError(f"{path}: VMDK extent {name!r} lies outside the image's folder {folder}; "
                             "refused", image_id=image_id, step=STEP)
        extents.append({"access": access, "sectors": int(sectors), "type": kind, "file": name,
                        "path": str(path.resolve() if embedded else target)})
    if not extents:
        raise InputError(f"{path}: VMDK descriptor lists no extents", image_id=image_id, step=STEP)
    return {"create_type": create_type, "extents": extents}


def _is_sparse_vmdk(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) == b"KDMV"


def _inside(folder: Path, name: str) -> Path | None:
    if not name or os.path.isabs(name) or "\\" in name or ".." in Path(name).parts:
        return None
    target = (folder / name).resolve()
    if target.parent != folder and folder not in target.parents:
        return None
    return target


def disk_facts(source: Path, image_id: str | None, fmt: str | None = None) -> dict[str, Any]:
    """qemu-img facts plus the safety checks; never writes anything."""
    fmt = fmt or format_of(source)
    facts: dict[str, Any] = {"format": fmt}
    if fmt == "vmdk":
        facts.update(vmdk_safety(source, image_id))
    info = qemu_img.info(source, image_id=image_id, step=STEP, fmt=fmt)
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if backing:
        raise InputError(f"{source}: image has a backing file {backing!r}; refused (commit it into a "
                         f"standalone image first)", image_id=image_id, step=STEP)
    if data_file:
        raise InputError(f"{source}: qcow2 has an external data file {data_file!r}; refused",
                         image_id=image_id, step=STEP)
    size = os.path.getsize(source)
    if fmt == "raw" and size % 512:
        raise InputError(f"{source}: raw image size {size} is not a multiple of 512; truncated?",
                         image_id=image_id, step=STEP)
    check = qemu_img.check(source, fmt, image_id=image_id, step=STEP)
    facts.update({
        "virtual_size": info["virtual-size"],
        "actual_size": info.get("actual-size"),
        "backing_file": None,
        "check": check,
    })
    if fmt == "vmdk":
        _require_extents(source, facts, image_id)
    return facts


def _require_extents(source: Path, facts: dict[str, Any], image_id: str | None) -> None:
    """Flat extents must be as long as the descriptor says (a truncated flat extent reads as zeros)."""
    for ext in facts["extents"]:
        p = Path(ext["path"])
        if not p.is_file():
            raise InputError(f"{source}: VMDK extent {ext['file']!r} is missing", image_id=image_id,
                             step=STEP)
        if ext["type"].upper() in ("FLAT", "VMFS") and p.stat().st_size < ext["sectors"] * 512:
            raise InputError(f"{source}: VMDK extent {ext['file']!r} is truncated: {p.stat().st_size} bytes, "
                             f"descriptor says {ext['sectors'] * 512}", image_id=image_id, step=STEP)


def guest_facts(source: Path, fmt: str, image_id: str | None, *, force_tcg: bool) -> dict[str, Any]:
    """One read-only appliance launch: OS, version, control set, partition table, firmware, drivers."""
    facts: dict[str, Any] = {"os": "unknown"}
    with Guestfish([(source, fmt, True)], image_id=image_id, step=STEP, force_tcg=force_tcg) as g:
        facts["appliance_seconds"] = round(g.launch_seconds, 1)
        devices = g.lines("list-devices")
        dev = devices[0] if devices else "/dev/sda"
        try:
            ptable = g("part-get-parttype", dev).strip()
        except ToolError:
            ptable = "none"
        facts["partition_table"] = ptable
        roots = g.lines("inspect-os")
        facts["firmware"] = _firmware(g, dev, ptable)
        if not roots:
            return facts
        root = roots[0]
        ostype = g("inspect-get-type", root).strip()
        facts["os_type"] = ostype
        facts["root"] = root
        facts["product_name"] = g("inspect-get-product-name", root).strip()
        facts["major_version"] = int(g("inspect-get-major-version", root).strip() or 0)
        facts["minor_version"] = int(g("inspect-get-minor-version", root).strip() or 0)
        facts["arch"] = g("inspect-get-arch", root).strip()
        facts["distro"] = g("inspect-get-distro", root).strip()
        hostname = g("inspect-get-hostname", root).strip()
        facts["hostname"] = None if hostname in ("", "unknown") else hostname
        if ostype != "windows":
            return facts
        facts["os"] = "windows"
        facts["systemroot"] = g("inspect-get-windows-systemroot", root).strip()
        facts["current_control_set"] = g("inspect-get-windows-current-control-set", root).strip()
        g("mount-ro", root, "/")
        drivers = {}
        for name in guest.DRIVER_FILES:
            try:
                path = g("case-sensitive-path", f"{facts['systemroot']}/System32/drivers/{name}").strip()
                drivers[name] = g("is-file", path).strip() == "true"
            except ToolError:
                drivers[name] = False
        facts["drivers_present"] = drivers
        facts["services"] = _services(g, facts, image_id)
    return facts


def _services(g: Guestfish, facts: dict[str, Any], image_id: str | None) -> dict[str, int | None]:
    """Start value of the storage/virtio services in the live control set (None: service absent),
    read from a local copy of the SYSTEM hive (same appliance)."""
    try:
        path = g("case-sensitive-path", f"{facts['systemroot']}/System32/config/SYSTEM").strip()
    except ToolError:
        return {}
    with tempfile.TemporaryDirectory(prefix="gho2kvm-inspect-") as td:
        local = Path(td) / "SYSTEM"
        try:
            g("download", path, str(local))
        except ToolError:
            return {}
        ccs = facts.get("current_control_set") or "ControlSet001"
        return hive.service_starts(local, ccs, guest.SERVICES, image_id=image_id, step=STEP)


def _firmware(g: Guestfish, dev: str, ptable: str) -> str:
    """``uefi`` when a GPT EFI system partition holds a Windows boot manager, else ``bios``."""
    if ptable != "gpt":
        return "bios"
    for part in g.lines("list-partitions"):
        try:
            num = g("part-to-partnum", part).strip()
            guid = g("part-get-gpt-type", dev, num).strip().upper()
        except ToolError:
            continue
        if guid != ESP_GUID:
            continue
        try:
            g("mount-ro", part, "/")
            try:
                path = g("case-sensitive-path", "/EFI/Microsoft/Boot/bootmgfw.efi").strip()
                if g("is-file", path).strip() == "true":
                    return "uefi"
            finally:
                g("umount-all")
        except ToolError:
            continue
    return "bios"


def inspect(source: Path, image_id: str | None, *, force_tcg: bool, fmt: str | None = None) -> dict[str, Any]:
    facts: dict[str, Any] = {"image_id": image_id, "source": str(source)}
    facts.update(disk_facts(source, image_id, fmt))
    facts.update(guest_facts(source, facts["format"], image_id, force_tcg=force_tcg))
    facts["qemu_img_version"] = qemu_img.version()
    return facts
