"""The convert step: the disk → final disk in one ``qemu-img convert`` pass, registry-merge's overlay
committed into it, then verified.

With an overlay, the bulk copy reads the disk itself (``base``), not the disk through the overlay: a
qcow2 layer over a VMDK costs ≈ 5 % of a convert, and the overlay holds only the edited clusters, which
``qemu-img commit -d`` then writes into the new disk (the overlay is not changed). ``verify`` compares the
overlay as registry-merge left it (over the disk) with the result, so the copy and the commit are both
checked. The same final-disk = disk + overlay rule is what :mod:`pipeline.steps.adopt` does when the
disk itself can become the final disk."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import atomic, log, paths, space
from pipeline.core.choices import Step
from pipeline.core.receipts import NAMED, RUNTIME, UPSTREAM
from pipeline.model.results import ConvertResult
from pipeline.tools import qemu_img

STEP = Step.CONVERT


@dataclass(frozen=True)
class ConvertInput:
    """The config's output part and the disk to convert (registry-merge's overlay, or the disk
    inspect read when there is none); ``base``: the disk under the overlay (copied, then the overlay
    committed into the copy)."""

    image_id: str
    final_disk: Path = field(metadata=NAMED)
    format: str = "raw"
    verify: bool = True
    src: Path = field(default=Path(), metadata=UPSTREAM)
    src_format: str = field(default="raw", metadata=UPSTREAM)
    base: Path | None = field(default=None, metadata=UPSTREAM)
    base_format: str = field(default="raw", metadata=UPSTREAM)
    image_dir: Path | None = field(default=None, metadata=RUNTIME)  # its marker records the final disk
    overwrite: bool = field(default=False, metadata=RUNTIME)


def convert_disk(inp: ConvertInput, *, progress: Callable[[float], None] | None = None) -> ConvertResult:
    final = inp.final_disk
    src, src_fmt = inp.src, inp.src_format
    if inp.image_dir is not None:
        from pipeline.steps.sources import final_disk_free

        final_disk_free(inp.image_id, inp.image_dir, final, inp.overwrite, STEP)
    final.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(final.parent, final.name)
    copy_from, copy_fmt = (inp.base, inp.base_format) if inp.base is not None else (src, src_fmt)
    needed = qemu_img.needed_bytes(copy_from, copy_fmt, image_id=inp.image_id, step=STEP)
    space.require(final, needed, image_id=inp.image_id, step=STEP)  # before the copy, not half-way
    last = [-10.0]

    def on_progress(pct: float) -> None:
        if pct - last[0] >= 10 or pct >= 100:
            last[0] = pct
            log.get().info("convert progress", percent=round(pct, 1))
        if progress:
            progress(pct)

    verify_s: float | None = None
    commit_s: float | None = None
    with atomic.temporary_path(final) as tmp, space.named(final, needed, image_id=inp.image_id, step=STEP):
        t0 = time.monotonic()
        share = 95.0 if inp.base is not None else 100.0  # the commit's part of the progress
        qemu_img.convert(copy_from, copy_fmt, tmp, inp.format, image_id=inp.image_id, step=STEP,
                         progress=lambda p: on_progress(p * share / 100))
        convert_s = round(time.monotonic() - t0, 2)
        if inp.base is not None:
            t0 = time.monotonic()
            qemu_img.commit_onto(src, tmp, inp.format, image_id=inp.image_id, step=STEP,
                                 progress=lambda p: on_progress(share + p * (100 - share) / 100))
            commit_s = round(time.monotonic() - t0, 2)
        if inp.verify:
            t0 = time.monotonic()
            qemu_img.compare(src, src_fmt, tmp, inp.format, image_id=inp.image_id, step=STEP)
            verify_s = round(time.monotonic() - t0, 2)
        if inp.image_dir is not None:
            paths.record_output(inp.image_dir, final, tmp)  # the final disk is gho2kvm's (its inode)
        t0 = time.monotonic()  # leaving the block: fsync of the temp, rename, fsync of the folder
    return ConvertResult(input=src, input_format=src_fmt, output=final, format=inp.format,
                         verified=inp.verify, qemu_img_version=qemu_img.version(), convert_seconds=convert_s,
                         verify_seconds=verify_s, sync_seconds=round(time.monotonic() - t0, 2),
                         commit_seconds=commit_s)
