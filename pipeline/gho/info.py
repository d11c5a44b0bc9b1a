"""``read_info``: what an image holds, without writing anything."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.gho.catalogue import check_catalogues
from pipeline.gho.disk import parse_mbr
from pipeline.gho.errors import MAX_FILES_LISTED, Advisories
from pipeline.gho.fat import FatSection
from pipeline.gho.header import HEADER_SIZE, SUBTYPE_NAMES
from pipeline.gho.image import Image, generation
from pipeline.gho.ntfs import NtfsSection


@dataclass
class PartitionInfo:
    index: int
    offset: int
    subtype: int
    kind: str  # "fat" (file-aware FAT), "sector", "ntfs", "ext"
    fs: str | None
    label: str | None
    hidden_sectors: int | None
    size: int | None
    files: int | None = None
    directories: int | None = None
    file_bytes: int | None = None
    records: int | None = None
    record_kinds: dict[str, int] | None = None
    catalogue_files: int | None = None
    geometry: dict[str, int] | None = None
    runs_placed: dict[str, int] | None = None  # NTFS: runs placed by the walk / from the $MFT
    notes: list[str] = field(default_factory=list)


@dataclass
class GhoInfo:
    path: str
    stream_size: int
    generation: str
    compression: str
    compression_code: int
    image_type: str
    image_type_code: int
    password: bool
    image_id: int
    description: str
    spans: list[str]
    descriptor_size: int
    first_structure: int
    trailer_offset: int | None
    track0_bytes: int
    mbr_partitions: list[dict[str, int]]
    partitions: list[PartitionInfo]
    warnings: list[str] = field(default_factory=list)
    warnings_total: int = 0
    files: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_info(path: str | Path, *, password: str | None = None, list_files: bool = False,
              strict: bool = False) -> GhoInfo:
    """Describe the image at ``path`` (nothing is written).

    Without ``password`` an encrypted image's FAT sections are listed without their contents.
    ``list_files`` adds every file and directory of the file-aware sections.
    """
    with Image(path, strict=strict) as img:
        if password is not None:
            img.unlock(password)
        layout = img.layout
        parts = []
        files: list[dict[str, Any]] = []
        img.volumes_cache = img.volumes()
        ntfs_notes = Advisories()  # not advisory checks: what the NTFS rebuild will do (bounded list)
        for v in img.volumes_cache:
            sec = layout.sections[v.index]
            p = PartitionInfo(v.index + 1, v.offset, sec.subtype, v.kind, v.fs, v.label, v.hidden_sectors,
                              v.size, notes=list(v.notes))
            if sec.kind == "fat":
                p.records = sec.records
            if isinstance(v.reader, FatSection):
                fl = v.reader.files()
                p.files, p.file_bytes = len(fl), sum(n.size for n in fl)
                p.directories = sum(1 for n in v.reader.nodes if n.is_dir)
                p.record_kinds = {f"0x{k:02x}": c for k, c in sorted(v.reader.kind_counts.items())}
                g = v.reader.geometry
                assert g is not None
                p.geometry = {
                    "bytes_per_sector": g.bytes_per_sector, "sectors_per_cluster": g.sectors_per_cluster,
                    "reserved_sectors": g.reserved_sectors, "num_fats": g.num_fats,
                    "fat_sectors": g.fat_sectors,
                    "root_entries": g.root_entries, "root_cluster": g.root_cluster,
                    "total_sectors": g.total_sectors, "clusters": g.clusters,
                }
                if list_files:
                    for n in v.reader.nodes[:max(0, MAX_FILES_LISTED - len(files))]:
                        d = n.to_dict()
                        d["partition"] = v.index + 1
                        files.append(d)
            elif isinstance(v.reader, NtfsSection):
                _ntfs_info(v.reader, p, ntfs_notes)
            parts.append(p)
        counts = iter(check_catalogues(img))
        for p in parts:
            if p.kind == "fat":
                p.catalogue_files = next(counts)
        track0 = img.track0() if layout.track0 else b""
        mbr = [
            {"type": e.ptype, "start_lba": e.start, "sectors": e.sectors, "active": int(e.status == 0x80)}
            for e in (parse_mbr(track0[:512]) or []) if e.ptype
        ]
        h = img.header
        itype = {0: "file-aware", 1: "sector"}.get(h.image_type, f"unknown-0x{h.image_type:02x}")
        return GhoInfo(
            path=str(img.path), stream_size=img.stream.size, generation=generation(layout.descriptor_size),
            compression=h.compression_name, compression_code=h.compression, image_type=itype,
            image_type_code=h.image_type, password=h.password, image_id=h.image_id, description=h.description,
            spans=[p.name for p in img.spans], descriptor_size=layout.descriptor_size,
            first_structure=layout.first_structure, trailer_offset=layout.trailer_start,
            track0_bytes=len(track0),
            mbr_partitions=mbr, partitions=parts, warnings=img.advisories.summary() + ntfs_notes.summary(),
            warnings_total=img.advisories.total + ntfs_notes.total, files=files if list_files else None,
        )


def _ntfs_info(reader: NtfsSection, p: PartitionInfo, warnings: Advisories) -> None:
    """Walk an NTFS section's packet stream (no output) for its counts (§11.4)."""
    sm = reader.walk()
    p.label, p.files, p.directories, p.file_bytes = sm.label, sm.files, sm.directories, sm.file_bytes
    p.records = sm.records
    p.geometry = reader.facts()
    p.runs_placed = {"deterministic": sm.runs_deterministic, "heuristic": sm.runs_heuristic}
    p.notes.append(f"{sm.runs_deterministic} runs placed by the stream walk, {sm.runs_heuristic} from the "
                   f"$MFT (heuristic), {sm.sparse_runs} sparse")
    p.notes += [f"{name} (MFT record {n}): data not stored, reads as zeros"
                for n, name in sorted(sm.skipped_names.items())]
    if sm.runs_heuristic:
        warnings.add(f"partition {p.index}: {sm.runs_heuristic} runs are placed by the heuristic")
    for m in sm.warnings:
        warnings.add(f"partition {p.index}: {m}")


#: MBR partition type bytes and the file systems they usually hold (for the shelf scan's comments)
MBR_TYPES = {0x01: "FAT12", 0x04: "FAT16", 0x06: "FAT16", 0x0E: "FAT16", 0x0B: "FAT32", 0x0C: "FAT32",
             0x07: "NTFS", 0x05: "extended", 0x0F: "extended", 0x83: "Linux", 0x82: "Linux swap",
             0x27: "recovery (NTFS)", 0x12: "recovery", 0xEE: "GPT"}


def _gib(sectors: int) -> str:
    n = sectors * 512
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class GhoSummary:
    """What the header, the trailer, its catalogues and track 0 say (no partition data; ``gho2kvm scan``)."""

    path: str
    generation: str
    compression: str
    image_type: str
    password: bool
    description: str
    spans: list[str]
    missing_span: str | None  # the continuation file that is missing (the set does not end with a trailer)
    first_partition: str | None  # subtype of the first section ("fat", "ntfs", "sector", "ext")
    mbr_partitions: list[str]  # from track 0 of a disk image (unless encrypted)
    catalogue_files: list[int | None]  # one per FAT file-aware partition
    stream_size: int


def read_summary(path: str | Path, listing: dict[str, Path] | None = None) -> GhoSummary:
    """The header, span set, trailer and catalogues of an image: record headers and a few small bodies
    (track 0, the catalogues), never a partition's data. Raises :class:`GhoError` for a broken image;
    a set whose last file is missing gives ``missing_span`` instead. ``listing``: see
    :func:`pipeline.gho.spans.find_spans`."""
    from pipeline.gho.catalogue import iter_catalogue
    from pipeline.gho.records import Layout
    from pipeline.gho.sector import decode_track0
    from pipeline.gho.spans import span_display_name

    with Image(path, listing=listing) as img:
        h = img.header
        itype = {0: "file-aware", 1: "sector"}.get(h.image_type, f"unknown-0x{h.image_type:02x}")
        out = GhoSummary(str(img.path), "?", h.compression_name, itype, h.password, h.description,
                         [p.name for p in img.spans], None, None, [], [], img.stream.size)
        w = img.walker
        found = w.find_end_record()
        if not found:
            out.missing_span = span_display_name(img.path, len(img.spans) + 1)
            return out
        limit, first_cat, end_rec = found
        first = w.first_structure_at(HEADER_SIZE + first_cat - limit, limit)
        layout = Layout(first_structure=first)
        out.generation = generation(layout.descriptor_size)
        pos = w.scan_track0(layout, first, limit)
        sub = w.part_header_at(pos)
        out.first_partition = SUBTYPE_NAMES.get(sub, f"unknown-0x{sub:02x}") if sub is not None else None
        if layout.track0 and not h.password:
            for e in parse_mbr(decode_track0(w, layout, img.decoder(), None)[:512]) or []:
                if e.ptype:
                    out.mbr_partitions.append(f"{MBR_TYPES.get(e.ptype, f'type 0x{e.ptype:02x}')} "
                                              f"{_gib(e.sectors)}"
                                              + (" (active)" if e.status == 0x80 else ""))
        w.scan_catalogues(layout, first_cat, end_rec)
        for rec in layout.catalogues:
            try:
                body = img.stream.read(rec.body_offset, rec.length, "a catalogue")
                out.catalogue_files.append(sum(1 for _ in iter_catalogue(body)))
            except ValueError:
                out.catalogue_files.append(None)
        return out
