"""VMDK descriptors: the one reader, parser and writer (inspect's safety check and ghost-convert use it).

A VMDK is either a sparse file (``KDMV`` header, the text descriptor embedded at
``descriptorOffset``/``descriptorSize`` sectors) or a small text descriptor naming its extent
files. Everything here is bounded and opens only regular files: the header's offset and size are
checked against the file's size and a cap before any seek or read, the descriptor is at most
MAX_DESCRIPTOR_BYTES, at most MAX_EXTENTS extents are accepted. Errors are one line naming the
file and the field.

qemu reads the keys of a descriptor by searching the whole text (``strstr``), not line by line, so
``parentFileNameHint`` or a second ``createType`` hidden inside a ``ddb`` value would be seen by
qemu and not by a line-based check: such descriptors are refused.
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import atomic
from pipeline.core.errors import InputError
from pipeline.core.safeio import MiB, escape, read_capped, regular_file

SPARSE_MAGIC = b"KDMV"
COWD_MAGIC = b"COWD"
SPARSE_HEADER_BYTES = 512
MAX_DESCRIPTOR_BYTES = 1 * MiB
MAX_EXTENTS = 1024
NO_PARENT_CID = "ffffffff"

_EXTENT_HEAD = r'(\s*(?:RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)\s+")'
_EXTENT_RE = re.compile(rf'^{_EXTENT_HEAD}([^"]*)("(?:\s+\d+)?\s*)$', re.I)
_EXTENT_BYTES_RE = re.compile(rf'^{_EXTENT_HEAD}([^"]+)(".*)$'.encode(), re.I)
# qemu's own extent parser (sscanf) is looser than _EXTENT_RE (e.g. "RW +8 FLAT ..." or
# 'RW 8 VMFSSPARSE"x"' are extents to qemu): every line that may be an extent must match strictly.
_EXTENT_LIKE_RE = re.compile(r"^\s*(RW|RDONLY|NOACCESS)", re.I)
_KEY_RE = {key: re.compile(rf'^\s*{key}\s*=\s*"?([^"\s]*)"?', re.M) for key in ("createType", "parentCID")}


@dataclass(frozen=True)
class Extent:
    access: str
    sectors: int
    type: str
    file: str
    offset: int = 0  # sectors into ``file`` where the extent starts (flat extents)


@dataclass(frozen=True)
class Descriptor:
    text: str
    embedded: bool  # inside a sparse (KDMV) file, which is then its own only extent
    create_type: str
    parent_cid: str | None
    extents: list[Extent] = field(default_factory=list)


def head(path: Path, n: int = 4) -> bytes:
    """The first ``n`` bytes of a regular file (b"" for anything else; never blocks)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return b""
    if not os.path.isfile(path) or st.st_size == 0:
        return b""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    try:
        return os.read(fd, n)
    finally:
        os.close(fd)


def is_text_descriptor(path: Path) -> bool:
    return head(path) not in (SPARSE_MAGIC, COWD_MAGIC)


def read_descriptor(path: Path, *, image_id: str | None = None, step: str | None = None) -> tuple[str, bool]:
    """(descriptor text, embedded?) of a VMDK. Raises :class:`InputError` naming file and field."""
    where = {"image_id": image_id, "step": step}
    name = escape(path, 300)
    st = regular_file(path, "VMDK", **where)
    size = st.st_size
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror}", **where) from None
    try:
        first = os.pread(fd, SPARSE_HEADER_BYTES, 0)
        embedded = first[:4] == SPARSE_MAGIC
        if embedded:
            if len(first) < SPARSE_HEADER_BYTES:
                raise InputError(f"{name}: VMDK sparse header truncated: the file is {size} bytes, the "
                                 f"header needs {SPARSE_HEADER_BYTES}", **where)
            desc_off, desc_size = struct.unpack_from("<QQ", first, 28)
            if desc_off == 0 or desc_size == 0:
                # streamOptimized/monolithicSparse always embed one; without it qemu can't read either
                raise InputError(f"{name}: VMDK sparse header has no embedded descriptor", **where)
            if desc_size * 512 > MAX_DESCRIPTOR_BYTES:
                raise InputError(f"{name}: VMDK header field descriptorSize is {desc_size} sectors; at most "
                                 f"{MAX_DESCRIPTOR_BYTES // 512} accepted", **where)
            if desc_off * 512 + desc_size * 512 > size:
                raise InputError(f"{name}: VMDK header field descriptorOffset (sector {desc_off}, "
                                 f"{desc_size} sectors) lies beyond the end of the file ({size} bytes)",
                                 **where)
            raw = os.pread(fd, desc_size * 512, desc_off * 512)
        else:
            raw = os.pread(fd, MAX_DESCRIPTOR_BYTES, 0)
    except OSError as e:
        raise InputError(f"{name}: cannot read: {e.strerror}", **where) from None
    finally:
        os.close(fd)
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    if "createType" not in text:
        raise InputError(f"{name}: not a VMDK (no descriptor with createType found)", **where)
    return text, embedded


def parse_descriptor(path: Path, *, image_id: str | None = None, step: str | None = None) -> Descriptor:
    """Read and parse a VMDK descriptor; refuse what qemu would read differently from us."""
    where = {"image_id": image_id, "step": step}
    name = escape(path, 300)
    text, embedded = read_descriptor(path, image_id=image_id, step=step)
    low = text.lower()
    if "parentfilenamehint" in low:
        raise InputError(f"{name}: VMDK has a parent (delta disk); merge it into a standalone disk first "
                         "(field parentFileNameHint)", **where)
    values: dict[str, str | None] = {}
    for key, rx in _KEY_RE.items():
        count = low.count(key.lower())
        if count > 1:
            raise InputError(f"{name}: VMDK descriptor names {key} {count} times (qemu reads the first "
                             "anywhere in the text); refused", **where)
        m = rx.search(text)
        if count == 1 and m is None:
            raise InputError(f"{name}: VMDK descriptor field {key} not understood; refused", **where)
        values[key] = m.group(1) if m else None
    parent = values["parentCID"]
    if parent is not None and parent.lower() != NO_PARENT_CID:
        raise InputError(f"{name}: VMDK has a parent (delta disk); merge it into a standalone disk first "
                         f"(field parentCID is {escape(parent, 20)})", **where)
    extents: list[Extent] = []
    for line in text.splitlines():
        em = _EXTENT_RE.match(line)
        if not em:
            if _EXTENT_LIKE_RE.match(line):
                raise InputError(f"{name}: VMDK extent line {escape(line.strip(), 120)!r} not understood; "
                                 "refused", **where)
            continue
        if len(extents) >= MAX_EXTENTS:
            raise InputError(f"{name}: VMDK descriptor lists more than {MAX_EXTENTS} extents; refused",
                             **where)
        _, sectors, kind, file, tail = em.groups()
        offset = tail.strip('" \t')
        extents.append(Extent(line.split()[0].upper(), int(sectors), kind, file, int(offset or 0)))
    return Descriptor(text, embedded, values["createType"] or "?", parent, extents)


FLAT_TYPES = ("FLAT", "VMFS")  # extent types qemu reads as plain raw data


def whole_raw_extent(desc: Descriptor, virtual_size: int | None) -> str | None:
    """The file name of the descriptor's only extent when that extent IS the whole disk as a raw
    image: exactly one extent, ``RW <n> FLAT "<file>" 0`` (or VMFS), ``n`` sectors = ``virtual_size``.
    None for anything else (a sparse VMDK, several extents, an offset, a size that differs). The
    caller checks that the file itself is exactly that long."""
    if desc.embedded or len(desc.extents) != 1 or virtual_size is None:
        return None
    (ext,) = desc.extents
    if ext.access != "RW" or ext.type.upper() not in FLAT_TYPES or ext.offset != 0:
        return None
    return ext.file if ext.sectors * 512 == virtual_size else None


def rename_extents(path: Path, rename: Callable[[str], str]) -> list[str]:
    """Give every extent of the text descriptor ``path`` the file name ``rename(name)``; return the new
    names in order. The file is rewritten (atomically, :mod:`pipeline.core.atomic`) only when a name
    changes; every other byte is kept. A sparse VMDK (its descriptor embedded) has none: ``[]``.
    Whatever ``rename`` raises propagates, with the file untouched."""
    if not is_text_descriptor(path):
        return []
    data = read_capped(path, MAX_DESCRIPTOR_BYTES, "VMDK descriptor")
    names: list[str] = []
    out: list[bytes] = []
    for line in data.split(b"\n"):
        m = _EXTENT_BYTES_RE.match(line)
        if m:
            old = m.group(4).decode("utf-8", "replace")
            new = rename(old)
            names.append(new)
            if new != old:
                line = m.group(1) + new.encode() + m.group(5)
        out.append(line)
    text = b"\n".join(out)
    if text != data:
        with atomic.temporary_path(path) as tmp:
            tmp.write_bytes(text)
    return names


_PARENT_HINT_RE = re.compile(r'parentFileNameHint\s*=\s*"([^"]*)"', re.I)


def referenced_files(text: str) -> tuple[list[str], str | None]:
    """(extent file names, parent file name or None) a descriptor text names, read leniently: for
    grouping a folder's files (``gho2kvm scan``), not for deciding what qemu may open."""
    extents = [m.group(4) for line in text.splitlines()[:MAX_EXTENTS * 4] if (m := _EXTENT_RE.match(line))]
    parent = _PARENT_HINT_RE.search(text)
    return extents[:MAX_EXTENTS], parent.group(1) if parent else None
