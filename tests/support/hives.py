"""Real-shaped Windows hives for the registry tests, built with hivex (``hivexregedit --merge``) and,
for dirty hives, transaction logs written per the published format (see :mod:`pipeline.registry.txlog`).

* :func:`win7_system`: a Windows 7 SYSTEM hive (ControlSet001 live) whose CriticalDeviceDatabase
  has thousands of entries, among them the vendor IDE controllers mshdc.inf maps to their own
  drivers (``amdide``, ``cmdide``, ``aliide``, ``viaide``, with their Services keys), spelled as
  Windows spells them (lower-case ClassGUIDs), one entry naming a service the guest lacks, and one
  without a ``Service`` value;
* :func:`dirty_win10`: a Windows 10 SYSTEM hive whose newest state is only in ``SYSTEM.LOG1`` and
  ``SYSTEM.LOG2`` (new-format ``HvLE`` entries that add keys, change values, delete values);
* :func:`old_format_dirty`: the same for an old-format (``DIRT``) ``system.LOG``;
* :func:`damage`: copies of a hive damaged in the ways real ones are.

Built hives are cached under ``var/testhives/`` by the hash of this file and of the hive writer.
"""

from __future__ import annotations

import hashlib
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from pipeline.registry import hive, regf, txlog
from pipeline.registry.regf import BASE

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "var" / "testhives"
_STAMP = hashlib.sha256(Path(__file__).read_bytes() + Path(hive.__file__).read_bytes()).hexdigest()[:12]
SYS = r"HKEY_LOCAL_MACHINE\SYSTEM"
GUID_IDE = "{4d36e96a-e325-11ce-bfc1-08002be10318}"  # hdc class, as Windows 7 writes it
GUID_NET = "{4d36e972-e325-11ce-bfc1-08002be10318}"

#: the vendor IDE controllers a real Windows 7 CDD maps to their own inbox drivers (mshdc.inf)
VENDOR_IDE = {
    "pci#ven_1022&dev_7401": "amdide", "pci#ven_1022&dev_7409": "amdide", "pci#ven_1022&dev_7411": "amdide",
    "pci#ven_1095&dev_0640": "cmdide", "pci#ven_1095&dev_0643": "cmdide", "pci#ven_1095&dev_0646": "cmdide",
    "pci#ven_10b9&dev_5229": "aliide", "pci#ven_10b9&dev_5219": "aliide", "pci#ven_1106&dev_0571": "viaide",
}
#: entries of the built-in set a Windows 7 install already has, with Windows' own values
WIN7_INBOX = {
    "primary_ide_channel": "atapi", "secondary_ide_channel": "atapi", "gendisk": "disk",
    "pci#ven_8086&dev_7010": "intelide", "pci#ven_8086&dev_7111": "intelide", "pci#cc_0101": "pciide",
}
STALE_CDD = ("pci#ven_1039&dev_5513", "sisraid")  # names a service this guest does not have
NO_SERVICE_CDD = "pci#ven_1106&dev_0581"  # has a ClassGUID, no Service value


def _reg(lines: list[str]) -> str:
    return "Windows Registry Editor Version 5.00\n\n" + "\n".join(lines) + "\n"


def _sz(name: str, value: str) -> str:
    return f'"{name}"="{value}"'


def _service(cs: str, name: str, start: int, group: str = "") -> list[str]:
    path = "\\\\".join(["system32", "DRIVERS", f"{name}.sys"])
    return [f"[{SYS}\\{cs}\\Services\\{name}]", _sz("DisplayName", name), f'"Start"=dword:{start:08x}',
            '"Type"=dword:00000001', '"ErrorControl"=dword:00000001', _sz("ImagePath", path),
            *([_sz("Group", group)] if group else []), ""]


def win7_lines(cs: str = "ControlSet001", *, cdd: int = 2400, services: int = 500) -> list[str]:
    """The .reg lines of a Windows 7 SYSTEM hive with ``cdd`` filler CDD entries and ``services``
    filler services (plus the storage ones)."""
    lines = [f"[{SYS}\\Select]", '"Current"=dword:00000001', '"Default"=dword:00000001',
             '"LastKnownGood"=dword:00000002', '"Failed"=dword:00000000', "",
             f"[{SYS}\\{cs}]", "", f"[{SYS}\\{cs}\\Control]", "", f"[{SYS}\\{cs}\\Services]", "",
             f"[{SYS}\\{cs}\\Control\\CriticalDeviceDatabase]", "",
             f"[{SYS}\\{cs}\\Control\\ComputerName]", "",
             f"[{SYS}\\{cs}\\Control\\ComputerName\\ComputerName]",
             _sz("ComputerName", "WIN7REAL"), ""]
    storage = {"atapi": 0, "intelide": 3, "pciide": 3, "msahci": 3, "amdide": 3, "cmdide": 3,
               "aliide": 3, "viaide": 3, "disk": 0, "pciidex": 3}
    for name, start in storage.items():
        lines += _service(cs, name, start, "SCSI miniport" if name in ("atapi", "msahci") else "")
    for i in range(services):
        lines += _service(cs, f"svc{i:04d}", 3)
    cdd_key = f"{SYS}\\{cs}\\Control\\CriticalDeviceDatabase"
    for dev, svc in {**VENDOR_IDE, **WIN7_INBOX}.items():
        lines += [f"[{cdd_key}\\{dev}]", _sz("ClassGUID", GUID_IDE), _sz("Service", svc), ""]
    lines += [f"[{cdd_key}\\{STALE_CDD[0]}]", _sz("ClassGUID", GUID_IDE), _sz("Service", STALE_CDD[1]), "",
              f"[{cdd_key}\\{NO_SERVICE_CDD}]", _sz("ClassGUID", GUID_IDE), ""]
    for i in range(cdd):
        lines += [f"[{cdd_key}\\pci#ven_{0x2000 + i // 16:04x}&dev_{i % 16:04x}]", _sz("ClassGUID", GUID_NET),
                  _sz("Service", f"svc{i % max(services, 1):04d}"), ""]
    return lines


def _cached(name: str) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE / f"{_STAMP}-{name}"


def build(path: Path, lines: list[str], prefix: str = SYS, *, minor: int = 5) -> Path:
    hive.write_empty_hive(path, "SYSTEM" if prefix == SYS else "SOFTWARE", minor_version=minor)
    hive.apply_reg(path, _reg(lines), prefix, step="test-hive")
    return path


def win7_system(dest: Path) -> Path:
    """A copy of the cached Windows 7 SYSTEM hive at ``dest``."""
    src = _cached("win7-system")
    if not src.exists():
        tmp = src.with_suffix(".tmp")
        build(tmp, win7_lines(), minor=3)
        tmp.rename(src)
    shutil.copyfile(src, dest)
    return dest


# ------------------------------------------------------------------------------ transaction logs

def dirty_pages(before: bytes, after: bytes, page: int = 4096) -> list[tuple[int, bytes]]:
    """``(offset in the bins data, bytes)`` of every ``page``-sized piece of the hive bins data that
    differs between two versions of a hive (``after`` may be longer)."""
    out = []
    a, b = before[BASE:], after[BASE:]
    for off in range(0, len(b), page):
        if a[off:off + page] != b[off:off + page]:
            out.append((off, b[off:off + page]))
    return out


def log_base(primary: bytes, file_type: int, seq: int) -> bytes:
    """The first sector of a log: the primary's base block with ``file_type`` and both sequence
    numbers ``seq``, checksum recomputed."""
    b = bytearray(primary[:BASE])
    struct.pack_into("<II", b, 4, seq, seq)
    struct.pack_into("<I", b, 28, file_type)
    struct.pack_into("<I", b, 0x1FC, regf.checksum(b))
    return bytes(b[:txlog.SECTOR])


def hvle(seq: int, bins_size: int, pages: list[tuple[int, bytes]], flags: int = 0) -> bytes:
    """One new-format log entry (sector-aligned, both hashes)."""
    refs = b"".join(struct.pack("<II", off, len(p)) for off, p in pages)
    body = refs + b"".join(p for _, p in pages)
    size = -(-(40 + len(body)) // txlog.SECTOR) * txlog.SECTOR
    body = body.ljust(size - 40, b"\0")
    head = struct.pack("<4sIIIII", b"HvLE", size, flags, seq, bins_size, len(pages))
    h1 = txlog.marvin32(body)
    head += struct.pack("<Q", h1)
    h2 = txlog.marvin32(head)
    return head + struct.pack("<Q", h2) + body


def new_log(primary: bytes, entries: list[bytes], seq: int) -> bytes:
    return log_base(primary, 6, seq).ljust(txlog.SECTOR, b"\0") + b"".join(entries)


def old_log(primary_before: bytes, after: bytes, seq: int) -> bytes:
    """An old-format log taking ``primary_before`` to ``after`` (512-byte pages, DIRT bitmap)."""
    bins = struct.unpack_from("<I", after, 40)[0]
    base = bytearray(primary_before[:BASE])
    struct.pack_into("<I", base, 40, bins)
    head = log_base(bytes(base), 1, seq)
    nbits = bins // txlog.SECTOR
    bitmap = bytearray((nbits + 7) // 8)
    pages = dirty_pages(primary_before, after, txlog.SECTOR)
    for off, _ in pages:
        bit = off // txlog.SECTOR
        bitmap[bit // 8] |= 1 << (bit % 8)
    vec = (b"DIRT" + bytes(bitmap))
    vec = vec.ljust(-(-len(vec) // txlog.SECTOR) * txlog.SECTOR, b"\0")
    return head + vec + b"".join(p for _, p in pages)


@dataclass(frozen=True)
class DirtyHive:
    system: Path  # the primary file as Windows left it (dirty)
    logs: dict[str, Path]  # name → path (SYSTEM.LOG1, SYSTEM.LOG2, ...)
    expected: Path  # the hive as it is after the logs (what a replay must give, bins data equal)
    seqs: tuple[int, int]  # primary / secondary sequence numbers of the dirty primary


#: what the logs of :func:`dirty_win10` do, step by step (LOG1 has step 1, LOG2 step 2)
W10_STEP1 = [
    f"[{SYS}\\ControlSet001\\Control\\Class\\{{4d36e967-e325-11ce-bfc1-08002be10318}}\\0001]",
    _sz("DriverDesc", "Disk drive"), _sz("InfPath", "disk.inf"), '"Recovered"=dword:00000001', "",
    f"[{SYS}\\ControlSet001\\Services\\storahci]", '"Start"=dword:00000003', "",  # was 0 before: changed
]
W10_STEP2 = [
    f"[{SYS}\\ControlSet001\\Services\\svc0001]", '"DisplayName"=-', "",  # a value deleted
    f"[{SYS}\\ControlSet001\\Services\\NewFromLog]", '"Start"=dword:00000002', _sz("Marker", "from LOG2"), "",
]


def win10_lines(cs: str = "ControlSet001", services: int = 800) -> list[str]:
    lines = [f"[{SYS}\\Select]", '"Current"=dword:00000001', "", f"[{SYS}\\{cs}]", "",
             f"[{SYS}\\{cs}\\Control]", "", f"[{SYS}\\{cs}\\Control\\Class]", "",
             f"[{SYS}\\{cs}\\Control\\Class\\{{4d36e967-e325-11ce-bfc1-08002be10318}}]", "",
             f"[{SYS}\\{cs}\\Services]", ""]
    for name, start in {"storahci": 0, "pciide": 3, "intelide": 3, "atapi": 3, "disk": 0}.items():
        lines += _service(cs, name, start)
    lines += [f"[{SYS}\\{cs}\\Services\\storahci\\StartOverride]", '"0"=dword:00000003', ""]
    for i in range(services):
        lines += _service(cs, f"svc{i:04d}", 3)
    return lines


def dirty_win10(folder: Path, *, seq: int = 4316, truncate_log2: bool = False) -> DirtyHive:
    """A dirty Windows 10 SYSTEM hive in ``folder``: primary sequence numbers ``seq + 1``/``seq``,
    ``SYSTEM.LOG1`` holding entry ``seq`` (step 1), ``SYSTEM.LOG2`` entry ``seq + 1`` (step 2); with
    ``truncate_log2`` the second log is cut in the middle of its entry."""
    folder.mkdir(parents=True, exist_ok=True)
    h0 = _cached("w10-h0")
    if not h0.exists():
        tmp = h0.with_suffix(".tmp")
        build(tmp, win10_lines())
        tmp.rename(h0)
    s0 = folder / "s0"
    shutil.copyfile(h0, s0)
    d0 = s0.read_bytes()
    hive.apply_reg(s0, _reg(W10_STEP1), SYS, step="test-hive")
    d1 = s0.read_bytes()
    hive.apply_reg(s0, _reg(W10_STEP2), SYS, step="test-hive")
    d2 = s0.read_bytes()
    s0.unlink()
    bins1, bins2 = (struct.unpack_from("<I", d, 40)[0] for d in (d1, d2))
    primary = bytearray(d0)
    struct.pack_into("<II", primary, 4, seq + 1, seq)
    struct.pack_into("<I", primary, 0x1FC, regf.checksum(primary))
    log1 = new_log(bytes(primary), [hvle(seq, bins1, dirty_pages(d0, d1))], seq)
    log2 = new_log(bytes(primary), [hvle(seq + 1, bins2, dirty_pages(d1, d2))], seq + 1)
    if truncate_log2:
        log2 = log2[:txlog.SECTOR + (len(log2) - txlog.SECTOR) // 2]
    out = {"SYSTEM": bytes(primary), "SYSTEM.LOG1": log1, "SYSTEM.LOG2": log2, "SYSTEM.LOG": b""}
    for name, data in out.items():
        (folder / name).write_bytes(data)
    (folder / "expected").write_bytes(d1 if truncate_log2 else d2)
    return DirtyHive(folder / "SYSTEM", {n: folder / n for n in out if n != "SYSTEM"}, folder / "expected",
                     (seq + 1, seq))


def old_format_dirty(folder: Path, *, seq: int = 205) -> DirtyHive:
    """A dirty hive with one old-format ``system.LOG`` (XP .. 8) holding both steps."""
    folder.mkdir(parents=True, exist_ok=True)
    h0 = _cached("w10-h0")
    if not h0.exists():
        dirty_win10(folder / "seed")
    s0 = folder / "s0"
    shutil.copyfile(h0, s0)
    d0 = s0.read_bytes()
    hive.apply_reg(s0, _reg(W10_STEP1 + W10_STEP2), SYS, step="test-hive")
    d2 = s0.read_bytes()
    s0.unlink()
    primary = bytearray(d0)
    struct.pack_into("<II", primary, 4, seq + 1, seq)
    struct.pack_into("<I", primary, 0x1FC, regf.checksum(primary))
    (folder / "system").write_bytes(bytes(primary))
    (folder / "system.LOG").write_bytes(old_log(bytes(primary), d2, seq + 1))
    (folder / "expected").write_bytes(d2)
    return DirtyHive(folder / "system", {"system.LOG": folder / "system.LOG"}, folder / "expected",
                     (seq + 1, seq))


# ------------------------------------------------------------------------------ damage

def _key_offset(data: bytes, path: str) -> int:
    h = regf.Hive(data)
    off = h.find(path)
    assert off is not None, path
    return off


def damage(src: Path, dest: Path, kind: str) -> Path:
    """A copy of hive ``src`` damaged in one way: ``checksum``, ``truncated`` (the file cut inside
    its last hive bins), ``outside`` (a subkey list pointing past the hive), ``loop`` (a key's
    subkey list containing its parent)."""
    data = bytearray(src.read_bytes())
    if kind == "checksum":
        data[0x1FC] ^= 0x5A
    elif kind == "truncated":
        bins = struct.unpack_from("<I", data, 40)[0]
        del data[BASE + bins // 2 + 100:]
    elif kind in ("outside", "loop"):
        key = _key_offset(bytes(data), r"\ControlSet001\Services")
        h = regf.Hive(bytes(data))
        child = h.subkeys(key)[0]
        nk = BASE + child + 4
        if kind == "outside":
            struct.pack_into("<I", data, nk + 20, 1)  # one subkey ...
            struct.pack_into("<I", data, nk + 28, 0x7FFF0000)  # ... in a list far past the end
        else:
            count, lst = struct.unpack_from("<I", data, BASE + key + 4 + 20)[0], \
                struct.unpack_from("<I", data, BASE + key + 4 + 28)[0]
            struct.pack_into("<I", data, nk + 20, count)
            struct.pack_into("<I", data, nk + 28, lst)  # its subkeys: its parent's list (itself)
    else:
        raise ValueError(kind)
    dest.write_bytes(bytes(data))
    return dest


def cached_dirty_win10() -> DirtyHive:
    """:func:`dirty_win10` built once per recipe under ``var/testhives`` (stable bytes, so that a
    fake disk holding it is built once too)."""
    folder = _cached("w10-dirty")
    if not (folder / "expected").exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        dirty_win10(tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    names = ("SYSTEM.LOG", "SYSTEM.LOG1", "SYSTEM.LOG2")
    return DirtyHive(folder / "SYSTEM", {n: folder / n for n in names}, folder / "expected", (4317, 4316))


def cached_damaged_win10(kind: str = "outside") -> Path:
    """A Windows 10 SYSTEM hive damaged as :func:`damage` ``kind`` says, built once per recipe."""
    out = _cached(f"w10-damaged-{kind}")
    if not out.exists():
        src = _cached("w10-h0")
        if not src.exists():
            cached_dirty_win10()
        damage(src, out.with_suffix(".tmp"), kind)
        out.with_suffix(".tmp").rename(out)
    return out
