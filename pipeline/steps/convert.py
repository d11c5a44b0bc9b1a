"""The convert step: overlay (or source) → final disk in one ``qemu-img convert`` pass, then verified."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core import atomic, log
from pipeline.core.config import ImageConfig
from pipeline.tools import qemu_img

STEP = "convert"


def convert_disk(image: ImageConfig, src: Path, src_fmt: str, *,
                 progress: Callable[[float], None] | None = None) -> dict[str, Any]:
    final = image.final_disk
    final.parent.mkdir(parents=True, exist_ok=True)
    atomic.remove_stale_temps(final.parent, final.name)
    last = [-10.0]

    def on_progress(pct: float) -> None:
        if pct - last[0] >= 10 or pct >= 100:
            last[0] = pct
            log.get().info("convert progress", percent=round(pct, 1))
        if progress:
            progress(pct)

    timings: dict[str, float] = {}
    with atomic.temporary_path(final) as tmp:
        t0 = time.monotonic()
        qemu_img.convert(src, src_fmt, tmp, image.format, image_id=image.id, step=STEP, progress=on_progress)
        timings["convert_seconds"] = round(time.monotonic() - t0, 2)
        if image.verify:
            t0 = time.monotonic()
            qemu_img.compare(src, src_fmt, tmp, image.format, image_id=image.id, step=STEP)
            timings["verify_seconds"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()  # leaving the block: fsync of the temp, rename, fsync of the folder
    timings["sync_seconds"] = round(time.monotonic() - t0, 2)
    return {"input": str(src), "input_format": src_fmt, "output": str(final), "format": image.format,
            "verified": image.verify, "qemu_img_version": qemu_img.version(), **timings}
