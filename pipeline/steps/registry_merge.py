"""The registry-merge step: every registry change lands in a qcow2 overlay, never in the source.

1. Parse every change set first (built-in ``mergeide`` chosen by the Windows version, user ``.reg``
   files): a malformed file fails here with its line number, before anything is written.
2. Map ``CurrentControlSet`` to the live ``ControlSet00N`` and split by hive.
3. Create ``overlay.qcow2`` (backing file = the source, backing format explicit) under a temp name.
4. ONE appliance (inspect's, when it left one for this image; else a launch): download each hive,
   merge locally with hivex, upload, remount, download again and compare every value written. A
   mismatch fails the step.
5. Rename the overlay into place.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import atomic, log
from pipeline.core.choices import Step
from pipeline.core.config import BUILTIN_REGISTRY, ImageConfig
from pipeline.core.errors import InputError, ToolError
from pipeline.core.receipts import HASHED, NAMED, PREFLIGHT, RUNTIME, UPSTREAM
from pipeline.guest import disksig, fixes, ntfsgeom, virtio
from pipeline.model import windows as guest
from pipeline.model.guest import static_warning, tools_warning
from pipeline.model.inspect import InspectFacts
from pipeline.model.results import MergeResult
from pipeline.registry import builtin, edits, hive, regf, regfile
from pipeline.registry.plan import (
    HIVE_PREFIXES,
    control_set_findings,
    control_set_name,
    plan,
    remap_control_sets,
)
from pipeline.registry.verify import verify
from pipeline.steps.inspect import fetch_hives
from pipeline.tools import qemu_img
from pipeline.tools.guestfs import Appliances, Guestfish, overlay_session

STEP = Step.REGISTRY_MERGE
OVERLAY = "overlay.qcow2"


@dataclass(frozen=True)
class BuiltinSet:
    """A built-in change set (``mergeide``) and the hash of the data files it is built from."""

    builtin: str
    data: str


@dataclass(frozen=True)
class MergeInput:
    """Everything registry-merge reads: the config's registry part, the inspect facts and the disk."""

    image_id: str
    image_dir: Path = field(metadata=NAMED)
    registry: tuple[BuiltinSet | Path, ...] = field(default=(), metadata=HASHED)
    registry_remap_controlset: bool = False
    virtio: Path | None = None  # the virtio-win ISO or folder
    rebuilt_natively: bool = False  # the disk signature is ours (native GHO reader): fix it, else warn
    disk_bus: str = field(default="ide", metadata=PREFLIGHT)
    nic_model: str | None = field(default=None, metadata=PREFLIGHT)
    guest: fixes.GuestOptions = field(default_factory=fixes.GuestOptions)  # pipeline.guest.fixes
    facts: InspectFacts = field(default_factory=InspectFacts, metadata=UPSTREAM)
    disk: Path = field(default=Path(), metadata=UPSTREAM)
    disk_format: str = field(default="raw", metadata=UPSTREAM)
    force_tcg: bool = field(default=False, metadata=RUNTIME)

    @classmethod
    def from_config(cls, image: ImageConfig, facts: InspectFacts, disk: Path | None = None,
                    disk_format: str | None = None, *, force_tcg: bool = False) -> MergeInput:
        """The input for ``image`` (``disk`` defaults to the source, its format to the facts')."""
        return cls(
            image_id=image.id, image_dir=image.image_dir,
            registry=tuple(BuiltinSet(r, builtin.data_hash()) if r in BUILTIN_REGISTRY else Path(r)
                           for r in image.registry),
            registry_remap_controlset=image.registry_remap_controlset,
            virtio=image.virtio.drivers if image.virtio is not None else None,
            rebuilt_natively=disksig.rebuilt_natively(image), disk_bus=image.disk_bus,
            nic_model=image.nic_model, facts=facts, disk=disk or image.source,
            guest=fixes.GuestOptions(keep_autoreboot=image.keep_autoreboot,
                                     keep_cpu_drivers=image.keep_cpu_drivers,
                                     keep_boot_geometry=image.keep_boot_geometry,
                                     vmware_tools=image.vmware_tools, network_restore=image.network_restore),
            disk_format=disk_format or facts.format, force_tcg=force_tcg)


def collect_ops(inp: MergeInput) -> tuple[list[regfile.Op], list[str]]:
    """Every change, parsed and validated, in config order, and the warnings about user files:
    keys in a ``ControlSet00N`` that is not the live one (rewritten to the live one with
    ``registry_remap_controlset``), unknown top-level SYSTEM keys."""
    facts = inp.facts
    ops: list[regfile.Op] = []
    warnings: list[str] = []
    ccs = facts.control_set
    for entry in inp.registry:
        if isinstance(entry, BuiltinSet):
            ops += builtin.builtin_ops(entry.builtin, facts.major_version, facts.minor_version, boot_bus(inp))
            continue
        try:
            file_ops = regfile.parse_file(str(entry))
        except regfile.RegSyntaxError as e:
            raise InputError(e.message, image_id=inp.image_id, step=STEP) from None
        for op, msg, numbered in control_set_findings(file_ops, ccs):
            if numbered and inp.registry_remap_controlset:
                msg = (f"{op.where()}: key [{op.key}]: {op.key.split(chr(92))[2]} remapped to the live "
                       f"{control_set_name(ccs)} (registry_remap_controlset)")
            warnings.append(msg)
        if inp.registry_remap_controlset:
            file_ops = remap_control_sets(file_ops, ccs)
        ops += file_ops
    # the guest fixes first: a user's .reg file has the last word
    return list(guest_plan(inp).ops) + ops, warnings


def guest_plan(inp: MergeInput) -> fixes.FixPlan:
    """The guest fixes of :mod:`pipeline.guest.fixes` for this image (none for a non-Windows guest)."""
    f = inp.facts
    if not f.is_windows:
        return fixes.FixPlan()
    system = f.hive("SYSTEM")
    if system is not None and system.damaged:  # they are gho2kvm's, not the user's: skipped, said
        return fixes.FixPlan(warnings=(f"image '{inp.image_id}': guest fixes (AutoReboot, drivers, network, "
                                       f"tools) skipped: the SYSTEM hive is damaged",))
    return fixes.guest_fixes(f.boot_settings, f.hypervisor_tools, f.network, inp.guest,
                             major=f.major_version or 0, minor=f.minor_version or 0, image_id=inp.image_id)


def guest_warnings(inp: MergeInput) -> list[str]:
    """What the user should know about the guest's network and other hypervisors' tools, for this
    config, and the fixes' own notes."""
    f = inp.facts
    found: list[str | None] = [
        static_warning(f.network, restore=inp.guest.network_restore == "static"),
        tools_warning(f.hypervisor_tools, disable_vmware=inp.guest.vmware_tools == "disable")]
    geometry = ntfsgeom.warning(f)
    if geometry is not None:
        fixed = ntfsgeom.needs_fix(f) and not inp.guest.keep_boot_geometry
        found.append(f"{geometry}: " + ("the boot sector gets the table's" if fixed else "left as it is"))
    return [w for w in found if w] + list(guest_plan(inp).warnings)


def boot_bus(inp: MergeInput) -> str:
    """The bus the built-in fix sets prepare the guest to boot from: the decided bus, and for
    virtio the configured bus it falls back to when no viostor is found (``ide`` for virtio)."""
    bus = readiness(inp).disk_bus
    if bus == "virtio":
        return inp.disk_bus if inp.disk_bus != "virtio" else "ide"
    return bus


def readiness(inp: MergeInput, installed: list[str] | None = None) -> guest.Readiness:
    """Bus/NIC decision for this image (refusals and warnings included); see :func:`guest.decide`."""
    tree = str(inp.virtio) if inp.virtio is not None else None
    return guest.decide(inp.image_id, inp.disk_bus, inp.nic_model, inp.facts, virtio_tree=tree,
                        installed=installed)


def plan_warnings(image: ImageConfig, facts: InspectFacts) -> tuple[list[str], list[str]]:
    """``(refusals, warnings)`` known from the config and inspect facts alone, before registry-merge
    runs (``gho2kvm plan``, and the start of registry-merge)."""
    if not facts.is_windows:
        return [], []
    inp = MergeInput.from_config(image, facts)
    ready = readiness(inp)
    ops, reg_warnings = collect_ops(inp)
    hive_warnings = [f"image '{image.id}': {h.warning}" for h in facts.hives if h.warning and not h.damaged]
    return ([*ready.refusals, *hive_refusals(inp.image_id, facts, edited_hives(inp, ops))],
            [*ready.warnings, *reg_warnings, *driver_warnings(facts), *hive_warnings,
             *guest_warnings(inp)])


def edited_hives(inp: MergeInput, ops: list[regfile.Op]) -> list[str]:
    """The hives registry-merge would edit: those of the planned ops, and SYSTEM for a virtio
    switch-over (its ops are known only once the drivers are found). Refuses bad keys."""
    names = list(plan(ops, inp.facts.control_set))
    if inp.virtio is not None and guest.virtio_switch_supported(inp.facts) and "SYSTEM" not in names:
        names.append("SYSTEM")
    return names


def hive_refusals(image_id: str, facts: InspectFacts, names: list[str]) -> list[str]:
    """One line per hive the changes would edit (``names``) that inspect found damaged."""
    out = []
    for name in names:
        h = facts.hive(name)
        if h is not None and h.damaged:
            out.append(h.damage_line(image_id))
    return out


def plan_edits(image: ImageConfig, facts: InspectFacts) -> list[str]:
    """``gho2kvm plan``'s counts of what registry-merge would add, change and keep in each hive,
    from inspect's snapshot (``unknown``: keys inspect did not read, e.g. a user's ``.reg``)."""
    if not facts.is_windows or not image.registry:
        return []
    inp = MergeInput.from_config(image, facts)
    ops, _ = collect_ops(inp)
    snaps = facts.registry_snapshot or {}
    out = []
    for name, hive_ops in plan(ops, facts.control_set).items():
        acct = edits.account(hive_ops, edits.SnapshotView(snaps.get(name, {})))
        out.append(f"image '{image.id}': {name} hive: {edits.summary(acct.counts())}"
                   + ("" if name in snaps else " (inspect recorded nothing of this hive)"))
    return out


def driver_warnings(facts: InspectFacts) -> list[str]:
    present = facts.drivers_present or {}
    missing = [n for n in builtin.required_drivers() if n in present and not present[n]]
    if not missing:
        return []
    return [f"MergeIDE needs {', '.join(missing)} in System32\\drivers, missing in the guest: "
            f"the guest may still fail with 0x7B until they are copied from the Windows CD"]


def registry_merge(inp: MergeInput, *, progress: Callable[[str], None] | None = None) -> MergeResult:
    """Run the step. Writes ``<image_dir>/overlay.qcow2``."""
    say = progress or (lambda _msg: None)
    facts, source, source_fmt = inp.facts, inp.disk, inp.disk_format
    image_id, image_dir = inp.image_id, inp.image_dir
    if not facts.is_windows:
        msg = f"guest OS not recognised as Windows ({facts.os_type or 'unknown'}): no registry changes"
        log.get().warning("registry-merge skipped", reason=msg)
        return MergeResult(skipped=True, overlay=None, warnings=(msg,), hives={})
    ready = readiness(inp)
    ready.raise_refusals(image_id, STEP)  # before anything is written
    ops, reg_warnings = collect_ops(inp)
    ccs = facts.control_set
    refused = hive_refusals(image_id, facts, edited_hives(inp, ops))  # bad keys refused here too
    if refused:
        raise InputError(refused[0], image_id=image_id, step=STEP)
    for w in reg_warnings:
        log.get().warning("registry file", detail=w)
    warnings = [*reg_warnings, *driver_warnings(facts)]
    for w in warnings[len(reg_warnings):]:
        log.get().warning("driver missing", detail=w)
    fix = guest_plan(inp)
    for w in guest_warnings(inp):
        log.get().warning("guest", detail=w)
        warnings.append(w)
    tree = inp.virtio if inp.virtio is not None and guest.virtio_switch_supported(facts) else None
    drives: list[tuple[Path, str, bool]] = []
    if tree is not None and virtio.is_iso(tree):
        drives.append((tree, "raw", True))
    image_dir.mkdir(parents=True, exist_ok=True)
    overlay = image_dir / OVERLAY
    atomic.remove_stale_temps(image_dir, OVERLAY)
    hives_done: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gho2kvm-hive-") as td:  # noqa: SIM117 - keeps the body's indent
        with overlay_session(overlay, source, source_fmt, drives, appliances=Appliances(image_dir),
                             image_id=image_id, step=STEP, force_tcg=inp.force_tcg, say=say) as g:
            signature = disksig.reconcile(g, facts, image_id=image_id, rebuilt_natively=inp.rebuilt_natively,
                                         step=STEP)
            warnings += signature["warnings"]
            geometry = ntfsgeom.reconcile(g, facts, keep=inp.guest.keep_boot_geometry)  # before the mount
            drivers = _virtio_fetch(g, tree, facts, Path(td), image_id) if tree is not None else {}
            planned = plan([*ops, *(op for d in drivers for op in builtin.virtio_ops(d, facts))], ccs)
            root = facts.root or g.lines("inspect-os")[0]
            g("mount", root, "/")
            installed = _virtio_install(g, drivers, facts) if drivers else {}
            guest_files = _write_guest_files(g, fix.files, facts, image_id)
            local = fetch_hives(g, facts.systemroot or "/Windows", Path(td), image_id=image_id, step=STEP,
                                names=list(planned))
            accounts: dict[str, edits.Accounting] = {}
            for name, hive_ops in planned.items():
                got = local.get(name)
                if got is None:
                    raise InputError(f"hive {name} not found in the guest's System32/config",
                                     image_id=image_id,
                                     step=STEP)
                if got.path is None:
                    raise InputError(got.facts.damage_line(image_id), image_id=image_id, step=STEP)
                if got.facts.warning:
                    warnings.append(f"image '{image_id}': {got.facts.warning}")
                say(f"merging {name}")
                view = edits.RegfView(regf.Hive(got.path.read_bytes()))
                acct = accounts[name] = edits.account(hive_ops, view)
                if acct.write:
                    hive.apply_reg(got.path, regfile.to_reg_text(acct.write), HIVE_PREFIXES[name],
                                   image_id=image_id, step=STEP)
            # only a hive that changes is uploaded: a dirty hive nothing is written to keeps its
            # logs for Windows to replay; an uploaded one is clean and newer than every log entry
            changed = [n for n, a in accounts.items() if a.write]
            paths = {n: local[n].path for n in changed}
            g.batch(*(("upload", str(paths[n]), local[n].facts.guest_path) for n in changed))
            # read back from the overlay through a fresh mount
            say("verifying")
            g.batch(("umount-all",), ("mount-ro", root, "/"),
                    *(("download", local[n].facts.guest_path, str(Path(td) / f"{n}.readback"))
                      for n in changed))
            for name, acct in accounts.items():
                if acct.write:
                    back = Path(td) / f"{name}.readback"
                    mismatches = verify(back, acct.write, image_id=image_id, step=STEP)
                    if mismatches:
                        raise ToolError(f"{name} hive read back from the overlay differs: "
                                        f"{'; '.join(mismatches[:5])}", tool="hivex", argv=[],
                                        returncode=None, image_id=image_id, step=STEP)
                hf = local[name].facts
                hives_done[name] = {
                    "guest_path": hf.guest_path,
                    "keys": sum(1 for op in acct.write if op.is_key),
                    "values": sum(1 for op in acct.write if not op.is_key),
                    "verified": True,
                    "written": bool(acct.write),
                    "dirty": hf.dirty, "logs_found": list(hf.logs_found),
                    "entries_replayed": hf.entries_replayed, "values_recovered": hf.values_recovered,
                    "sequence_numbers": [hf.primary_seq, hf.secondary_seq],
                    "replay_stopped": hf.replay_stopped,
                    "counts": acct.counts(),
                    "edits": [e.to_dict() for e in acct.edits],
                }
            _virtio_verify(g, installed, image_id)
            shared = g.launched_by != STEP  # inspect's appliance, taken over: no launch here
            appliance_seconds = 0.0 if shared else round(g.launch_seconds, 1)
            libguestfs_version = _libguestfs_version(g)
    warnings += readiness(inp, installed=list(installed)).virtio_warnings
    return MergeResult(
        skipped=False,
        overlay=overlay,
        backing_file=source,
        backing_format=source_fmt,
        current_control_set=ccs,
        registry_variant=builtin.variant_for(facts.major_version, facts.minor_version),
        hives=hives_done,
        disk_signature=signature,
        virtio={"drivers": str(inp.virtio), "installed": installed} if inp.virtio else None,
        guest_changes=fix.changes,
        guest_files=tuple(guest_files),
        boot_geometry=geometry,
        warnings=tuple(warnings),
        appliance_launches=0 if shared else 1,
        appliance_shared=shared,
        appliance_seconds=appliance_seconds,
        qemu_img_version=qemu_img.version(),
        libguestfs_version=libguestfs_version,
    )


def _virtio_fetch(g: Guestfish, tree: Path, facts: InspectFacts, td: Path,
                  image_id: str) -> dict[str, dict[str, str]]:
    """Find this guest's viostor/netkvm in the tree and copy them to ``td``:
    ``{driver: {"from": path in the tree, "local": local copy, "sha256": ...}}``."""
    if virtio.is_iso(tree):
        iso_dev = g.lines("list-devices")[1]
        g("mount-ro", iso_dev, "/")
        try:
            found = virtio.find_drivers(g.lines("find", "/"), facts)
            for driver, rel in found.items():
                g("download", "/" + rel.lstrip("/"), str(td / f"{driver}.sys"))
        finally:
            g("umount-all")
    else:
        found = virtio.find_drivers(virtio.list_folder(tree, image_id=image_id, step=STEP), facts)
        for driver, rel in found.items():
            shutil.copyfile(tree / rel, td / f"{driver}.sys")
    return {d: {"from": rel, "local": str(td / f"{d}.sys"),
                "sha256": hashlib.sha256((td / f"{d}.sys").read_bytes()).hexdigest()}
            for d, rel in found.items()}


def _virtio_install(g: Guestfish, drivers: dict[str, dict[str, str]],
                    facts: InspectFacts) -> dict[str, dict[str, str]]:
    """Upload the driver files into ``System32\\drivers`` of the mounted guest."""
    folder = g("case-sensitive-path", f"{facts.systemroot or '/Windows'}/System32/drivers").strip()
    out = {}
    for driver, info in drivers.items():
        dest = f"{folder}/{driver}.sys"
        g("upload", info["local"], dest)
        out[driver] = {"from": info["from"], "to": dest, "sha256": info["sha256"]}
    return out


def _write_guest_files(g: Guestfish, files: tuple[fixes.GuestFile, ...], facts: InspectFacts,
                       image_id: str) -> list[dict[str, str]]:
    """Write each file below the mounted guest's Windows folder and read its checksum back."""
    out: list[dict[str, str]] = []
    if not files:
        return out
    windir = g("case-sensitive-path", facts.systemroot or "/Windows").strip()
    with tempfile.TemporaryDirectory(prefix="gho2kvm-files-") as td:
        for f in files:
            data = f.text.encode("ascii")
            dest = f"{windir}/{f.path.replace(chr(92), '/')}"
            local = Path(td) / Path(dest).name
            local.write_bytes(data)
            g("mkdir-p", str(Path(dest).parent))
            g("upload", str(local), dest)
            want = hashlib.sha256(data).hexdigest()
            got = g("checksum", "sha256", dest).strip()
            if got != want:
                raise ToolError(f"{dest} read back from the overlay differs (sha256 {got}, expected {want})",
                                tool="guestfish", argv=[], returncode=None, image_id=image_id, step=STEP)
            out.append({"path": dest, "sha256": want, "why": f.why})
    return out


def _virtio_verify(g: Guestfish, installed: dict[str, dict[str, str]], image_id: str) -> None:
    """Read the copied driver files back from the overlay (fresh mount) and compare checksums."""
    for driver, info in installed.items():
        got = g("checksum", "sha256", info["to"]).strip()
        if got != info["sha256"]:
            raise ToolError(f"{driver}.sys read back from the overlay differs (sha256 {got}, "
                            f"expected {info['sha256']})",
                            tool="guestfish", argv=[], returncode=None, image_id=image_id, step=STEP)


def _libguestfs_version(g: Guestfish) -> str | None:
    """``1.48.6`` from the running appliance's ``version`` (no extra launch); None if unreadable."""
    try:
        fields = dict(ln.split(":", 1) for ln in g.lines("version") if ":" in ln)
        return ".".join(fields[k].strip() for k in ("major", "minor", "release"))
    except (ToolError, KeyError):
        return None
