"""The registry-merge step: every registry change lands in a qcow2 overlay, never in the source.

1. Parse every change set first (built-in ``mergeide`` chosen by the Windows version, user ``.reg``
   files): a malformed file fails here with its line number, before anything is written.
2. Map ``CurrentControlSet`` to the live ``ControlSet00N`` and split by hive.
3. Create ``overlay.qcow2`` (backing file = the source, backing format explicit) under a temp name.
4. ONE appliance launch: download each hive, merge locally with hivex, upload, remount, download
   again and compare every value written. A mismatch fails the step.
5. Rename the overlay into place.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline import atomic, disksig, log
from pipeline.config import BUILTIN_REGISTRY, ImageConfig
from pipeline.errors import InputError, ToolError
from pipeline.registry import builtin, hive, regfile
from pipeline.registry.plan import HIVE_PREFIXES, plan
from pipeline.registry.verify import verify
from pipeline.tools import qemu_img
from pipeline.tools.guestfs import Guestfish

STEP = "registry-merge"
OVERLAY = "overlay.qcow2"


def collect_ops(image: ImageConfig, facts: dict[str, Any]) -> list[regfile.Op]:
    """Every change, parsed and validated, in config order."""
    ops: list[regfile.Op] = []
    for entry in image.registry:
        if entry in BUILTIN_REGISTRY:
            ops += builtin.builtin_ops(entry, facts.get("major_version"), facts.get("minor_version"))
        else:
            try:
                ops += regfile.parse_file(entry)
            except regfile.RegSyntaxError as e:
                e.image_id, e.step = image.id, STEP
                raise InputError(e.message, image_id=image.id, step=STEP) from None
    return ops


def driver_warnings(facts: dict[str, Any]) -> list[str]:
    missing = [n for n, ok in (facts.get("drivers_present") or {}).items() if not ok]
    if not missing:
        return []
    return [f"MergeIDE needs {', '.join(missing)} in System32\\drivers, missing in the guest: "
            f"the guest may still fail with 0x7B until they are copied from the Windows CD"]


def registry_merge(image: ImageConfig, facts: dict[str, Any], source: Path, source_fmt: str, *,
                   force_tcg: bool, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the step; return the receipt's ``result`` part. Writes ``<image_dir>/overlay.qcow2``."""
    say = progress or (lambda _msg: None)
    if facts.get("os") != "windows":
        msg = f"guest OS not recognised as Windows ({facts.get('os_type', 'unknown')}): no registry changes"
        log.get().warning("registry-merge skipped", reason=msg)
        return {"skipped": True, "overlay": None, "warnings": [msg], "hives": {}}
    ops = collect_ops(image, facts)
    ccs = facts.get("current_control_set") or "ControlSet001"
    planned = plan(ops, ccs)
    warnings = driver_warnings(facts)
    for w in warnings:
        log.get().warning("driver missing", detail=w)
    image.image_dir.mkdir(parents=True, exist_ok=True)
    overlay = image.image_dir / OVERLAY
    atomic.remove_stale_temps(image.image_dir, OVERLAY)
    hives_done: dict[str, Any] = {}
    with atomic.temporary_path(overlay) as tmp, tempfile.TemporaryDirectory(prefix="gho2kvm-hive-") as td:
        qemu_img.create_overlay(tmp, source, source_fmt, image_id=image.id, step=STEP)
        say("launching appliance")
        with Guestfish([(tmp, "qcow2", False)], image_id=image.id, step=STEP, force_tcg=force_tcg) as g:
            signature = disksig.reconcile(g, image, facts, step=STEP)
            warnings += signature["warnings"]
            root = facts.get("root") or g.lines("inspect-os")[0]
            g("mount", root, "/")
            config_dir = g("case-sensitive-path", f"{facts.get('systemroot', '/Windows')}/System32/config")
            config_dir = config_dir.strip()
            guest_paths: dict[str, str] = {}
            for name, hive_ops in planned.items():
                say(f"merging {name}")
                guest = g("case-sensitive-path", f"{config_dir}/{name}").strip()
                if g("is-file", guest).strip() != "true":
                    raise InputError(f"hive {guest} not found in the guest", image_id=image.id, step=STEP)
                local = Path(td) / name
                g("download", guest, str(local))
                hive.apply_reg(local, regfile.to_reg_text(hive_ops), HIVE_PREFIXES[name],
                               image_id=image.id, step=STEP)
                g("upload", str(local), guest)
                guest_paths[name] = guest
            # read back from the overlay through a fresh mount
            g("umount-all")
            g("mount-ro", root, "/")
            say("verifying")
            for name, hive_ops in planned.items():
                back = Path(td) / f"{name}.readback"
                g("download", guest_paths[name], str(back))
                mismatches = verify(back, hive_ops, image_id=image.id, step=STEP)
                if mismatches:
                    raise ToolError(f"{name} hive read back from the overlay differs: "
                                    f"{'; '.join(mismatches[:5])}", tool="hivex", argv=[],
                                    returncode=None, image_id=image.id, step=STEP)
                hives_done[name] = {
                    "guest_path": guest_paths[name],
                    "keys": sum(1 for op in hive_ops if op.is_key),
                    "values": sum(1 for op in hive_ops if not op.is_key),
                    "verified": True,
                }
            appliance_seconds = round(g.launch_seconds, 1)
            libguestfs_version = _libguestfs_version(g)
    return {
        "skipped": False,
        "overlay": str(overlay),
        "backing_file": str(source),
        "backing_format": source_fmt,
        "current_control_set": ccs,
        "registry_variant": builtin.variant_for(facts.get("major_version"), facts.get("minor_version")),
        "hives": hives_done,
        "disk_signature": signature,
        "warnings": warnings,
        "appliance_launches": 1,
        "appliance_seconds": appliance_seconds,
        "qemu_img_version": qemu_img.version(),
        "libguestfs_version": libguestfs_version,
    }


def _libguestfs_version(g: Guestfish) -> str | None:
    """``1.48.6`` from the running appliance's ``version`` (no extra launch); None if unreadable."""
    try:
        fields = dict(ln.split(":", 1) for ln in g.lines("version") if ":" in ln)
        return ".".join(fields[k].strip() for k in ("major", "minor", "release"))
    except (ToolError, KeyError):
        return None
