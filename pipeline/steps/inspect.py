"""The inspect step: what the source image is (qemu-img), whether it is safe, and what guest it holds.

Safety first: VMDK descriptors are read by us *before* qemu-img opens anything, and an extent or
backing/data file outside the source's own folder (absolute path, ``..``, a symlink pointing out) is
refused — the class of bug in OpenStack's OSSA-2023-002. Then one libguestfs appliance launch gathers
the guest facts, read-only.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import vmdk
from pipeline.core import log
from pipeline.core.choices import Step
from pipeline.core.config import DISK_FORMAT_BY_SUFFIX
from pipeline.core.errors import InputError, ToolError
from pipeline.core.receipts import RUNTIME
from pipeline.core.safeio import escape, file_kind, regular_file
from pipeline.guest import disksig, fixes, ntfsgeom
from pipeline.guest import hypervisor_tools as hvtools
from pipeline.guest import network as guest_net
from pipeline.model import windows as guest
from pipeline.model.hives import HiveFacts
from pipeline.model.inspect import InspectFacts
from pipeline.registry import builtin, edits, hivefile, regf, regfile
from pipeline.registry.hivefile import HIVES
from pipeline.registry.plan import plan
from pipeline.tools import hivex, qemu_img
from pipeline.tools.guestfs import Appliances, Guestfish, inspect_session, lines

STEP = Step.INSPECT
SAFE_VMDK_TYPES = {
    "monolithicSparse", "monolithicFlat", "twoGbMaxExtentSparse", "twoGbMaxExtentFlat",
    "streamOptimized", "vmfs", "vmfsSparse", "vmfsThin", "seSparse",
}
ESP_GUID = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
_QEMU_MAX_EXTENT_NAME = 511  # qemu truncates longer names, which would open a different file


@dataclass(frozen=True)
class InspectInput:
    """What inspect reads: one disk (the source, or ghost-convert's output)."""

    disk: Path
    image_id: str
    fmt: str | None = None  # None: from the file name's suffix
    force_tcg: bool = field(default=False, metadata=RUNTIME)
    #: where the appliance launch log and the hand-over to registry-merge live (None: no sharing)
    image_dir: Path | None = field(default=None, metadata=RUNTIME)
    #: ``windows``: a disk without a Windows system fails the image (config ``expect_os``); ``any``
    expect_os: str = field(default="windows", metadata=RUNTIME)


def format_of(path: Path) -> str:
    fmt = DISK_FORMAT_BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise InputError(f"{path}: unsupported source type; expected one of "
                         f"{', '.join(DISK_FORMAT_BY_SUFFIX)}")
    return fmt


def vmdk_safety(path: Path, image_id: str | None) -> dict[str, Any]:
    """Check a VMDK descriptor before any tool opens it: known create type, no parent, every extent
    a regular file inside the source's folder (stat only) and as long as the descriptor says."""
    desc = vmdk.parse_descriptor(path, image_id=image_id, step=STEP)
    name = escape(path, 300)
    if desc.create_type not in SAFE_VMDK_TYPES:
        raise InputError(f"{name}: VMDK createType {escape(desc.create_type, 40)!r} refused; expected one of "
                         f"{', '.join(sorted(SAFE_VMDK_TYPES))}", image_id=image_id, step=STEP)
    folder = path.parent.resolve()
    extents = []
    for ext in desc.extents:
        target = _inside(folder, ext.file) if len(ext.file.encode()) <= _QEMU_MAX_EXTENT_NAME else None
        if target is None:
            raise InputError(f"{name}: VMDK extent {escape(ext.file, 200)!r} lies outside the image's folder "
                             f"{folder}; refused", image_id=image_id, step=STEP)
        # a sparse VMDK with an embedded descriptor is its own (only) extent: qemu ignores the file name
        # written in the descriptor, which still names the file as it was called when created
        extents.append({"access": ext.access, "sectors": ext.sectors, "type": ext.type, "file": ext.file,
                        "path": str(path.resolve() if desc.embedded else target)})
    if not extents:
        raise InputError(f"{name}: VMDK descriptor lists no extents", image_id=image_id, step=STEP)
    facts = {"create_type": desc.create_type, "extents": extents}
    _require_extents(path, facts, image_id)
    return facts


def _inside(folder: Path, name: str) -> Path | None:
    if not name or os.path.isabs(name) or "\\" in name or ".." in Path(name).parts:
        return None
    target = (folder / name).resolve()
    if target.parent != folder and folder not in target.parents:
        return None
    return target


def disk_facts(source: Path, image_id: str | None, fmt: str | None = None) -> dict[str, Any]:
    """qemu-img facts plus the safety checks; never writes anything. Nothing but a regular file is
    handed to qemu-img, and a VMDK's descriptor or a qcow2's header is checked by us first."""
    fmt = fmt or format_of(source)
    facts: dict[str, Any] = {"format": fmt}
    regular_file(source, "source image", image_id=image_id, step=STEP)
    if fmt == "vmdk":
        facts.update(vmdk_safety(source, image_id))
    elif fmt == "qcow2":
        qcow2_safety(source, image_id)
    size = os.path.getsize(source)
    if fmt == "raw" and size % 512:
        raise InputError(f"{source}: raw image size {size} is not a multiple of 512; truncated?",
                         image_id=image_id, step=STEP)
    source_claims_check(source, fmt, image_id)
    info = qemu_img.info(source, image_id=image_id, step=STEP, fmt=fmt)
    backing = info.get("backing-filename") or info.get("full-backing-filename")
    data_file = (info.get("format-specific") or {}).get("data", {}).get("data-file")
    if backing:
        raise InputError(f"{source}: image has a backing file {backing!r}; refused (commit it into a "
                         f"standalone image first)", image_id=image_id, step=STEP)
    if data_file:
        raise InputError(f"{source}: qcow2 has an external data file {data_file!r}; refused",
                         image_id=image_id, step=STEP)
    if int(info.get("virtual-size") or 0) < 2 * 512:
        raise InputError(f"{escape(source, 300)}: virtual size {info.get('virtual-size')} bytes: too small "
                         "for a disk; refused", image_id=image_id, step=STEP)
    check = qemu_img.check(source, fmt, image_id=image_id, step=STEP)
    facts.update({
        "virtual_size": info["virtual-size"],
        "actual_size": info.get("actual-size"),
        "backing_file": None,
        "check": check,
    })
    if fmt == "vmdk":
        _require_extents(source, facts, image_id, after_tools=True)
    return facts


def qcow2_safety(path: Path, image_id: str | None) -> None:
    """A qcow2 naming a backing or external data file is refused from its header, before qemu-img
    would open that other file (which might be a FIFO, a device or outside the folder)."""
    name = escape(path, 300)
    hdr = vmdk.head(path, 65536)
    if hdr[:4] != b"QFI\xfb":
        return  # not qcow2 after all: qemu-img info -f qcow2 says so
    if len(hdr) < 72:
        raise InputError(f"{name}: qcow2 header truncated ({len(hdr)} bytes)", image_id=image_id, step=STEP)
    version, backing_off, backing_len = struct.unpack_from(">IQI", hdr, 4)
    if backing_off:
        backing = hdr[backing_off:backing_off + min(backing_len, 1023)].decode("utf-8", "replace")
        raise InputError(f"{name}: image has a backing file {escape(backing, 300)!r}; refused (commit it "
                         "into a standalone image first)", image_id=image_id, step=STEP)
    if version < 3 or len(hdr) < 104:
        return
    incompatible = struct.unpack_from(">Q", hdr, 72)[0]
    if not incompatible & 4:  # bit 2: external data file
        return
    data = "?"
    pos = struct.unpack_from(">I", hdr, 100)[0]
    while pos + 8 <= len(hdr):
        ext_type, ext_len = struct.unpack_from(">II", hdr, pos)
        if ext_type == 0:
            break
        if ext_type == 0x44415441:  # "DATA": the data file name
            data = hdr[pos + 8:pos + 8 + ext_len].decode("utf-8", "replace")
            break
        pos += 8 + (ext_len + 7) // 8 * 8
    raise InputError(f"{name}: qcow2 has an external data file {escape(data, 300)!r}; refused",
                     image_id=image_id, step=STEP)


def _require_extents(source: Path, facts: dict[str, Any], image_id: str | None, *,
                     after_tools: bool = False) -> None:
    """Every extent is an existing regular file (stat only: a FIFO or device is never opened) and a
    flat extent is as long as the descriptor says (a truncated flat extent reads as zeros)."""
    for ext in facts["extents"]:
        p = Path(ext["path"])
        try:
            kind = file_kind(os.stat(p).st_mode)
        except OSError:
            if not after_tools:
                continue  # qemu-img names what it misses in its own words
            raise InputError(f"{escape(source, 300)}: VMDK extent {escape(ext['file'], 200)!r} is missing",
                             image_id=image_id, step=STEP) from None
        if kind is not None:
            raise InputError(f"{escape(source, 300)}: VMDK extent {escape(ext['file'], 200)!r} is {kind}, "
                             "expected a regular file; refused", image_id=image_id, step=STEP)
        if ext["type"].upper() in ("FLAT", "VMFS") and p.stat().st_size < ext["sectors"] * 512:
            raise InputError(f"{source}: VMDK extent {ext['file']!r} is truncated: {p.stat().st_size} bytes, "
                             f"descriptor says {ext['sectors'] * 512}", image_id=image_id, step=STEP)


def guest_facts(source: Path, fmt: str, image_id: str | None, *, force_tcg: bool,
                appliances: Appliances | None = None) -> dict[str, Any]:
    """One appliance launch, which only reads: OS, version, control set, partition table, firmware,
    drivers. A Windows guest's appliance is left for registry-merge (:func:`inspect_session`)."""
    facts: dict[str, Any] = {"os": "unknown"}
    with inspect_session(source, fmt, appliances=appliances, image_id=image_id, step=STEP,
                         force_tcg=force_tcg) as g:
        facts["appliance_seconds"] = round(g.launch_seconds, 1)
        # commands in batches (one guestfish process each, see Guestfish.batch)
        devices, roots = map(lines, g.batch(("list-devices",), ("inspect-os",)))
        dev = devices[0] if devices else "/dev/sda"
        try:
            ptable = g("part-get-parttype", dev).strip()
        except ToolError:  # no partition table (a blank or superfloppy disk)
            ptable = "none"
        facts["partition_table"] = ptable
        facts["firmware"] = _firmware(g, dev, ptable)
        if not roots:
            return facts
        root = roots[0]
        ostype, product, major, minor, arch, distro, hostname = (v.strip() for v in g.batch(
            *((f"inspect-get-{what}", root) for what in
              ("type", "product-name", "major-version", "minor-version", "arch", "distro", "hostname"))))
        facts["os_type"] = ostype
        facts["root"] = root
        facts["product_name"] = product
        facts["major_version"] = int(major or 0)
        facts["minor_version"] = int(minor or 0)
        facts["arch"] = arch
        facts["distro"] = distro
        facts["hostname"] = None if hostname in ("", "unknown") else hostname
        if ostype != "windows":
            return facts
        facts["os"] = "windows"
        sysroot, ccs, _mounted = g.batch(("inspect-get-windows-systemroot", root),
                                         ("inspect-get-windows-current-control-set", root),
                                         ("mount-ro", root, "/"))
        facts["systemroot"], facts["current_control_set"] = sysroot.strip(), ccs.strip()
        facts["drivers_present"] = _drivers(g, facts["systemroot"])
        facts["disk_signature"] = disksig.read_in_guest(g, dev, facts["systemroot"], image_id=image_id,
                                                        step=STEP)
        with tempfile.TemporaryDirectory(prefix="gho2kvm-inspect-") as td:
            local = fetch_hives(g, facts["systemroot"], Path(td), image_id=image_id, step=STEP)
            facts.update(hive_facts(local, facts, image_id))
        geometry = ntfsgeom.read_in_guest(g, root)
        facts["boot_geometry"] = geometry.to_dict() if geometry is not None else None
        g.offer()
    return facts


@dataclass(frozen=True)
class LocalHive:
    """One hive downloaded from the guest: the facts, and the checked (replayed when dirty) local
    copy to read (None when the hive is absent or damaged)."""

    facts: HiveFacts
    path: Path | None


def fetch_hives(g: Guestfish, systemroot: str, td: Path, *, image_id: str | None, step: str,
                names: Sequence[str] = HIVES) -> dict[str, LocalHive]:
    """Download hives ``names`` and their ``.LOG``/``.LOG1``/``.LOG2`` from ``System32/config``
    (one listing, one download batch), examine each (:func:`pipeline.registry.hivefile.examine`:
    base block, log replay, format check), let hivex walk the checked copy, and return them. A
    hive that is missing is left out; a damaged one has ``facts.damaged`` and no path."""
    try:
        config = g("case-sensitive-path", f"{systemroot}/System32/config").strip()
        listing = g.lines("ls", config)
    except ToolError:
        return {}
    by_lower = {n.lower(): n for n in listing}
    wanted: dict[str, tuple[str, list[str]]] = {}
    for name in names:
        real = by_lower.get(name.lower())
        if real is not None:
            wanted[name] = (real, hivefile.log_names(name, listing))
    files = [f for real, logs in wanted.values() for f in (real, *logs)]
    kinds = g.batch(*(("is-file", f"{config}/{f}") for f in files), check=False)
    regular = {f for f, k in zip(files, kinds, strict=True) if k.strip() == "true"}
    g.batch(*(("download", f"{config}/{f}", str(td / f"g-{f}")) for f in files if f in regular))
    out: dict[str, LocalHive] = {}
    for name, (real, logs) in wanted.items():
        if real not in regular:
            continue
        ex = hivefile.examine_files(name, td / f"g-{real}", [td / f"g-{lg}" for lg in logs if lg in regular],
                                    guest_path=f"{config}/{real}")
        facts = replace(ex.facts, logs_found=tuple(lg for lg in logs if lg in regular))
        path = None
        if ex.data is not None:
            path = hivefile.write_copy(ex, td / f"{name}.checked")
            problem = hivex.walk(path, image_id=image_id, step=step)
            if problem is not None:
                facts, path = replace(facts, damaged=problem), None
        out[name] = LocalHive(facts, path)
    return out


def hive_facts(local: Mapping[str, LocalHive], facts: Mapping[str, Any],
               image_id: str | None) -> dict[str, Any]:
    """Inspect's facts from the checked hive copies: the hives' own facts, the storage services'
    Start values, and the snapshot ``gho2kvm plan`` counts the built-in edits on. Each reader is a
    plain function of ``(local hive path, control set)``."""
    ccs = facts.get("current_control_set") or "ControlSet001"
    out: dict[str, Any] = {"hives": [h.facts.to_dict() for h in local.values()]}
    for h in local.values():
        if h.facts.damaged:
            log.get().warning("hive damaged", detail=h.facts.damage_line(image_id or "?"))
        elif h.facts.warning:
            log.get().warning("hive dirty", detail=h.facts.warning)
    system = local.get("SYSTEM")
    guest_ops: list[regfile.Op] = []
    if system is not None and system.path is not None:
        out["services"] = hivefile.service_starts(system.path, ccs, guest.SERVICES)
        found, guest_ops = system_hive_facts(system.path, ccs, image_id,
                                             major=facts.get("major_version") or 0,
                                             minor=facts.get("minor_version") or 0)
        out.update(found)
    probe = InspectFacts(os="windows", major_version=facts.get("major_version"),
                         minor_version=facts.get("minor_version"), arch=facts.get("arch"))
    planned = plan([*guest_ops, *builtin.snapshot_ops(probe)], ccs)
    out["registry_snapshot"] = {
        name: edits.snapshot(regf.Hive(h.path.read_bytes()), planned.get(name, []))
        for name, h in local.items() if h.path is not None}
    return out


def _drivers(g: Guestfish, systemroot: str) -> dict[str, bool]:
    """Which of :data:`guest.DRIVER_FILES` are files in ``System32/drivers`` (two batches; a path
    that cannot be resolved is no file)."""
    names = list(guest.DRIVER_FILES)
    paths = [p.strip() for p in g.batch(*(("case-sensitive-path", f"{systemroot}/System32/drivers/{n}")
                                          for n in names), check=False)]
    found = [p for p in paths if p]
    is_file = dict(zip(found, (v.strip() == "true" for v in g.batch(*(("is-file", p) for p in found),
                                                                     check=False)), strict=True))
    return {n: bool(p) and is_file[p] for n, p in zip(names, paths, strict=True)}


def system_hive_facts(local: Path, ccs: str, image_id: str | None, *, major: int = 0,
                      minor: int = 0) -> tuple[dict[str, Any], list[regfile.Op]]:
    """The guest's network interfaces, other hypervisors' tools and boot settings from a LOCAL
    (checked, replayed) SYSTEM hive file and its live set (as JSON values for InspectFacts), and every
    op the guest fixes could make with them (every option on: what ``gho2kvm plan`` counts on)."""
    settings = fixes.boot_settings(local, ccs, image_id=image_id, step=STEP)
    tools = hvtools.installed(local, ccs, image_id=image_id, step=STEP)
    net = guest_net.interfaces(local, ccs, image_id=image_id, step=STEP)
    every = fixes.GuestOptions(vmware_tools="disable", network_restore="static")
    ops = fixes.guest_fixes(settings, tools, net, every, major=major, minor=minor,
                            image_id=image_id or "?").ops
    return ({"network": [i.to_dict() for i in net], "hypervisor_tools": [t.to_dict() for t in tools],
             "boot_settings": settings.to_dict()}, list(ops))


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


def inspect_image(inp: InspectInput) -> InspectFacts:
    """The inspect step: disk facts and safety checks, then one appliance launch (left to
    registry-merge when the run shares appliances)."""
    source, image_id = inp.disk, inp.image_id
    facts: dict[str, Any] = {"image_id": image_id, "source": str(source)}
    facts.update(disk_facts(source, image_id, inp.fmt))
    if inp.expect_os == "windows":
        blank_disk_check(source, facts, image_id)
    appliances = Appliances(inp.image_dir) if inp.image_dir is not None else None
    facts.update(guest_facts(source, facts["format"], image_id, force_tcg=inp.force_tcg,
                             appliances=appliances))
    if inp.expect_os == "windows":
        expected_os_check(source, facts, image_id)
    facts["qemu_img_version"] = qemu_img.version()
    return InspectFacts.from_dict(facts)


def source_claims_check(source: Path, fmt: str, image_id: str | None) -> None:
    """A source that cannot be the disk it claims to be is refused from its own bytes, before any
    tool opens it (:func:`pipeline.steps.sources.source_problem`): empty, too small, differencing
    VHD/VHDX, sparse VMDK tables or streamOptimized grains past the end, flat extents too short."""
    from pipeline.steps.sources import extents_problem, source_problem

    problem = source_problem(source, fmt) or (extents_problem(source) if fmt == "vmdk" else None)
    if problem:
        raise InputError(f"{escape(source, 300)}: {problem}; refused", image_id=image_id, step=STEP)


def blank_disk_check(source: Path, facts: dict[str, Any], image_id: str | None) -> None:
    """A raw disk whose first MiB is all zeros (no boot sector, no partition table) holds no Windows:
    refused before an appliance is launched (``expect_os: any`` accepts it)."""
    if facts.get("format") != "raw":
        return
    fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        head = os.pread(fd, 1 << 20, 0)
    finally:
        os.close(fd)
    if not head.strip(b"\0"):
        raise InputError(f"{escape(source, 300)}: the disk's first {len(head)} bytes are all zeros "
                         f"(no partition "
                         "table, no boot sector): no Windows to migrate; refused (set expect_os: any to "
                         "migrate it anyway)", image_id=image_id, step=STEP)


def expected_os_check(source: Path, facts: dict[str, Any], image_id: str | None) -> None:
    """``os unknown`` on a disk that should hold Windows and cannot hold any system (no partition
    table: blank, or a bare file system) fails the image with one line. A partitioned disk without a
    recognised system goes on, registry-merge skipped with a warning (a data disk)."""
    if facts.get("os") == "windows" or facts.get("os_type") or facts.get("partition_table") != "none":
        return
    raise InputError(f"{escape(source, 300)}: no Windows found on the disk (os unknown, no partition "
                     "table); refused (set expect_os: any to migrate a disk without Windows)",
                     image_id=image_id, step=STEP)
