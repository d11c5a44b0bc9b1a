"""``gho2kvm scan DIR…``: find the images on a shelf and write a commented config for them.

The walk (:func:`walk`) never follows a symlink to a folder, takes a symlink to a file only when its
target lies inside a scanned folder, stops at ``max_depth`` folders deep and ``max_files`` entries, and
opens regular files only (a FIFO or device is never opened). Each file is recognised by its first bytes
(:func:`classify`), not by its name: a Ghost image (``.GHS`` continuation files are grouped under their
``.GHO``), a VMware ``.vmx`` or VMDK descriptor (extents, parents and the disks of a ``.vmx`` are never
listed on their own), ``.ova``/``.ovf``, VHD, VHDX, qcow2, a raw disk with a partition table. Only headers
are read: a Ghost image's header, trailer and catalogues (:func:`pipeline.gho.info.read_summary`), never
its data. A file that cannot be read or is broken gives one line on stderr and the scan goes on.

The output is config text (:func:`render_config`), written here and not through a YAML dumper, so that
``--update`` (:func:`update_config`) can add entries to a user's file keeping every other byte: edits,
comments and order stay, ids are never changed, and sources that disappeared are listed.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import stat
import struct
import sys
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import yaml

from pipeline.core import atomic
from pipeline.core.config import ID_RE, MAC_RE, SOURCE_SUFFIXES, ConfigError, load_config
from pipeline.core.errors import Gho2KvmError, InputError, escape
from pipeline.core.safeio import MiB, file_kind, open_nonblocking, read_capped
from pipeline.gho.spans import resolve_first
from pipeline.vmware.ovf import ova_members, read_ovf
from pipeline.vmware.vmx import read_vmx

MAX_DEPTH = 16
MAX_FILES = 100_000
HEAD_BYTES = 1024
MAX_TEXT = 1 * MiB  # a .vmx or .ovf
Warn = Callable[[str], None]
_T = TypeVar("_T")


# -- walking ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FileRef:
    path: Path  # as found under the scanned folder (absolute, symlinks in it not resolved)
    size: int
    key: tuple[int, int]  # (st_dev, st_ino): the same file reached twice is scanned once


def _inside(real: str, roots: list[str]) -> bool:
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in roots)


def walk(roots: Iterable[Path], warn: Warn, *, max_depth: int = MAX_DEPTH,
         max_files: int = MAX_FILES) -> list[FileRef]:
    """Every regular file under ``roots`` (sorted by path), bounded; problems go to ``warn``."""
    roots = [Path(os.path.abspath(r)) for r in roots]
    real_roots = [os.path.realpath(r) for r in roots]
    out: dict[tuple[int, int], FileRef] = {}
    seen = 0
    stack: list[tuple[Path, int]] = []
    for r in roots:
        try:
            st = os.lstat(r)
        except OSError as e:
            warn(f"{escape(r, 300)}: cannot scan: {e.strerror}")
            continue
        if stat.S_ISDIR(st.st_mode):
            stack.append((r, 0))
        elif stat.S_ISREG(st.st_mode):
            out.setdefault((st.st_dev, st.st_ino), FileRef(r, st.st_size, (st.st_dev, st.st_ino)))
        else:
            warn(f"{escape(r, 300)}: not a folder or a regular file; skipped")
    while stack:
        folder, depth = stack.pop()
        try:
            with os.scandir(folder) as it:  # at most the entries still allowed (+1 to notice more)
                entries = sorted(itertools.islice(it, max(0, max_files - seen) + 1), key=lambda e: e.name)
        except OSError as e:
            warn(f"{escape(folder, 300)}: cannot list: {e.strerror}")
            continue
        for entry in entries:
            seen += 1
            if seen > max_files:
                warn(f"{escape(folder, 300)}: stopped after {max_files} entries (scan smaller folders)")
                return sorted(out.values(), key=lambda f: str(f.path))
            path = Path(entry.path)
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                warn(f"{escape(path, 300)}: cannot read: {e.strerror}")
                continue
            if stat.S_ISDIR(st.st_mode):
                if depth + 1 > max_depth:
                    warn(f"{escape(path, 300)}: deeper than {max_depth} folders; not scanned")
                else:
                    stack.append((path, depth + 1))
                continue
            if stat.S_ISLNK(st.st_mode):
                real = os.path.realpath(path)
                try:
                    st = os.stat(path)
                except OSError:
                    warn(f"{escape(path, 300)}: dangling symlink; skipped")
                    continue
                if stat.S_ISDIR(st.st_mode):
                    continue  # never followed: a link to a folder may lead anywhere (or loop)
                if not _inside(real, real_roots):
                    warn(f"{escape(path, 300)}: symlink to {escape(real, 200)}, outside the scanned "
                         "folders; skipped")
                    continue
            kind = file_kind(st.st_mode)
            if kind is not None:
                if _interesting_name(entry.name):
                    warn(f"{escape(path, 300)}: is {kind}, not a regular file; skipped")
                continue
            out.setdefault((st.st_dev, st.st_ino), FileRef(path, st.st_size, (st.st_dev, st.st_ino)))
    return sorted(out.values(), key=lambda f: str(f.path))


_SUFFIXES = (".gho", ".ghs", ".vmdk", ".vmx", ".ova", ".ovf", ".vhd", ".vhdx", ".qcow2", ".raw", ".img")


def _interesting_name(name: str) -> bool:
    return name.lower().endswith(_SUFFIXES)


# -- recognising ----------------------------------------------------------------------------------
def read_ends(path: Path, head: int = HEAD_BYTES, tail: int = 0) -> tuple[bytes, bytes]:
    """The first ``head`` and last ``tail`` bytes of a regular file (opened non-blocking, checked again
    after the open: a FIFO swapped in is never read). ``OSError`` when it cannot be read."""
    fd, st = open_nonblocking(path)
    try:
        if file_kind(st.st_mode) is not None:
            raise OSError(0, "not a regular file")
        first = os.pread(fd, head, 0)
        last = os.pread(fd, tail, st.st_size - tail) if tail and st.st_size >= tail + head else b""
        return first, last
    finally:
        os.close(fd)


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]] | None:
    """(status, type, start, sectors) of the used primary entries of a plausible partition table, else None
    (a volume boot sector, random bytes, an empty table)."""
    if len(sector) < 512 or sector[510:512] != b"\x55\xaa":
        return None
    used = []
    for k in range(4):
        o = 446 + 16 * k
        status, ptype = sector[o], sector[o + 4]
        start, count = struct.unpack_from("<II", sector, o + 8)
        if status not in (0, 0x80):
            return None
        if ptype:
            if start == 0 or count == 0:
                return None
            used.append((status, ptype, start, count))
    return used or None


def classify(head: bytes, tail: bytes, name: str) -> str | None:
    """What a file is from its first bytes (and, for a fixed VHD, its last 512): ``gho``, ``ghs``,
    ``vmdk-sparse`` (KDMV/COWD), ``vmdk-text``, ``vmx``, ``ova``, ``ovf``, ``vhd``, ``vhdx``, ``qcow2``,
    ``raw``; None for anything else."""
    low = name.lower()
    if head[:2] == b"\xfe\xef" and len(head) >= 512:
        return {0x01: "gho", 0x09: "ghs"}.get(head[2])
    if head[:4] in (b"KDMV", b"COWD"):
        return "vmdk-sparse"
    if head[:4] == b"QFI\xfb":
        return "qcow2"
    if head[:8] == b"vhdxfile":
        return "vhdx"
    if head[:8] == b"conectix" or tail[:8] == b"conectix":
        return "vhd"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "ova"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "ovf" if b"Envelope" in head or low.endswith(".ovf") else None
    if b"createType" in head and (b"# Disk DescriptorFile" in head or b"version=" in head):
        return "vmdk-text"
    if low.endswith(".vmx") and re.search(rb'^\s*[\w.:]+\s*=\s*"', head, re.M):
        return "vmx"
    if _mbr_entries(head[:512]) is not None or head[512:520] == b"EFI PART":
        return "raw"
    return None


# -- what a scan finds ----------------------------------------------------------------------------
@dataclass
class Found:
    """One entry of the config: a source (or a commented-out proposal when ``usable`` is False)."""

    scanned: Path  # the file the entry comes from (a .vmx for a VM)
    kind: str  # "Ghost image", "VMware VM", "VMDK", "qcow2", "VHD", "VHDX", "raw disk", "OVA", "OVF"
    name: str  # for the id
    source: Path | None
    files: list[Path] = field(default_factory=list)  # every file of it (spans, extents, disks)
    facts: list[str] = field(default_factory=list)  # comment lines
    keys: dict[str, str | int] = field(default_factory=dict)  # memory_mib, vcpus, mac, title
    password: bool = False
    usable: bool = True
    why_not: str = ""
    id: str = ""

    def total_bytes(self) -> int:
        return sum(_size(p) for p in self.files)


def _size(p: Path) -> int:
    try:
        return os.stat(p).st_size
    except OSError:
        return 0


def human(n: int) -> str:
    v = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if v < 1024 or unit == "TiB":
            return f"{int(v)} B" if unit == "B" else f"{v:.1f} {unit}"
        v /= 1024
    return f"{n} B"


def _suffix_ok(path: Path) -> bool:
    return path.name.lower().endswith(SOURCE_SUFFIXES)


def _no_suffix(f: Found, want: str) -> None:
    if f.source is not None and not _suffix_ok(f.source):
        f.usable = False
        f.why_not = (f"a source's name must end in one of {' '.join(SOURCE_SUFFIXES)}; link or rename it, "
                     f"e.g. to {f.source.stem}{want}")


def scan(roots: Iterable[Path], warn: Warn, *, max_depth: int = MAX_DEPTH,
         max_files: int = MAX_FILES) -> list[Found]:
    """Everything found under ``roots``, in path order (ids not yet given)."""
    roots = list(roots)
    real_roots = [os.path.realpath(r) for r in roots]
    files = walk(roots, warn, max_depth=max_depth, max_files=max_files)
    kinds: dict[Path, str] = {}
    heads: dict[Path, bytes] = {}
    unknown: list[Path] = []
    for ref in files:
        vhd_tail = 512 if ref.size % 512 == 0 else 0
        try:
            head, tail = read_ends(ref.path, HEAD_BYTES, vhd_tail)
        except OSError as e:
            warn(f"{escape(ref.path, 300)}: cannot read: {e.strerror or e}")
            continue
        kind = classify(head, tail, ref.path.name)
        if kind is None:
            unknown.append(ref.path)
            continue
        kinds[ref.path] = kind
        heads[ref.path] = head
    members: set[Path] = set()
    found: list[Found] = []
    listings: dict[Path, dict[str, Path]] = {}  # folder → its scanned files by lower-cased name
    for ref in files:
        listings.setdefault(ref.path.parent, {})[ref.path.name.lower()] = ref.path
    descriptors: dict[Path, _Desc] = {}
    for path, kind in kinds.items():
        if kind in ("vmdk-text", "vmdk-sparse"):
            d = _guarded(path, warn, _descriptor, path, kind, warn)
            if d is not None:
                descriptors[path] = d
                members.update(d.extents)
                if d.parent is not None:
                    members.add(d.parent)
    for path, kind in kinds.items():
        if kind == "vmx":
            vm = _guarded(path, warn, _vmx, path, descriptors, real_roots, warn)
            if vm is not None:
                members.update(vm.files)
                found.append(vm)
        elif kind == "ovf":
            members.update(_ovf_disks(path, warn))
    for path, kind in kinds.items():
        if path in members and kind != "vmx":
            continue
        f: Found | None = None
        if kind == "gho":
            f = _guarded(path, warn, _ghost, path, warn, listings.get(path.parent, {}))
            if f is not None:
                members.update(f.files)
        elif kind == "ghs":
            continue  # grouped under its .GHO below (a set without its .GHO is named there)
        elif kind in ("vmdk-text", "vmdk-sparse"):
            d = descriptors.get(path)
            if d is None:
                continue
            if d.extent_only:
                warn(f"{escape(path, 300)}: a VMDK extent that no descriptor in its folder names; skipped "
                     "(name the descriptor .vmdk or the .vmx instead)")
                continue
            f = _guarded(path, warn, _vmdk_entry, path, d)
        elif kind == "qcow2":
            f = _guarded(path, warn, _qcow2, path, heads[path])
        elif kind == "vhd":
            f = _guarded(path, warn, _vhd, path)
        elif kind == "vhdx":
            f = _guarded(path, warn, _vhdx, path)
        elif kind == "raw":
            f = _guarded(path, warn, _raw, path, heads[path])
        elif kind in ("ova", "ovf"):
            f = Found(path, kind.upper(), path.stem, None, [path], [f"{kind.upper()} appliance"],
                      usable=False,
                      why_not=f"{kind.upper()} is not yet accepted as a source; import its disk or .vmx")
            if kind == "ova" and (names := _guarded(path, warn, _tar_names, path)):
                f.facts.append("holds: " + ", ".join(names))
        if f is not None:
            found.append(f)
    for path in unknown:
        if path not in members and path.name.lower().endswith(
                (".gho", ".vmdk", ".vhd", ".vhdx", ".qcow2", ".ova", ".vmx")):
            warn(f"{escape(path, 300)}: not recognised (its first bytes are not what a "
                 f"{path.suffix.lstrip('.')} file starts with); skipped")
    for f in found:
        if f.usable and f.source is not None and (problem := _bad_name(str(f.source))):
            f.usable, f.why_not = False, f"its path {problem}; rename it"
    for path, kind in kinds.items():
        if kind == "ghs" and path not in members:
            first = _guarded(path, warn, resolve_first, path)
            if first is not None:
                warn(f"{escape(path, 300)}: a continuation of {escape(first.name, 80)} after a missing span "
                     "(never read); skipped")
            else:
                warn(f"{escape(path, 300)}: a Ghost continuation file (.GHS) whose first file (.GHO) was not "
                     "found next to it; skipped")
    found.sort(key=lambda f: str(f.scanned))
    return found


def _guarded(path: Path, warn: Warn, fn: Callable[..., _T], *args: object) -> _T | None:
    """``fn(*args)``, or None with one line on stderr when reading ``path`` fails in any way: one bad
    file never stops the scan (the readers raise typed errors; this is the net under them)."""
    try:
        return fn(*args)
    except Gho2KvmError as e:
        warn(escape(e.one_line(), 400))
    except OSError as e:
        warn(f"{escape(path, 300)}: cannot read: {e.strerror or e}")
    except Exception as e:  # noqa: BLE001 - a hostile file must not end the scan
        warn(f"{escape(path, 300)}: not understood ({type(e).__name__}: {escape(str(e), 200)}); skipped")
    return None


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _bad_name(name: str) -> str | None:
    """Why a path cannot be a source as it is: control characters, or bytes that are not UTF-8."""
    if _CONTROL.search(name):
        return "has control or line-break characters"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


SECTION_KINDS = {"fat": "FAT, file-aware", "ntfs": "NTFS, file-aware", "sector": "every sector",
                 "ext": "ext2/3 (not supported)"}


def _ghost(path: Path, warn: Warn, listing: dict[str, Path] | None = None) -> Found | None:
    from pipeline.gho.info import read_summary

    try:
        s = read_summary(path, listing)
    except Gho2KvmError as e:
        warn(escape(e.one_line(), 400))
        return None
    except OSError as e:
        warn(f"{escape(path, 300)}: cannot read: {e.strerror}")
        return None
    spans = [path.with_name(n) for n in s.spans]
    f = Found(path, "Ghost image", path.stem, path, [path, *spans], password=s.password)
    pw = "password-protected" if s.password else "no password"
    made = f"Ghost {s.generation}-style image" if s.generation != "?" else "Ghost image"
    f.facts.append(f"{made}, compression {s.compression}, {s.image_type}, {pw}")
    if s.description:
        f.facts.append(f"description: {s.description}")
    if spans:
        f.facts.append(f"spans: {', '.join(n for n in s.spans)}")
    if s.missing_span:
        f.usable = False
        f.why_not = f"span {s.missing_span} is missing (the set does not end with its trailer)"
        warn(f"{escape(path, 300)}: span {escape(s.missing_span, 80)} is missing; entry commented out")
    parts = []
    if s.mbr_partitions:
        parts.append("disk partitions: " + ", ".join(s.mbr_partitions))
    elif s.first_partition:
        parts.append(f"first partition: {SECTION_KINDS.get(s.first_partition, s.first_partition)}")
    if s.catalogue_files:
        counts = ", ".join("?" if n is None else str(n) for n in s.catalogue_files)
        parts.append(f"{len(s.catalogue_files)} FAT partition(s), files per catalogue: {counts}")
    f.facts += parts
    if s.password:
        f.facts.append("password: export the variable named by ghost.password_env before migrate")
    _no_suffix(f, ".gho")
    return f


@dataclass
class _Desc:
    path: Path
    create_type: str
    extents: list[Path]
    parent: Path | None
    capacity: int  # bytes (0 unknown)
    extent_only: bool  # a sparse extent without its own descriptor (part of a split disk)
    problem: str | None = None  # why qemu would not be given it (a delta disk, a refused field)


def _descriptor(path: Path, kind: str, warn: Warn) -> _Desc | None:
    from pipeline import vmdk

    try:
        if kind == "vmdk-sparse":
            head, _ = read_ends(path, 512)
            if head[:4] == b"COWD" or struct.unpack_from("<Q", head, 28)[0] == 0:
                cap = struct.unpack_from("<Q", head, 12)[0] * 512 if head[:4] == b"KDMV" else 0
                return _Desc(path, "extent", [], None, cap, True)
        text, embedded = vmdk.read_descriptor(path)
    except InputError as e:
        if kind == "vmdk-sparse" and "createType" in e.message:  # an extent of a split sparse disk
            return _Desc(path, "extent", [], None, 0, True)
        warn(escape(e.one_line(), 400))
        return None
    except (Gho2KvmError, OSError, struct.error) as e:
        warn(escape(e.one_line() if isinstance(e, Gho2KvmError) else f"{path}: cannot read: {e}", 400))
        return None
    names, parent = vmdk.referenced_files(text)
    here = path.parent
    extents = [] if embedded else [Path(os.path.normpath(here / n)) for n in names]
    problem = None
    try:
        desc = vmdk.parse_descriptor(path)
        cap = sum(e.sectors for e in desc.extents) * 512
        ctype = desc.create_type
    except Gho2KvmError as e:
        problem = (e.one_line() if not parent
                   else "a snapshot (delta disk): consolidate the VM's snapshots first")
        cap, m = 0, re.search(r'createType\s*=\s*"([^"]*)"', text)
        ctype = m.group(1) if m else "?"
    if embedded:
        head, _ = read_ends(path, 512)
        cap = struct.unpack_from("<Q", head, 12)[0] * 512
    return _Desc(path, ctype, extents, Path(os.path.normpath(here / parent)) if parent else None, cap, False,
                 problem)


def _vmdk_entry(path: Path, d: _Desc) -> Found:
    f = Found(path, "VMDK", path.stem, path, [path, *[e for e in d.extents if e.exists()]])
    f.facts.append(f"VMDK {d.create_type}" + (f", {human(d.capacity)} virtual" if d.capacity else ""))
    missing = [e.name for e in d.extents if not e.exists()]
    if missing:
        f.usable, f.why_not = False, f"extent(s) missing: {', '.join(missing[:5])}"
    elif d.problem:
        f.usable, f.why_not = False, d.problem
    _no_suffix(f, ".vmdk")
    return f


def _vmx(path: Path, descriptors: dict[Path, _Desc], real_roots: list[str], warn: Warn) -> Found | None:
    try:
        v = read_vmx(path)
    except Gho2KvmError as e:
        warn(escape(e.one_line(), 400))
        return None
    boot = v.boot_disk
    disks = sorted(v.disks, key=lambda d: d is not boot)
    title = v.display_name or path.stem
    f = Found(path, "VMware VM", title if ID_RE.match(_sanitise(title)) else path.stem, None, [path])
    f.facts.append(f"VMware VM {title!r}, guest OS {v.guest_os or '?'}, hardware version "
                   f"{v.hw_version or '?'}")
    if v.memory_mib and v.memory_mib >= 64:
        f.keys["memory_mib"] = v.memory_mib
    if v.vcpus:
        f.keys["vcpus"] = v.vcpus
    f.keys["title"] = title
    mac = v.nics[0].mac if v.nics else None
    if mac and MAC_RE.match(mac):
        f.keys["mac"] = mac
    elif mac:
        f.facts.append(f"NIC MAC {mac} (VMware's; mac: takes 52:54:00:xx:xx:xx, so the domain gets a "
                       "new one)")
    listed = []
    for vd in disks:
        disk = vd.path
        present = disk.is_file() and _inside(os.path.realpath(disk), real_roots)
        d = descriptors.get(disk)
        state = "" if present else " (missing or outside the scanned folders)"
        listed.append(f"{vd.slot} {disk.name}{state}")
        if present:
            f.files.append(disk)
            if d is not None:
                f.files += [e for e in d.extents if e.exists()]
                if d.parent is not None:
                    f.files.append(d.parent)
            if f.source is None:
                f.source = disk
                if d is not None and d.problem:
                    f.usable, f.why_not = False, f"system disk {disk.name}: {d.problem}"
                if d is not None and any(not e.exists() for e in d.extents):
                    f.usable, f.why_not = False, f"system disk {disk.name}: extent(s) missing"
    f.facts.append("disks: " + (", ".join(listed) if listed else "none"))
    if f.source is None:
        f.usable, f.why_not = False, "no disk of the VM was found"
    elif len(v.disks) > 1:
        f.facts.append(f"system disk: {f.source.name}; further disks are not migrated (one disk per image)")
    elif f.usable:
        # one disk: the .vmx itself is the source, so its settings (and VMware's MAC) follow the VM
        f.source, f.keys = path, {}
        f.facts.append("source: the .vmx (memory, vCPUs, title, MAC from it; gho2kvm plan shows them)")
    return f


def _ovf_disks(path: Path, warn: Warn) -> list[Path]:
    try:
        ovf = read_ovf(path)
    except Gho2KvmError as e:
        warn(escape(e.one_line(), 400))
        return []
    return [Path(os.path.normpath(path.parent / f.href)) for f in ovf.files]


def _tar_names(path: Path) -> list[str]:
    """The member names of an .ova (its tar headers only, each member checked)."""
    return [comment(m.name) for m in ova_members(path)][:32]


def _qcow2(path: Path, head: bytes) -> Found:
    version, = struct.unpack_from(">I", head, 4)
    backing, = struct.unpack_from(">Q", head, 8)
    size, = struct.unpack_from(">Q", head, 24)
    f = Found(path, "qcow2", path.stem, path, [path], [f"qcow2 version {version}, {human(size)} virtual"])
    if backing:
        f.usable = False
        f.why_not = "has a backing file (an overlay); qemu-img convert it to a standalone disk"
    _no_suffix(f, ".qcow2")
    return f


def _vhd(path: Path) -> Found:
    size = _size(path)
    head, tail = read_ends(path, 512, 512 if size % 512 == 0 else 0)
    footer = head if head[:8] == b"conectix" else tail
    disk_type = struct.unpack_from(">I", footer, 60)[0] if len(footer) >= 64 else 0
    vsize = struct.unpack_from(">Q", footer, 48)[0] if len(footer) >= 56 else 0
    kind = {2: "fixed", 3: "dynamic", 4: "differencing"}.get(disk_type, f"type {disk_type}")
    f = Found(path, "VHD", path.stem, path, [path], [f"VHD ({kind}), {human(vsize)} virtual"])
    if disk_type == 4:
        f.usable, f.why_not = False, "a differencing VHD (needs its parent); merge it first"
    _no_suffix(f, ".vhd")
    return f


_VHDX_METADATA = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
_VHDX_SIZE = uuid.UUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8").bytes_le


def vhdx_virtual_size(path: Path) -> int | None:
    """A VHDX's virtual size from its region table (at 192 KiB) and metadata table; None if not found."""
    fd, st = open_nonblocking(path)
    try:
        if file_kind(st.st_mode) is not None:
            return None
        regions = os.pread(fd, 4096, 192 * 1024)
        if regions[:4] != b"regi":
            return None
        count = min(struct.unpack_from("<I", regions, 8)[0], 100)
        for k in range(count):
            guid, offset = regions[16 + 32 * k:32 + 32 * k], struct.unpack_from("<Q", regions, 32 + 32 * k)[0]
            if guid != _VHDX_METADATA or offset + 65536 > st.st_size:
                continue
            table = os.pread(fd, 65536, offset)
            if table[:8] != b"metadata":
                return None
            for j in range(min(struct.unpack_from("<H", table, 10)[0], 2047)):
                item = table[32 + 32 * j:64 + 32 * j]
                if item[:16] == _VHDX_SIZE:
                    value = os.pread(fd, 8, offset + struct.unpack_from("<I", item, 16)[0])
                    return struct.unpack("<Q", value)[0] if len(value) == 8 else None
        return None
    finally:
        os.close(fd)


def _vhdx(path: Path) -> Found:
    size = vhdx_virtual_size(path)
    f = Found(path, "VHDX", path.stem, path, [path],
              [f"VHDX, {human(size)} virtual" if size else "VHDX (virtual size not found in its metadata)"])
    _no_suffix(f, ".vhdx")
    return f


def _raw(path: Path, head: bytes) -> Found:
    from pipeline.gho.info import MBR_TYPES

    f = Found(path, "raw disk", path.stem, path, [path])
    if head[512:520] == b"EFI PART":
        f.facts.append("raw disk with a GPT partition table")
    else:
        parts = [f"{MBR_TYPES.get(t, f'type 0x{t:02x}')} {human(c * 512)}"
                 + (" (active)" if s == 0x80 else "") for s, t, _, c in _mbr_entries(head[:512]) or []]
        f.facts.append("raw disk, MBR partitions: " + ", ".join(parts))
    _no_suffix(f, ".raw")
    return f


# -- ids ------------------------------------------------------------------------------------------
def _sanitise(name: str) -> str:
    s = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip(".-_")
    return re.sub(r"-{2,}", "-", s)


def _short_hash(p: Path) -> str:
    return hashlib.sha256(os.fsencode(p)).hexdigest()[:6]


def give_ids(found: list[Found], taken: set[str]) -> None:
    """A stable id for each entry: its name sanitised to ``[a-z0-9._-]``, at most 64 characters; an id
    already taken (in ``taken`` or by an earlier entry) gets ``-<6 hex of the path>``."""
    for f in found:
        base = _sanitise(f.name)[:57] or "image"
        cand = base
        if cand in taken or not ID_RE.match(cand):
            cand = f"{base}-{_short_hash(f.scanned)}"
        n = 2
        while cand in taken:
            cand, n = f"{base}-{_short_hash(f.scanned)}-{n}", n + 1
        f.id = cand
        taken.add(cand)


def env_name(image_id: str) -> str:
    return "GHO2KVM_PW_" + re.sub(r"[^A-Z0-9]", "_", image_id.upper())


# -- config text ----------------------------------------------------------------------------------
_NOT_PRINTABLE = re.compile("[^\x09\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def comment(text: str) -> str:
    """``text`` safe inside a one-line YAML comment (no line breaks, nothing YAML refuses)."""
    s = escape(text, 300)
    return _NOT_PRINTABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", s)


def quoted(text: str) -> str:
    """A YAML double-quoted scalar of ``text`` (every character escaped that needs it)."""
    out = yaml.safe_dump(text, default_style='"', width=1 << 30, allow_unicode=True)
    return out.split("\n", 1)[0]


MARK_USABLE = "scanned:"
MARK_PROPOSED = "scanned (not usable yet):"


def entry_text(f: Found, indent: str = "  ") -> str:
    """One commented entry of ``images:`` (commented out as a whole when it is not usable)."""
    lines = [f"# {comment(f.id)}: {comment(fact)}" if k == 0 else f"#   {comment(fact)}"
             for k, fact in enumerate(f.facts or [f.kind])]
    lines.append(f"#   {len(f.files)} file(s), {human(f.total_bytes())} on the shelf")
    mark = MARK_USABLE if f.usable else MARK_PROPOSED
    lines.append(f"# {mark} {quoted(str(f.scanned))}")
    if not f.usable:
        lines.append(f"# NOT USABLE YET: {comment(f.why_not)}")
    body = [f"- id: {f.id}"]
    if f.source is not None:
        body.append(f"  source: {quoted(str(f.source))}")
    for key in ("title", "memory_mib", "vcpus", "mac"):
        if key in f.keys:
            v = f.keys[key]
            body.append(f"  {key}: {v if isinstance(v, int) else quoted(v)}")
    if f.password:
        var = env_name(f.id)
        body += ["  ghost:", f"    password_env: {var}   # export {var}=… (the password) before migrate"]
    prefix = "" if f.usable else "# "
    return "".join(f"{indent}{line}\n" for line in lines) + "".join(f"{indent}{prefix}{b}\n" for b in body)


HEADER = """\
# gho2kvm config written by `gho2kvm scan` ({when}) from: {roots}
# Check each entry, then:  gho2kvm validate --config FILE  and  gho2kvm plan --config FILE
# Keys: docs/configuration.md. `gho2kvm scan DIR --update FILE` adds images found later.
defaults:
  format: raw                   # raw | qcow2
  libvirt_uri: test:///default  # a dry run; qemu:///system defines real domains on this host
  registry: [mergeide]          # the IDE driver fix Windows needs to boot from a new controller
images:
"""


def render_config(found: list[Found], roots: list[Path]) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = HEADER.format(when=when, roots=comment(" ".join(str(r) for r in roots)))
    usable = [f for f in found if f.usable]
    if not usable:
        text += "  []   # no usable image found; the entries below are commented out\n"
    return text + "".join(entry_text(f) for f in found)


# -- --update ---------------------------------------------------------------------------------------
_MARK_RE = re.compile(r'^\s*#\s*(scanned(?: \(not usable yet\))?):\s*(".*")\s*$')
_ID_RE = re.compile(r"^\s*(?:#\s*)?-?\s*id:\s*['\"]?([A-Za-z0-9._-]{1,64})")


@dataclass
class Update:
    text: str
    added: list[Found]
    gone: list[tuple[str, Path]]  # (id, source) of images whose source no longer exists


def update_config(path: Path, found: list[Found]) -> Update:
    """The text of ``path`` with entries for what ``found`` has and the config does not yet name.

    Known: every image's source, every file of an entry marked ``scanned:`` and, while it is still not
    usable, one marked ``scanned (not usable yet):``. New entries go after the last image, indented like
    it; every other byte of the file is kept. Raises :class:`ConfigError` for a config that does not load.
    """
    cfg = load_config(path, check_sources=False)
    text = read_capped(path, MiB, "config").decode("utf-8")
    known = {p for i in cfg.images for p in (os.path.normpath(i.source), os.path.realpath(i.source))}
    proposed: set[str] = set()
    taken = {i.id for i in cfg.images}
    for line in text.splitlines():
        if m := _MARK_RE.match(line):
            try:
                value = yaml.safe_load(m.group(2))
            except yaml.YAMLError:
                continue
            if isinstance(value, str):
                (known if m.group(1) == "scanned" else proposed).update(
                    {os.path.normpath(value), os.path.realpath(value)})
        if m := _ID_RE.match(line):
            taken.add(m.group(1))
    new = []
    for f in found:
        keys = {q for p in (f.scanned, *([f.source] if f.source else []))
                for q in (os.path.normpath(p), os.path.realpath(p))}
        if keys & known or (not f.usable and keys & proposed):
            continue
        new.append(f)
    give_ids(new, taken)
    gone = [(i.id, i.source) for i in cfg.images if not os.path.lexists(i.source)]
    if new:
        text = _insert(text, path, "".join(entry_text(f, "{indent}") for f in new))
    return Update(text, new, gone)


def _insert(text: str, path: Path, block: str) -> str:
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    images = None
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == "images":
                images = v
    if not isinstance(images, yaml.SequenceNode) or images.flow_style or not images.value:
        raise ConfigError([f"{escape(path, 300)}: images: must be a block list (one '- id:' per image) to "
                           "add entries to it"])
    dash_col = images.start_mark.column
    last_line = max(_last_line(n) for n in images.value)
    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    # the last image's own comments (indented deeper than its "-") stay with it
    while last_line + 1 < len(lines) and lines[last_line + 1].lstrip().startswith("#") and \
            len(lines[last_line + 1]) - len(lines[last_line + 1].lstrip()) > dash_col:
        last_line += 1
    block = block.replace("{indent}", " " * dash_col)
    return "".join(lines[:last_line + 1]) + block + "".join(lines[last_line + 1:])


def _last_line(node: yaml.Node) -> int:
    """The last line holding a value of ``node`` (a scalar's end is exact; a collection's is not)."""
    if isinstance(node, yaml.ScalarNode):
        end = node.end_mark
        return end.line if end.column > 0 or end.line == node.start_mark.line else end.line - 1
    if isinstance(node, yaml.SequenceNode):
        return max((_last_line(n) for n in node.value), default=node.start_mark.line)
    if isinstance(node, yaml.MappingNode):
        return max((max(_last_line(k), _last_line(v)) for k, v in node.value), default=node.start_mark.line)
    return node.start_mark.line


# -- the command ------------------------------------------------------------------------------------
def summary_line(f: Found) -> str:
    state = "" if f.usable else f"  [not usable yet: {comment(f.why_not)}]"
    return f"{f.id:<24} {f.kind:<12} {human(f.total_bytes()):>10}  {comment(str(f.scanned))}{state}"


def run(roots: list[Path], *, output: Path | None, update: Path | None, max_depth: int = MAX_DEPTH,
        max_files: int = MAX_FILES) -> int:
    problems = 0

    def warn(msg: str) -> None:
        nonlocal problems
        problems += 1
        print(f"scan: {msg}", file=sys.stderr)

    found = scan(roots, warn, max_depth=max_depth, max_files=max_files)
    if update is not None:
        up = update_config(update, found)
        if up.added:
            atomic.write_text(update, up.text)
        for f in up.added:
            print(f"added    {summary_line(f)}")
        for image_id, src in up.gone:
            print(f"gone     {image_id:<24} source {comment(str(src))} no longer exists (entry kept)")
        print(f"{update}: {len(up.added)} image(s) added, {len(up.gone)} source(s) gone, "
              f"{problems} file(s) skipped", file=sys.stderr)
        return 0
    give_ids(found, set())
    text = render_config(found, roots)
    if output is None:
        sys.stdout.write(text)
    else:
        if os.path.lexists(output):
            print(f"{escape(output, 300)}: exists; use --update {escape(output, 300)} to add new images "
                  "to it", file=sys.stderr)
            return 2
        atomic.write_text(output, text)
        for f in found:
            print(summary_line(f))
    print(f"{len(found)} image(s) found ({sum(f.usable for f in found)} usable), {problems} file(s) skipped"
          + (f"; written {output}" if output else ""), file=sys.stderr)
    return 0
