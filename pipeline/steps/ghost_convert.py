"""The ghost-convert step: ``.gho`` → ``ghost.vmdk`` (Ghost's own executable) or, with the native
reader (strict: an advisory mismatch stops the migration here), ``ghost.raw`` / ``ghost.qcow2`` in
the final disk's format, so that convert can adopt it (:mod:`pipeline.steps.adopt`): a qcow2 is
written in place through ``qemu-nbd`` (:mod:`pipeline.tools.nbd`), never as a raw copy first."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.choices import DiskFormat, Step, values
from pipeline.core.config import GhostConfig
from pipeline.core.receipts import NAMED
from pipeline.model.results import GhostConvertResult

if TYPE_CHECKING:
    from pipeline.gho.extract import OpenDisk

STEP = Step.GHOST_CONVERT
NATIVE_FORMATS = values(DiskFormat)  # the native reader writes the final disk's format, any of them


@dataclass(frozen=True)
class GhostInput:
    """The image file, its ``.GHS`` spans and the ``ghost`` section of the config."""

    image_id: str
    source: Path
    image_dir: Path = field(metadata=NAMED)  # where the disk is written
    spans: tuple[Path, ...] = ()
    ghost: GhostConfig = field(default_factory=GhostConfig)
    disk_format: str = "raw"  # native backend: the final disk's format (raw | qcow2); exe: vmdk


def ghost_convert(inp: GhostInput, *, progress: Callable[[float], None] | None = None) -> GhostConvertResult:
    say = progress or (lambda _p: None)
    g = inp.ghost
    if g.backend == "exe":
        # local: importing pipeline.gho loads the native reader, which the exe backend does not need
        from pipeline.gho.spans import find_spans
        from pipeline.tools import ghost_exe

        res = ghost_exe.convert(ghost_exe.GhostOptions.of(g), inp.source, inp.image_dir,
                                image_id=inp.image_id, spans_of=find_spans,
                                password=g.password(inp.image_id, STEP), progress=say)
        return GhostConvertResult(disk=inp.image_dir / "ghost.vmdk", disk_format="vmdk", backend="exe",
                                  details=res.to_dict())
    from pipeline.gho import extract

    password = g.password(inp.image_id, STEP)
    fmt = inp.disk_format if inp.disk_format in NATIVE_FORMATS else "raw"
    disk = inp.image_dir / f"ghost.{fmt}"

    def on_progress(done: int, total: int) -> None:
        if total:
            say(100.0 * done / total)

    # strict: an advisory mismatch (checksum, catalogue, header copy) stops the migration here
    native = extract(inp.source, disk, password=password, progress=on_progress, strict=True,
                     open_disk=disk_opener(fmt, image_id=inp.image_id, step=STEP), threads=g.decode_threads)
    for other in NATIVE_FORMATS:  # an earlier run's disk in the other format is not an output any more
        if other != fmt:
            (inp.image_dir / f"ghost.{other}").unlink(missing_ok=True)
    return GhostConvertResult(disk=disk, disk_format=fmt, backend="native", details=native.to_dict())


def disk_opener(fmt: str, *, image_id: str | None, step: str) -> OpenDisk:
    """How the native reader opens a new disk of format ``fmt`` (``pipeline.gho.extract.OpenDisk``): a
    sparse raw file, or a qcow2 written in place through ``qemu-nbd`` (:mod:`pipeline.tools.nbd`)."""
    from pipeline.gho.extract import raw_file

    if fmt == DiskFormat.RAW:
        return raw_file

    def qcow2_file(path: Path, size: int) -> AbstractContextManager[Any]:
        from pipeline.tools import nbd

        return nbd.create_qcow2(path, size, image_id=image_id, step=step)

    return qcow2_file
