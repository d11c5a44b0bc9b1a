"""A ``.gho`` is decoded once and written once: convert *adopts* ghost-convert's disk as the final disk.

The native reader rebuilds the whole disk in the final disk's format, ``<image_dir>/ghost.raw``
(sparse) or ``ghost.qcow2`` (written in place through ``qemu-nbd``), with the boot chain it
synthesises; inspect reads it; registry-merge writes its edits to ``overlay.qcow2`` on top of it. The
copy path would then write the whole disk a second time (``qemu-img convert`` overlay → final disk).
When ``ghost.<format>`` sits on the final disk's filesystem, convert instead:

1. renames ``ghost.<format>`` (or Ghost's flat extent, below) to the final disk's temp name
   (``.<id>.<format>.tmp-<pid>`` next to it);
2. commits the overlay into it (``qemu-img commit -d``, the overlay's backing redirected to the temp
   through ``--image-opts``: only the overlay's clusters are written, ``overlay.qcow2`` is not changed);
3. with ``verify``, compares the overlay (over the temp) with the temp on the overlay's own clusters
   (``qemu-img map``; everywhere else the overlay reads the temp itself): every edited cluster landed;
4. fsyncs and renames the temp to the final disk (atomic); its receipt records ``result.adopted``
   with ghost-convert's ``run_id``.

The ``exe`` backend (Ghost's own executable) is adopted the same way when Ghost wrote a flat VMDK
whose descriptor ``ghost.vmdk`` has exactly one extent, ``RW <n> FLAT "ghost-s001.vmdk" 0`` covering
the whole virtual size (checked from the descriptor and the file's length by
:mod:`pipeline.tools.ghost_exe`, recorded as ``result.raw_extent``): that extent IS a raw disk.
``ghost.vmdk_type: auto`` asks Ghost for it when the final disk is raw and no split is asked
(:meth:`~pipeline.core.config.GhostConfig.for_format`). Inspect and registry-merge read the descriptor
as before (the overlay's backing is ``ghost.vmdk``; the commit redirects it to the extent's new name);
after adoption the descriptor names a missing extent, which nothing reads any more.

*The adoptable disk* of ghost-convert's receipt below is ``ghost.<format>`` (native, output ``disk``) or
that extent (exe, raw, the output named ``ghost-s001.vmdk``); every other output of the receipt (the
descriptor) must stay as stamped.

Bytes written by the migration ≈ the disk once + the overlay twice (merge, commit). Not covered, and
taking the copy path unchanged: the exe backend with qcow2 output or a sparse or split VMDK (Ghost
writes a VMDK, convert copies it: the disk is written twice), a receipt whose disk is in another format
than the final disk (an older run), another filesystem.

The rule (one place; GhostConvert.stale_reason and Inspect.fingerprint call it):

* While the adoptable disk exists under its name it is exactly ghost-convert's output (its receipt
  stamps it). Nothing writes it in place: convert renames it away *before* committing into it.
* ghost-convert with its disk gone is complete only if it was **adopted**: convert's receipt names
  ghost-convert's ``run_id`` in ``result.adopted`` and inspect, registry-merge and convert are each
  current on their own (fingerprint + outputs, the final disk's stamp included). Then the final disk
  holds exactly ghost-convert's disk + this overlay, and a re-run is a no-op.
* Anything else re-runs from ghost-convert (decode again), because the adopted disk carries the old
  edits and cannot serve as a pristine disk: the final disk deleted or changed (a booted guest), a
  changed ``.reg`` or virtio tree (registry-merge stale), a changed convert setting (verify, format), a
  kill between the rename and convert's receipt (the disk gone, no receipt naming this run).
* A kill at any moment leaves the final disk either absent, the previous complete one (whose convert
  receipt no longer matches the new upstream run, so nothing downstream trusts it), or the new complete
  one; a half-committed disk only ever lives under the temp name, removed by the next convert.
* Inspect's fingerprint stamps the adoptable disk (as its disk, or as an extent of Ghost's VMDK) by
  the stamp in ghost-convert's receipt (identical to the file's while it exists), so it does not
  change when the file is adopted.

The user's source and spans are only read (by ghost-convert); nothing here opens them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core import atomic, paths, receipts
from pipeline.core.choices import Step
from pipeline.core.config import ImageConfig
from pipeline.steps.ghost_convert import NATIVE_FORMATS
from pipeline.tools import qemu_img

STEP = Step.CONVERT
DISK = "disk"  # ghost-convert's output name for its disk


def _adoptable(ghost_receipt: dict[str, Any] | None) -> dict[str, Any] | None:
    """The adoptable disk of ghost-convert's receipt: its output stamp with its ``format`` and
    ``output`` (its name among the receipt's outputs), else None (a sparse or split VMDK, none)."""
    if not ghost_receipt:
        return None
    res = ghost_receipt.get("result") or {}
    backend, fmt, extent = res.get("backend"), res.get("disk_format"), res.get("raw_extent")
    if backend == "native" and fmt in NATIVE_FORMATS:
        name = DISK
    elif backend == "exe" and isinstance(extent, str):
        name, fmt = Path(extent).name, "raw"
    else:
        return None
    out = (ghost_receipt.get("outputs") or {}).get(name)
    if not isinstance(out, dict) or not isinstance(out.get("path"), str):
        return None
    if backend == "exe" and out["path"] != extent:
        return None
    return {**out, "format": fmt, "output": name}


def disk_stamp(disk: Path, ghost_receipt: dict[str, Any] | None) -> dict[str, Any]:
    """How a downstream fingerprint stamps a file it reads (a disk, a VMDK's extent): the adoptable
    disk by the stamp ghost-convert's receipt recorded (equal to the file's while it exists,
    unchanged once adopted), anything else by :func:`receipts.file_stamp`."""
    out = _adoptable(ghost_receipt)
    if out is None or Path(out["path"]).resolve() != Path(disk).resolve():
        return receipts.file_stamp(disk)
    return {"path": str(disk), "size": out.get("size"), "mtime_ns": out.get("mtime_ns")}


def ghost_stale_reason(ghost_receipt: dict[str, Any] | None, fingerprint: dict[str, Any],
                       downstream: Callable[[], list[tuple[str, dict[str, Any] | None, dict[str, Any]]]]
                       ) -> str | None:
    """ghost-convert's staleness under the rule above. ``downstream()`` gives ``(step, receipt,
    fingerprint)`` of inspect, registry-merge and convert (in that order), computed without asking
    their upstream (no recursion)."""
    out = _adoptable(ghost_receipt)
    if ghost_receipt is None or out is None or not receipts.file_stamp(out["path"]).get("missing"):
        return receipts.why_stale(ghost_receipt, fingerprint)
    others = {k: v for k, v in (ghost_receipt.get("outputs") or {}).items() if k != out["output"]}
    why = receipts.why_stale({**ghost_receipt, "outputs": others}, fingerprint)
    if why is not None:
        return why
    chain = downstream()
    conv = chain[-1][1] or {}
    adopted = (conv.get("result") or {}).get("adopted") or {}
    if adopted.get("ghost_run_id") != ghost_receipt.get("run_id"):
        return f"output missing: {out['path']} (not adopted as a final disk)"
    for step, rec, fp in chain:
        w = receipts.why_stale(rec, fp)
        if w is not None:
            return f"its disk became the final disk and {step} must run again ({w}): decode again"
    return None


def why_not(image: ImageConfig, ghost_receipt: dict[str, Any] | None) -> str | None:
    """None when convert can adopt ghost-convert's disk, else the reason it copies instead."""
    out = _adoptable(ghost_receipt)
    if out is None:
        return ("ghost-convert wrote no disk convert can adopt (a sparse or split VMDK from Ghost, "
                "or no ghost-convert)")
    if image.format != out["format"]:
        return f"ghost-convert's disk is {out['format']}, the output format {image.format}"
    disk = Path(out["path"])
    now = receipts.file_stamp(disk)
    if now.get("missing") or now.get("size") != out.get("size") or now.get("mtime_ns") != out.get("mtime_ns"):
        return f"{disk} is not ghost-convert's output any more"
    final = image.final_disk
    final.parent.mkdir(parents=True, exist_ok=True)
    if os.stat(disk).st_dev != os.stat(final.parent).st_dev:
        return f"{disk} and {final.parent} are on different filesystems"
    return None


def adopt_disk(image: ImageConfig, ghost_receipt: dict[str, Any], overlay: Path | None, *,
               progress: Callable[[float], None] | None = None,
               committed: Callable[[], None] | None = None) -> dict[str, Any]:
    """Make ghost-convert's disk the final disk (steps 1–4 above); return convert's ``result``.

    ``committed`` is called after the commit (and verify), before the final rename (a test hook).
    """
    out = _adoptable(ghost_receipt)
    assert out is not None
    disk = Path(out["path"])
    final = image.final_disk
    from pipeline.steps.sources import final_disk_free

    final_disk_free(image.id, image.image_dir, final, image.overwrite, STEP)
    atomic.remove_stale_temps(final.parent, final.name)
    timings: dict[str, float] = {}
    ino = os.stat(disk).st_ino
    overlay_bytes = overlay.stat().st_blocks * 512 if overlay is not None else 0
    fmt = out["format"]
    with atomic.temporary_path(final) as tmp:
        os.rename(disk, tmp)  # from here on ghost's disk is gone: only a finished convert makes it adopted
        if overlay is not None:
            t0 = time.monotonic()
            qemu_img.commit_onto(overlay, tmp, fmt, image_id=image.id, step=STEP, progress=progress)
            timings["commit_seconds"] = round(time.monotonic() - t0, 2)
            if image.verify:
                t0 = time.monotonic()
                timings["verify_bytes"] = qemu_img.compare_onto(overlay, tmp, fmt, image_id=image.id,
                                                                step=STEP)
                timings["verify_seconds"] = round(time.monotonic() - t0, 2)
        if committed is not None:
            committed()
        paths.record_output(image.image_dir, final, tmp)  # the final disk is gho2kvm's (its inode)
    if progress:
        progress(100.0)
    return {"input": str(overlay or disk), "input_format": "qcow2" if overlay is not None else fmt,
            "output": str(final), "format": image.format, "verified": image.verify and overlay is not None,
            "qemu_img_version": qemu_img.version(), **timings,
            "adopted": {"from": str(disk), "ghost_run_id": ghost_receipt.get("run_id"), "inode": ino,
                        "overlay": str(overlay) if overlay is not None else None,
                        "overlay_allocated": overlay_bytes}}
