"""Rebuild a whole disk from an image: sparse, atomic, bounded memory (a raw file, or any disk the
caller opens: :data:`OpenDisk`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import atomic
from pipeline.gho.bootchain import disk_geometry, finish_boot_chain, mbr_code
from pipeline.gho.catalogue import check_catalogues
from pipeline.gho.disk import (
    SECTOR,
    Placement,
    TableError,
    extended_start,
    fs_partition_type,
    plan_logicals,
    plan_synthetic,
    primary_partitions,
    table_sectors,
)
from pipeline.gho.errors import MAX_FILES_LISTED, Advisories, GhoError
from pipeline.gho.fat import FatSection
from pipeline.gho.image import EXT_UNSUPPORTED, Image, Volume, generation
from pipeline.gho.ntfs import NtfsSection
from pipeline.gho.sector import SectorSection
from pipeline.gho.sparse import Bounded, Disk, FileDisk, OutsideDisk, SparseWriter

Progress = Callable[[int, int], None]
#: ``open_disk(temp_path, size)``: a new disk of ``size`` bytes at ``temp_path``, closed (complete) on
#: leaving the block; the default is a sparse raw file
OpenDisk = Callable[[Path, int], AbstractContextManager[Disk]]


@contextlib.contextmanager
def raw_file(path: Path, size: int) -> Iterator[Disk]:
    """A new sparse raw file of ``size`` bytes (read-write: the rebuild reads back what it wrote)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        yield FileDisk(fd, size)
    finally:
        os.close(fd)


@dataclass
class ExtractedPartition:
    index: int
    kind: str
    fs: str | None
    label: str | None
    start_lba: int
    sectors: int
    partition_type: int
    logical: bool
    files: int = 0
    directories: int = 0
    file_bytes: int = 0
    runs_placed: dict[str, int] | None = None  # NTFS: runs placed by the walk / from the $MFT


@dataclass
class ExtractResult:
    source: str
    output: str
    disk_size: int
    bytes_written: int
    generation: str
    compression: str
    partitions: list[ExtractedPartition]
    files: list[dict[str, Any]] = field(default_factory=list)
    files_total: int = 0
    warnings: list[str] = field(default_factory=list)
    boot_chain: dict[str, Any] = field(default_factory=dict)  # bootchain.finish_boot_chain's record
    warnings_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _place(img: Image, vols: list[Volume], track0: bytes) -> tuple[list[Placement], bytes | None]:
    """Placements for every volume (same order) and the MBR to keep (None = synthesise)."""
    types = [fs_partition_type(v.fs) for v in vols]
    sizes = [-(-(v.size or 0) // SECTOR) for v in vols]
    prim = primary_partitions(track0[:512]) if track0 else None
    if prim is not None:
        places = [Placement(e.start, max(e.sectors, sizes[k]), e.ptype)
                  for k, e in enumerate(prim[:len(vols)])]
        extra = vols[len(places):]
        if extra:
            ext = extended_start(track0[:512])
            if ext is None:
                raise GhoError(f"{img.name}: {len(vols)} partition sections but the MBR in track 0 lists "
                               f"{len(prim)} partitions and no extended partition")
            places += plan_logicals(ext, [(v.hidden_sectors or 0, sizes[v.index], types[v.index])
                                          for v in extra])
        return places, track0[:512]
    vols_spec = [(v.hidden_sectors or 0, sizes[k], types[k]) for k, v in enumerate(vols)]
    return plan_synthetic(vols_spec), None


def _boot_sector(v: Volume) -> bytes:
    if isinstance(v.reader, FatSection):
        return v.reader.boot or b""
    if isinstance(v.reader, SectorSection):
        return v.reader.boot_sector()
    return b""


def _tables(img: Image, vols: list[Volume], places: list[Placement], mbr: bytes | None,
            geometry: tuple[int, int]) -> list[tuple[int, bytes]]:
    """The MBR/EBR sectors; a partition that does not fit an MBR is refused with one line."""
    try:
        return table_sectors(places, img.header.image_id, mbr, geometry)
    except TableError as e:
        v = vols[e.partition - 1]
        raise GhoError(f"{img.name}: partition {e.partition} (offset {v.offset}): {e.field} {e.value} does "
                       f"not fit an MBR partition entry: expected the partition to start and end below "
                       f"2^32 = {1 << 32} sectors (2 TiB); its boot sector says hidden sectors "
                       f"{v.hidden_sectors}, size {-(-(v.size or 0) // SECTOR)} sectors") from None


def check_output(out: str | Path, inputs: list[Path], name: str, *, force: bool = False) -> None:
    """Refuse an output that would replace the user's files (the one path rule,
    :func:`pipeline.core.paths.check_output`): the image or one of its spans (by realpath and inode),
    a folder (or a name ending in ``/``), an existing file unless ``force``, anything not a regular file.
    Runs before any work starts."""
    from pipeline.core.paths import PathRefused
    from pipeline.core.paths import check_output as rule

    try:
        rule(str(out), inputs, force=force)
    except PathRefused as e:
        raise GhoError(f"{name}: {e.lines[0]}") from None
    if os.path.islink(out) and not os.path.exists(out):
        raise GhoError(f"{name}: output {out} is a dangling symbolic link; refusing to replace it")


def extract(path: str | Path, out_path: str | Path, *, password: str | None = None,
            progress: Progress | None = None, strict: bool = False,
            open_disk: OpenDisk = raw_file, threads: int | None = None,
            force: bool = False) -> ExtractResult:
    """Rebuild the disk held by the image at ``path`` as ``out_path`` (a sparse raw file, or what
    ``open_disk`` makes).

    ``strict`` turns advisory mismatches (checksums, catalogue, header copies) into refusals.
    ``threads``: blocks decoded at once (:mod:`pipeline.gho.pool`; None: every CPU this process may use);
    the output is the same for every value.
    """
    out = Path(out_path)
    with Image(path, strict=strict, threads=threads) as img:
        check_output(out_path, img.stream.paths, img.name, force=force)
        img.unlock(password)
        layout = img.layout
        for sec in layout.sections:
            if sec.kind == "ext":
                raise GhoError(f"{img.name}: partition {sec.index + 1} (offset {sec.header_offset}): "
                               f"{EXT_UNSUPPORTED}")
        vols = img.volumes_cache = img.volumes()
        check_catalogues(img)
        for v in vols:
            if isinstance(v.reader, FatSection):
                v.reader.allocate()
        track0 = img.track0()
        places, mbr = _place(img, vols, track0)
        spans = sorted((p.start, p.start + p.sectors) for p in places)
        for (s1, e1), (s2, _e2) in zip(spans, spans[1:], strict=False):
            if s2 < e1:
                raise GhoError(f"{img.name}: partitions overlap (LBA {s1}-{e1 - 1} and {s2}); "
                               "cannot place them on one disk")
        if spans and track0 and spans[0][0] * SECTOR < len(track0):
            raise GhoError(f"{img.name}: track 0 ({len(track0)} bytes) overlaps the first partition "
                           f"at LBA {spans[0][0]}")
        disk_sectors = max([p.start + p.sectors for p in places] + [-(-len(track0) // SECTOR)])
        tables = _tables(img, vols, places, mbr, disk_geometry([_boot_sector(v) for v in vols[:1]]))
        code = mbr_code(mbr)  # before any output: a missing mbr.bin fails here
        total = img.stream.size

        def step(done: int) -> None:
            if progress:
                progress(min(done, total), total)

        parts = []
        files: list[dict[str, Any]] = []
        nfiles = 0
        ntfs_notes = Advisories()  # what the NTFS rebuild did (not advisory checks; bounded list)
        size = disk_sectors * SECTOR
        with atomic.temporary_path(out) as tmp, open_disk(tmp, size) as opened:
            disk = Bounded(opened)
            where = "track 0 and the partition tables"  # what is being written (for OutsideDisk)
            try:
                w = SparseWriter(disk)
                if track0:
                    w.write_at(0, track0)
                for lba, data in tables:
                    w.write_at(lba * SECTOR, data)
                for v, p in zip(vols, places, strict=True):
                    where = f"partition {v.index + 1} (LBA {p.start}, {p.sectors} sectors)"
                    reader = v.reader
                    assert reader is not None
                    part = ExtractedPartition(v.index + 1, v.kind, v.fs, v.label, p.start, p.sectors,
                                              p.ptype, p.logical)
                    if isinstance(reader, FatSection):
                        reader.write(w, p.start * SECTOR, step)
                        for n in reader.nodes[:max(0, MAX_FILES_LISTED - len(files))]:
                            d = n.to_dict()
                            d["partition"] = v.index + 1
                            files.append(d)
                        nfiles += len(reader.nodes)
                        fl = reader.files()
                        part.files, part.file_bytes = len(fl), sum(n.size for n in fl)
                        part.directories = sum(1 for n in reader.nodes if n.is_dir)
                    elif isinstance(reader, NtfsSection):
                        sm = reader.write(w, p.start * SECTOR, step)
                        part.label = sm.label
                        part.files, part.directories = sm.files, sm.directories
                        part.file_bytes = sm.file_bytes
                        part.runs_placed = {"deterministic": sm.runs_deterministic,
                                            "heuristic": sm.runs_heuristic}
                        if sm.runs_heuristic:
                            ntfs_notes.add(f"partition {v.index + 1}: {sm.runs_heuristic} of "
                                            f"{sm.runs_heuristic + sm.runs_deterministic} runs placed from "
                                            "the $MFT by cluster count (heuristic), not by the stream")
                        for m in reader.warnings:
                            ntfs_notes.add(f"partition {v.index + 1}: {m}")
                    elif isinstance(reader, SectorSection):
                        reader.write(w, p.start * SECTOR, step)
                    parts.append(part)
                where = "the boot chain"
                chain = finish_boot_chain(disk, places, code)
            except OutsideDisk as e:
                raise GhoError(f"{img.name}: {where}: {e}") from None
        step(total)
        return ExtractResult(
            source=str(img.path), output=str(out), disk_size=size,
            bytes_written=w.written,
            generation=generation(layout.descriptor_size), compression=img.header.compression_name,
            partitions=parts, files=files, files_total=nfiles,
            warnings=img.advisories.summary() + ntfs_notes.summary(),
            warnings_total=img.advisories.total + ntfs_notes.total, boot_chain=chain,
        )
