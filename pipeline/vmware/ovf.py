"""The one ``.ovf``/``.ova`` reader: an OVF appliance's files, disks, memory, CPUs and NICs, its manifest
checked, an OVA's tar members checked without unpacking.

OVF (DMTF DSP0243) is XML: ``References/File`` (``id``, ``href``, ``size``, ``compression``),
``DiskSection/Disk`` (``diskId``, ``fileRef``, ``capacity`` × ``capacityAllocationUnits``, ``format``)
and ``VirtualSystem/VirtualHardwareSection/Item`` (CIM RASD: ``ResourceType`` 3 CPUs, 4 memory,
5 IDE, 6 SCSI, 20 other storage controllers (SATA/NVMe by ``ResourceSubType``), 17 disk with
``HostResource`` ``ovf:/disk/<diskId>``, ``Parent`` and ``AddressOnParent``, 10 NIC with
``ResourceSubType`` and ``Address``; 14 floppy, 15/16 CD/DVD, 23 USB, 35 sound ignored with one info
line each). Elements and attributes are matched by local name, so OVF 0.9, 1.x and 2.x all read.

Refused, one line naming the file (and member): more than :data:`MAX_OVF_BYTES`, a DTD or entity
declaration (no entity is ever expanded), XML that does not parse, a ``href`` that is not a plain file
name, two files with one id or href, a disk naming a file or a hardware item naming a disk that does not
exist, two disks on one controller slot, numbers that are not numbers.

The manifest (``<name>.mf``): lines ``SHA1(file)= hex`` or ``SHA256(file)= hex``
(:func:`parse_manifest`); every file the OVF references must be listed and match
(:func:`verify_ova`) before any of it is used.

An OVA is a tar (:func:`ova_members`): only regular-file members with plain names are accepted (no
``..``, no absolute or nested names, no links, devices, FIFOs or folders, no name twice); the data is
never unpacked: each member's offset and size inside the tar is kept, so a disk can be read in place.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.safeio import MiB, escape, file_kind, open_nonblocking, read_capped
from pipeline.vmware.vmx import CONTROLLERS, is_unicast_mac

MAX_OVF_BYTES = 4 * MiB
MAX_MANIFEST_BYTES = 1 * MiB
MAX_MEMBERS = 256
MAX_DISKS = 64
_HASHES = {"sha1": 40, "sha256": 64, "sha512": 128}
_MF_RE = re.compile(r"^(SHA1|SHA256|SHA512)\s*\((.+)\)\s*=\s*([0-9A-Fa-f]+)\s*$")
_UNITS_RE = re.compile(r"^\s*byte\s*(?:\*\s*(\d+)\s*\^\s*(\d+))?\s*$", re.I)
_UNIT_NAMES = {"bytes": 1, "kilobytes": 1 << 10, "kb": 1 << 10, "megabytes": 1 << 20, "mb": 1 << 20,
               "gigabytes": 1 << 30, "gb": 1 << 30}
_IGNORED = {"14": "floppy drive", "15": "CD/DVD drive", "16": "CD/DVD drive", "23": "USB controller",
            "35": "sound card", "1": "other device", "24": "graphics"}


@dataclass(frozen=True)
class OvfFile:
    id: str
    href: str
    size: int | None
    compression: str | None


@dataclass(frozen=True)
class OvfDisk:
    disk_id: str
    file: OvfFile
    capacity: int  # bytes
    format: str  # e.g. http://www.vmware.com/interfaces/specifications/vmdk.html#streamOptimized
    bus: str  # ide | sata | scsi | nvme
    controller: int
    unit: int

    @property
    def stream_optimized(self) -> bool:
        return self.format.lower().endswith("#streamoptimized")


@dataclass(frozen=True)
class OvfNic:
    model: str | None  # ResourceSubType, lower case (e1000, vmxnet3, pcnet32, ...)
    mac: str | None


@dataclass(frozen=True)
class Ovf:
    path: Path
    name: str | None
    annotation: str | None
    files: tuple[OvfFile, ...]
    disks: tuple[OvfDisk, ...]  # in the VM's order (controller kind, controller, unit)
    memory_mib: int | None
    vcpus: int | None
    cores_per_socket: int | None
    firmware: str | None  # efi | bios | None
    nics: tuple[OvfNic, ...]
    info: tuple[str, ...] = field(default_factory=tuple)


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _attr(el: ET.Element, name: str) -> str | None:
    for k, v in el.attrib.items():
        if _local(k) == name:
            return v
    return None


def _child(el: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in el if _local(c.tag) == name), None)


def _text(el: ET.Element, name: str) -> str | None:
    c = _child(el, name)
    return c.text.strip() if c is not None and c.text and c.text.strip() else None


def _all(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el.iter() if _local(c.tag) == name]


def _plain_name(href: str) -> bool:
    return bool(href) and "/" not in href and "\\" not in href and href not in (".", "..") \
        and "\x00" not in href and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", href)


def _units(value: str | None, where: str) -> int:
    if not value:
        return 1
    m = _UNITS_RE.match(value)
    if m:
        return int(m.group(1)) ** int(m.group(2)) if m.group(1) else 1
    n = _UNIT_NAMES.get(value.strip().lower())
    if n is None:
        raise InputError(f"{where}: allocation units {escape(value, 40)!r} not understood; expected e.g. "
                         "'byte * 2^20'")
    return n


def _num(value: str | None, where: str, what: str, hi: int = 1 << 62) -> int | None:
    if value is None:
        return None
    if not value.strip().isdigit() or not 0 <= int(value) <= hi:
        raise InputError(f"{where}: {what} is {escape(value, 40)!r}; expected a whole number")
    return int(value)


def parse_ovf(data: bytes, path: Path) -> Ovf:
    """The facts of an OVF descriptor whose bytes are ``data`` (``path`` names it in messages)."""
    name = escape(path, 300)
    if len(data) > MAX_OVF_BYTES:
        raise InputError(f"{name}: too large for an OVF descriptor ({len(data)} bytes, at most "
                         f"{MAX_OVF_BYTES} accepted)")
    if re.search(rb"<!(DOCTYPE|ENTITY)", data, re.I):
        raise InputError(f"{name}: OVF descriptor has a DTD or entity declaration; refused")
    try:
        root = ET.fromstring(data)
    except (ET.ParseError, LookupError, ValueError) as e:  # LookupError: an unknown encoding="…"
        raise InputError(f"{name}: not an OVF descriptor (XML: {escape(str(e), 120)})") from None
    if _local(root.tag) != "Envelope":
        tag = escape(_local(root.tag), 40)
        raise InputError(f"{name}: not an OVF descriptor (the root element is {tag!r}, expected Envelope)")
    files: dict[str, OvfFile] = {}
    hrefs: set[str] = set()
    refs = _child(root, "References")
    for f in (refs if refs is not None else []):
        if _local(f.tag) != "File":
            continue
        fid, href = _attr(f, "id") or "", _attr(f, "href") or ""
        if not _plain_name(href):
            raise InputError(f"{name}: References/File {escape(fid, 40)!r} href {escape(href, 120)!r} is not "
                             "a plain file name next to the descriptor; refused")
        if fid in files or href.lower() in hrefs:
            raise InputError(f"{name}: References names file {escape(fid or href, 120)!r} twice; refused")
        if _attr(f, "chunkSize"):
            raise InputError(f"{name}: File {escape(href, 120)!r} is split in chunks; not supported")
        files[fid] = OvfFile(fid, href, _num(_attr(f, "size"), name, f"File {href} size"),
                             _attr(f, "compression") or None)
        hrefs.add(href.lower())
    disks: dict[str, tuple[OvfFile, int, str]] = {}
    for d in _all(root, "Disk"):
        did, ref = _attr(d, "diskId") or "", _attr(d, "fileRef")
        if did in disks:
            raise InputError(f"{name}: DiskSection names disk {escape(did, 40)!r} twice; refused")
        if ref is None or ref not in files:
            raise InputError(f"{name}: Disk {escape(did, 40)!r} fileRef {escape(ref or '', 40)!r} names no "
                             "References/File (a disk without content is not migrated)")
        cap = _num(_attr(d, "capacity"), name, f"Disk {did} capacity") or 0
        cap *= _units(_attr(d, "capacityAllocationUnits"), name)
        disks[did] = (files[ref], cap, _attr(d, "format") or "")
    systems = _all(root, "VirtualSystem")
    if len(systems) != 1:
        raise InputError(f"{name}: OVF holds {len(systems)} virtual systems; exactly one expected (one image "
                         "= one VM)")
    vs = systems[0]
    info: list[str] = []
    items = _all(vs, "Item") + _all(vs, "StorageItem") + _all(vs, "EthernetPortItem")
    by_instance: dict[str, ET.Element] = {}
    for it in items:
        iid = _text(it, "InstanceID")
        if iid is not None:
            by_instance[iid] = it
    mem = vcpus = cores = None
    nics: list[OvfNic] = []
    placed: list[tuple[tuple[int, int, int], OvfDisk]] = []
    slots: set[tuple[str, int, int]] = set()
    for it in items:
        rtype = _text(it, "ResourceType") or ""
        label = escape(_text(it, "ElementName") or _text(it, "InstanceID") or rtype, 60)
        if rtype == "3":
            vcpus = _num(_text(it, "VirtualQuantity"), name, "CPU VirtualQuantity", 768)
            cores = _num(_text(it, "CoresPerSocket"), name, "CoresPerSocket", 768)
        elif rtype == "4":
            q = _num(_text(it, "VirtualQuantity"), name, "memory VirtualQuantity")
            if q is not None:
                mem = q * _units(_text(it, "AllocationUnits"), name) // (1 << 20)
        elif rtype == "10":
            mac = (_text(it, "Address") or "").lower().replace("-", ":") or None
            if mac is not None and not is_unicast_mac(mac):
                raise InputError(f"{name}: NIC {label} Address is {escape(mac, 40)!r}; expected a unicast "
                                 "MAC, six hex pairs like 00:50:56:01:02:03")
            sub = (_text(it, "ResourceSubType") or "").lower() or None
            nics.append(OvfNic(sub, mac))
        elif rtype == "17":
            host = _text(it, "HostResource") or ""
            did = re.sub(r"^(ovf:)?/disk/", "", host)
            if not host or did not in disks:
                if host.startswith(("ovf:/file/", "/file/")):
                    raise InputError(f"{name}: disk item {label} names a file, not a DiskSection disk; "
                                     "refused")
                info.append(f"disk item {label}: no disk content ({escape(host, 60) or 'empty'}); ignored")
                continue
            parent = by_instance.get(_text(it, "Parent") or "")
            bus, ctrl = _bus(parent)
            unit = _num(_text(it, "AddressOnParent") or "0", name, f"disk {label} AddressOnParent", 64) or 0
            if (bus, ctrl, unit) in slots:
                raise InputError(f"{name}: two disks on {bus}{ctrl}:{unit}; refused")
            slots.add((bus, ctrl, unit))
            dfile, cap, fmt = disks[did]
            disk = OvfDisk(did, dfile, cap, fmt, bus, ctrl, unit)
            placed.append(((CONTROLLERS.index(bus), ctrl, unit), disk))
        elif rtype in _IGNORED:
            info.append(f"{label}: {_IGNORED[rtype]} ignored")
    if len(placed) > MAX_DISKS:
        raise InputError(f"{name}: {len(placed)} disks; at most {MAX_DISKS} accepted")
    firmware = None
    for c in _all(vs, "Config"):
        if (_attr(c, "key") or "").lower() == "firmware":
            firmware = (_attr(c, "value") or "").lower() or None
    ann = next((a for a in _all(vs, "Annotation")), None)
    return Ovf(path=path, name=_text(vs, "Name") or _attr(vs, "id"),
               annotation=ann.text.strip() if ann is not None and ann.text and ann.text.strip() else None,
               files=tuple(files.values()), disks=tuple(d for _, d in sorted(placed, key=lambda p: p[0])),
               memory_mib=mem, vcpus=vcpus, cores_per_socket=cores, firmware=firmware, nics=tuple(nics),
               info=tuple(info))


def _bus(ctrl: ET.Element | None) -> tuple[str, int]:
    """(bus, controller number) of a disk's parent controller item."""
    if ctrl is None:
        return "ide", 0
    rtype = _text(ctrl, "ResourceType") or ""
    sub = (_text(ctrl, "ResourceSubType") or "").lower()
    num = _text(ctrl, "Address") or "0"
    n = int(num) if num.isdigit() and int(num) < 64 else 0
    if rtype == "5":
        return "ide", n
    if rtype == "6":
        return "scsi", n
    return ("nvme" if "nvme" in sub else "sata"), n


def parse_manifest(data: bytes, path: Path) -> dict[str, tuple[str, str]]:
    """File name → (algorithm, lower-case hex digest) of a ``.mf``; refuses any other line."""
    name = escape(path, 300)
    if len(data) > MAX_MANIFEST_BYTES:
        raise InputError(f"{name}: manifest too large ({len(data)} bytes)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{name}: manifest is not UTF-8 text") from None
    out: dict[str, tuple[str, str]] = {}
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _MF_RE.match(line)
        if not m or len(m.group(3)) != _HASHES[m.group(1).lower()]:
            raise InputError(f"{name}:{no}: expected SHA1(file)= or SHA256(file)= and its hex digest, got "
                             f"{escape(line.strip(), 80)!r}")
        if m.group(2) in out:
            raise InputError(f"{name}:{no}: {escape(m.group(2), 120)!r} listed twice")
        out[m.group(2)] = (m.group(1).lower(), m.group(3).lower())
    return out


@dataclass(frozen=True)
class Member:
    name: str
    offset: int  # of the data inside the tar
    size: int


def ova_members(path: Path) -> list[Member]:
    """The members of an OVA (a tar), each checked; the data is not read."""
    name = escape(path, 300)
    fd, st = open_nonblocking(path)
    try:
        if (kind := file_kind(st.st_mode)) is not None:
            raise InputError(f"{name}: OVA is {kind}; refused")
        with os.fdopen(os.dup(fd), "rb") as fo:
            try:
                tar = tarfile.open(fileobj=fo, mode="r:")  # noqa: SIM115 (members read one by one below)
            except tarfile.TarError as e:
                raise InputError(f"{name}: not an OVA (tar: {escape(str(e), 80)})") from None
            out: list[Member] = []
            seen: set[str] = set()
            try:
                while (ti := tar.next()) is not None:
                    shown = escape(ti.name, 120)
                    if len(out) >= MAX_MEMBERS:
                        raise InputError(f"{name}: more than {MAX_MEMBERS} members; refused")
                    if not ti.isreg():
                        what = ("a link" if ti.issym() or ti.islnk() else "a folder" if ti.isdir()
                                else "a device or FIFO")
                        raise InputError(f"{name}: member {shown!r} is {what}; an OVA holds files only")
                    if not _plain_name(ti.name) or ti.name.startswith("-"):
                        raise InputError(f"{name}: member {shown!r} is not a plain file name (no folders, "
                                         "'..' or absolute names); refused")
                    if ti.name.lower() in seen:
                        raise InputError(f"{name}: member {shown!r} appears twice; refused")
                    seen.add(ti.name.lower())
                    out.append(Member(ti.name, ti.offset_data, ti.size))
            except tarfile.TarError as e:
                why = escape(str(e), 80)
                raise InputError(f"{name}: damaged tar after {len(out)} member(s): {why}") from None
            if ti is None and out and out[-1].offset + out[-1].size > st.st_size:
                raise InputError(f"{name}: member {escape(out[-1].name, 120)!r} is cut short (the OVA is "
                                 "truncated)")
            return out
    finally:
        os.close(fd)


def _digest(fd: int, offset: int, size: int, algo: str) -> str:
    h = hashlib.new(algo)
    pos, end = offset, offset + size
    while pos < end:
        chunk = os.pread(fd, min(4 * MiB, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Ova:
    path: Path
    ovf: Ovf
    members: dict[str, Member]  # by name
    manifest: dict[str, tuple[str, str]] | None  # None: the OVA carries none


def read_ova(path: Path) -> Ova:
    """An OVA's descriptor, its members checked and every referenced file verified against the
    manifest (when there is one) before anything else reads them."""
    name = escape(path, 300)
    members = ova_members(path)
    by_name = {m.name: m for m in members}
    ovfs = [m for m in members if m.name.lower().endswith(".ovf")]
    if len(ovfs) != 1:
        raise InputError(f"{name}: holds {len(ovfs)} .ovf descriptors; exactly one expected")
    mfs = [m for m in members if m.name.lower().endswith(".mf")]
    if len(mfs) > 1:
        raise InputError(f"{name}: holds {len(mfs)} manifests; at most one expected")
    fd, _ = open_nonblocking(path)
    try:
        def data(m: Member, cap: int) -> bytes:
            if m.size > cap:
                raise InputError(f"{name}: member {escape(m.name, 120)!r} too large ({m.size} bytes)")
            return os.pread(fd, m.size, m.offset)

        def check(member: Member) -> None:
            if manifest is None:
                return
            want = manifest.get(member.name)
            if want is None:
                raise InputError(f"{name}: member {escape(member.name, 120)!r} is not in the manifest "
                                 f"{escape(mfs[0].name, 120)}; refused")
            got = _digest(fd, member.offset, member.size, want[0])
            if got != want[1]:
                raise InputError(f"{name}: member {escape(member.name, 120)!r} fails its "
                                 f"{want[0].upper()} check (manifest {want[1][:16]}…, content "
                                 f"{got[:16]}…); the OVA is damaged")

        desc = ovfs[0]
        manifest = parse_manifest(data(mfs[0], MAX_MANIFEST_BYTES), Path(f"{path}:{mfs[0].name}")) \
            if mfs else None
        check(desc)  # the descriptor is verified before it is parsed
        ovf = parse_ovf(data(desc, MAX_OVF_BYTES), Path(f"{path}:{desc.name}"))
        for f in ovf.files:
            if f.href not in by_name:
                raise InputError(f"{name}: the OVF references {escape(f.href, 120)!r}, which the OVA does "
                                 "not hold")
            if f.size is not None and f.size != by_name[f.href].size:
                raise InputError(f"{name}: member {escape(f.href, 120)!r} is {by_name[f.href].size} bytes, "
                                 f"the OVF says {f.size}")
        for f in ovf.files:
            check(by_name[f.href])
    finally:
        os.close(fd)
    return Ova(path, ovf, by_name, manifest)


def read_ovf(path: Path) -> Ovf:
    """An unpacked ``.ovf`` (a regular file of at most :data:`MAX_OVF_BYTES`)."""
    return parse_ovf(read_capped(path, MAX_OVF_BYTES, "OVF descriptor"), path)


#: digests computed in this process, by (file, device, inode, size, mtime, algorithm): a config is loaded
#: more than once per run, a disk is hashed once
_checked: dict[tuple[str, int, int, int, int, str], str] = {}


def verify_ovf_folder(path: Path) -> Ovf:
    """An unpacked appliance: the ``.ovf``, and every file it references checked against the
    ``<stem>.mf`` next to it (when there is one), each a regular file in the descriptor's folder."""
    ovf = read_ovf(path)
    name = escape(path, 300)
    mf = path.with_suffix(".mf")
    manifest = parse_manifest(read_capped(mf, MAX_MANIFEST_BYTES, "manifest"), mf) if mf.exists() else None
    for f in ovf.files:
        target = path.parent / f.href
        try:
            fd, st = open_nonblocking(target)
        except OSError as e:
            raise InputError(f"{name}: referenced file {escape(f.href, 120)!r}: {e.strerror}") from None
        try:
            if (kind := file_kind(st.st_mode)) is not None:
                raise InputError(f"{name}: referenced file {escape(f.href, 120)!r} is {kind}; refused")
            if manifest is None:
                continue
            for member, want in ((path.name, manifest.get(path.name)), (f.href, manifest.get(f.href))):
                if want is None:
                    raise InputError(f"{name}: {escape(member, 120)!r} is not in the manifest "
                                     f"{escape(mf, 200)}")
            want = manifest[f.href]
            key = (os.path.realpath(target), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, want[0])
            got = _checked.get(key) or _digest(fd, 0, st.st_size, want[0])
            _checked[key] = got
            if got != want[1]:
                raise InputError(f"{name}: {escape(f.href, 120)!r} fails its {want[0].upper()} check against "
                                 f"{escape(mf.name, 120)}; damaged")
        finally:
            os.close(fd)
    return ovf
