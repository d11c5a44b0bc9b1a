"""What an image reads and writes, for the one path rule (:mod:`pipeline.core.paths`), and the checks
that a source can be what it claims to be, made before any appliance (docs/safety.md).

``check_paths(cfg)`` runs in ``validate``, ``plan``, ``migrate`` and ``inspect`` before anything runs;
``claim(cfg, image)`` runs again in every step before it writes (:mod:`pipeline.tasks.base`).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

from pipeline import vmdk
from pipeline.core import paths
from pipeline.core.config import BUILTIN_REGISTRY, Config, ImageConfig
from pipeline.core.errors import InputError, escape
from pipeline.core.paths import Place

SECTOR = 512


def reads(img: ImageConfig) -> list[Place]:
    """Every file the image reads: the source, its spans or extents, .reg files, ISO, drivers."""
    out = [Place(img.id, "source", "the source", img.source)]
    if img.vm is not None:  # a .vmx/.ovf source: its description, beside the disk it names
        out.append(Place(img.id, "source", "the VM's description", img.vm))
    suffix = img.source.suffix.lower()
    try:
        if suffix == ".gho":
            from pipeline.gho.spans import find_spans

            out += [Place(img.id, "source", "a span of the source", s) for s in find_spans(img.source)]
        elif suffix == ".vmdk":
            desc = vmdk.parse_descriptor(img.source)
            if not desc.embedded:
                folder = img.source.parent
                out += [Place(img.id, "source", "an extent of the source",
                              Path(os.path.normpath(folder / e.file)))
                        for e in desc.extents if e.file and not os.path.isabs(e.file)]
    except (InputError, OSError, ValueError):
        pass  # an unreadable descriptor is refused by inspect in its own words
    out += [Place(img.id, "registry", "the .reg file", Path(r)) for r in img.registry
            if r not in BUILTIN_REGISTRY]
    if isinstance(img.cdrom, Path):
        out.append(Place(img.id, "cdrom", "the ISO", img.cdrom))
    if img.virtio is not None:
        out.append(Place(img.id, "virtio.drivers", "the drivers", img.virtio.drivers,
                         folder=img.virtio.drivers.is_dir()))
    return out


def writes(img: ImageConfig) -> list[Place]:
    """Every place the image writes: its work folder, the final disk (and its temp), logs, report."""
    final = img.final_disk
    return [
        Place(img.id, "workdir", "the work folder", img.image_dir, folder=True),
        Place(img.id, "output_dir", "the final disk", final),
        Place(img.id, "output_dir", "the final disk's temp", final.with_name(f".{final.name}.tmp-0")),
        Place(img.id, "workdir", "the logs folder", img.workdir / "logs", folder=True),
        Place(img.id, "workdir", "the report", img.workdir / "report.md"),
        Place(img.id, "workdir", "the report", img.workdir / "report.html"),
    ]


def refusals(cfg: Config, only: str | None = None) -> list[str]:
    """The rule's refusals for ``cfg`` (only those of image ``only`` when given), one line each,
    naming the config file."""
    all_reads = [r for img in cfg.images for r in reads(img)]
    all_reads.append(Place("", "config", "the config", cfg.path.absolute()))
    ws = [w for img in cfg.images for w in writes(img)]
    lines = paths.refusals(ws, all_reads, image_dirs={i.id: i.image_dir for i in cfg.images},
                           overwrite=lambda i: paths.overwrite_allowed(cfg.image(i).overwrite), only=only)
    return [f"{escape(cfg.path, 300)}: {ln}" for ln in lines]


def check_paths(cfg: Config) -> None:
    """Refuse the whole config (exit 2, nothing runs) when any image breaks the path rule."""
    from pipeline.core.config import ConfigError

    lines = refusals(cfg)
    if lines:
        raise ConfigError(lines)


def claim(cfg: Config, img: ImageConfig, step: str) -> None:
    """Before a step of ``img`` writes: the rule again (things may have changed since the config was
    checked), then its work folder made with the marker."""
    lines = refusals(cfg, only=img.id)
    if lines:
        raise paths.PathRefused(lines, image_id=img.id, step=step)
    paths.claim_image_dir(img.image_dir, img.id)


def final_disk_free(img_id: str, image_dir: Path, final: Path, overwrite: bool, step: str) -> None:
    """The final disk may be written: absent, or made by gho2kvm for this image, or ``overwrite``."""
    try:
        st = os.lstat(final)
    except OSError:
        return
    if os.path.isdir(final) or not os.path.isfile(final) and not os.path.islink(final):
        raise paths.PathRefused([f"image '{img_id}': field 'output_dir': the final disk {final} exists and "
                                 "is not a regular file; refused"], image_id=img_id, step=step)
    if not paths.made_output(image_dir, final) and not paths.overwrite_allowed(overwrite) and st:
        raise paths.PathRefused([f"image '{img_id}': field 'output_dir': the final disk {final} exists and "
                                 "was not made by gho2kvm for this image; refused: set overwrite: true for "
                                 "the image (or give --force) to replace it"], image_id=img_id, step=step)


# ----------------------------------------------------------------------------------------- sources


def source_problem(path: Path, fmt: str) -> str | None:
    """Why a source cannot be the disk it claims to be, from its own bytes (no tool run); None if
    nothing is wrong that these checks can see. Each answer is one line without the file name."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if size == 0:
        return "is empty (0 bytes); not a disk"
    if fmt in ("vpc", "vhdx") and size < (1024 if fmt == "vpc" else 1024 * 1024):
        return f"is {size} bytes: too small for a {'VHD' if fmt == 'vpc' else 'VHDX'} disk"
    if fmt == "raw" and size < 2 * SECTOR:
        return f"is {size} bytes: too small for a disk (a partition table and one sector need {2 * SECTOR})"
    if fmt == "vpc":
        return _vhd_problem(path, size)
    if fmt == "vhdx":
        return _vhdx_problem(path, size)
    if fmt == "vmdk":
        return _sparse_vmdk_problem(path, size)
    return None


def _read(path: Path, offset: int, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        return os.pread(fd, n, offset)
    finally:
        os.close(fd)


def _vhd_problem(path: Path, size: int) -> str | None:
    foot = _read(path, size - 512, 512)
    head = _read(path, 0, 512)
    footer = foot if foot[:8] == b"conectix" else head if head[:8] == b"conectix" else b""
    if not footer:
        return "has no VHD footer ('conectix' cookie); not a VHD"
    disk_type = struct.unpack_from(">I", footer, 60)[0]
    if disk_type == 4:
        return (f"is a differencing (child) VHD{_vhd_parent(path, footer, size)}; merge it into its "
                "parent first")
    if disk_type not in (2, 3):
        return f"VHD footer field disk type is {disk_type}; expected 2 (fixed) or 3 (dynamic)"
    current = struct.unpack_from(">Q", footer, 48)[0]
    if disk_type == 2 and current + 512 > size:
        return f"VHD footer says {current} bytes of data, the file holds {size - 512}; truncated"
    if disk_type == 3:
        data_off = struct.unpack_from(">Q", footer, 16)[0]
        if data_off + 1024 > size:
            return f"VHD dynamic header at offset {data_off} lies past the end of the file ({size} bytes)"
        dyn = _read(path, data_off, 1024)
        if dyn[:8] != b"cxsparse":
            return f"VHD dynamic header at offset {data_off} has no 'cxsparse' cookie"
        bat_off, = struct.unpack_from(">Q", dyn, 16)
        entries, block = struct.unpack_from(">II", dyn, 28)
        if bat_off + entries * 4 > size:
            return f"VHD block table (offset {bat_off}, {entries} entries) lies past the end of the file"
        bat = _read(path, bat_off, min(entries, 1 << 20) * 4)
        for i in range(0, len(bat) // 4):
            sector = struct.unpack_from(">I", bat, i * 4)[0]
            if sector != 0xFFFFFFFF and sector * 512 + block > size:
                return f"VHD block {i} at sector {sector} lies past the end of the file ({size} bytes)"
    return None


def _vhd_parent(path: Path, footer: bytes, size: int) -> str:
    try:
        data_off = struct.unpack_from(">Q", footer, 16)[0]
        dyn = _read(path, data_off, 1024)
        name = dyn[64:64 + 512].decode("utf-16-be", "replace").split("\0", 1)[0]
        return f" of parent {escape(name, 200)!r}" if name else ""
    except (OSError, struct.error):
        return ""


def _vhdx_problem(path: Path, size: int) -> str | None:
    if _read(path, 0, 8) != b"vhdxfile":
        return "has no VHDX signature ('vhdxfile'); not a VHDX"
    # a differencing VHDX carries a parent locator in its metadata region; the metadata table is
    # found through the region table (64 KiB and 128 KiB into the file)
    for region_at in (192 * 1024, 256 * 1024):
        reg = _read(path, region_at, 64 * 1024)
        if reg[:4] != b"regi":
            continue
        count = struct.unpack_from("<I", reg, 8)[0]
        for i in range(min(count, 2047)):
            guid = reg[16 + i * 32:32 + i * 32]
            off, length = struct.unpack_from("<QI", reg, 32 + i * 32)
            if guid == _METADATA_GUID and off + length <= size:
                meta = _read(path, off, min(length, 1 << 20))
                return _vhdx_metadata_problem(meta)
        return None
    return "VHDX region table not found (offset 192 KiB or 256 KiB); not a usable VHDX"


_FILE_PARAMETERS = "CAA16737-FA36-4D43-B3B6-33F0AA44E76B"
_PARENT_LOCATOR = "A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"


def _guid(text: str) -> bytes:
    import uuid

    return uuid.UUID(text).bytes_le


_METADATA_GUID = _guid("8B7CA206-4790-4B9A-B8FE-575F050F886E")


def _vhdx_metadata_problem(meta: bytes) -> str | None:
    if meta[:8] != b"metadata":
        return "VHDX metadata table has no 'metadata' signature"
    count = struct.unpack_from("<H", meta, 10)[0]
    parent = _guid(_PARENT_LOCATOR)
    params = _guid(_FILE_PARAMETERS)
    for i in range(min(count, 2047)):
        at = 32 + i * 32
        item = meta[at:at + 16]
        off, length = struct.unpack_from("<II", meta, at + 16)
        if item == parent:
            return "is a differencing (child) VHDX" + _vhdx_parent_name(meta, off, length) + \
                   "; merge it into its parent first"
        if item == params and off + 8 <= len(meta):
            flags = struct.unpack_from("<I", meta, off + 4)[0]
            if flags & 2:  # HasParent
                return "is a differencing (child) VHDX (file parameters: has parent); merge it first"
    return None


def _vhdx_parent_name(meta: bytes, off: int, length: int) -> str:
    loc = meta[off:off + length]
    if len(loc) < 20:
        return ""
    count = struct.unpack_from("<H", loc, 18)[0]
    for i in range(min(count, 64)):
        e = 20 + i * 12
        if e + 12 > len(loc):
            break
        ko, vo, kl, vl = struct.unpack_from("<IIHH", loc, e)
        key = loc[ko:ko + kl].decode("utf-16-le", "replace")
        if key in ("relative_path", "absolute_win32_path", "volume_path"):
            return f" of parent {escape(loc[vo:vo + vl].decode('utf-16-le', 'replace'), 200)!r}"
    return ""


def _sparse_vmdk_problem(path: Path, size: int) -> str | None:
    """A sparse (KDMV) VMDK whose grain directory or tables point past the end of the file, or a
    streamOptimized one whose grain markers cannot be read."""
    hdr = _read(path, 0, 512)
    if hdr[:4] != vmdk.SPARSE_MAGIC or len(hdr) < 512:
        return None
    (version, flags, capacity, grain, _doff, _dsize, gtes, _rgd, gd_off, overhead) = struct.unpack_from(
        "<IIQQQQIQQQ", hdr, 4)
    compressed = struct.unpack_from("<H", hdr, 77)[0]
    if grain == 0 or grain & (grain - 1) or grain > 1 << 20 or gtes == 0:
        return f"VMDK sparse header: grain size {grain} sectors or {gtes} entries per grain table not usable"
    if gd_off == 0xFFFFFFFFFFFFFFFF:  # streamOptimized: the footer at the end holds the real one
        foot = _read(path, size - 1024, 512) if size >= 1536 else b""
        if foot[:4] != vmdk.SPARSE_MAGIC:
            return "streamOptimized VMDK has no footer header 1024 bytes before the end; truncated"
        gd_off = struct.unpack_from("<Q", foot, 56)[0]
    if gd_off * SECTOR >= size:
        return f"VMDK grain directory at sector {gd_off} lies past the end of the file ({size} bytes)"
    tables = -(-capacity // (grain * gtes))
    gd = _read(path, gd_off * SECTOR, min(tables, 1 << 20) * 4)
    if len(gd) < tables * 4 and tables <= 1 << 20:
        return f"VMDK grain directory at sector {gd_off} ({tables} entries) runs past the end of the file"
    for i in range(len(gd) // 4):
        gt = struct.unpack_from("<I", gd, i * 4)[0]
        if gt and gt * SECTOR + gtes * 4 > size:
            return f"VMDK grain table {i} at sector {gt} lies past the end of the file ({size} bytes)"
    if not compressed:
        for i, j, g in _grains(path, gd, gtes, tables=4096):
            if g * SECTOR + grain * SECTOR > size:
                return (f"VMDK grain table {i} entry {j} points to sector {g}, past the end of the file "
                        f"({size} bytes)")
    else:
        return _stream_grains_problem(path, size, gd, gtes, grain)
    del version, flags, overhead
    return None


def _grains(path: Path, gd: bytes, gtes: int, *, tables: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(grain table, entry, grain sector) of every allocated grain (sector > 1) of a sparse VMDK whose
    grain directory is ``gd`` (the first ``tables`` grain tables when given)."""
    n = len(gd) // 4 if tables is None else min(len(gd) // 4, tables)
    for i in range(n):
        gt = struct.unpack_from("<I", gd, i * 4)[0]
        if not gt:
            continue
        table = _read(path, gt * SECTOR, gtes * 4)
        for j in range(len(table) // 4):
            g = struct.unpack_from("<I", table, j * 4)[0]
            if g > 1:
                yield i, j, g


def _stream_grains_problem(path: Path, size: int, gd: bytes, gtes: int, grain: int) -> str | None:
    """Every grain of a streamOptimized VMDK: a marker (LBA, compressed size) inside the file whose
    deflate stream inflates to at most one grain."""
    import zlib

    for checked, (i, j, g) in enumerate(_grains(path, gd, gtes), start=1):
        marker = _read(path, g * SECTOR, 12)
        if len(marker) < 12:
            return f"streamOptimized VMDK grain at sector {g} lies past the end of the file"
        lba, clen = struct.unpack_from("<QI", marker)
        if lba != (i * gtes + j) * grain:
            return (f"streamOptimized VMDK grain at sector {g} says LBA {lba}, its table entry says "
                    f"{(i * gtes + j) * grain}")
        if g * SECTOR + 12 + clen > size:
            return (f"streamOptimized VMDK grain at sector {g} ({clen} bytes) runs past the end "
                    "of the file")
        try:
            d = zlib.decompressobj()
            out = d.decompress(_read(path, g * SECTOR + 12, clen), grain * SECTOR + 1)
            if len(out) > grain * SECTOR or not d.eof:
                raise zlib.error("not one grain")
        except zlib.error:
            return f"streamOptimized VMDK grain at sector {g} does not inflate to one grain; corrupt"
        if checked >= 65536:
            return None
    return None


def extents_problem(path: Path) -> str | None:
    """A text VMDK whose flat extent's offset + size exceeds its file."""
    try:
        desc = vmdk.parse_descriptor(path)
    except InputError:
        return None
    if desc.embedded:
        return None
    for e in desc.extents:
        if e.type.upper() not in vmdk.FLAT_TYPES:
            continue
        p = path.parent / e.file
        try:
            st = os.stat(p)
        except OSError:
            continue
        if not os.path.isfile(p):
            continue  # refused by inspect's extent checks in their own words
        have = st.st_size
        need = (e.offset + e.sectors) * SECTOR
        if need > have:
            return (f"VMDK extent {escape(e.file, 200)!r}: offset {e.offset} + {e.sectors} sectors = "
                    f"{need} bytes, "
                    f"the file holds {have}; truncated")
    return None
