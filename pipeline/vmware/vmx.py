"""The one ``.vmx`` reader: a VMware VM's configuration file as typed facts (disks, CPUs, memory, NICs).

A ``.vmx`` is a text dictionary, one ``key = "value"`` per line (VMware writes every value quoted; an
unquoted value is taken as written), ``#`` starts a comment line, keys are case-insensitive. A line
``.encoding = "windows-1252"`` names the charset of the whole file (UTF-8 when absent; a file without
that line that is not valid UTF-8 is read as windows-1252, what Workstation on Windows used to write).
Inside a quoted value ``|XX`` (two hex digits) is a byte VMware escaped: ``|22`` is ``"``, ``|7C`` is
``|``, ``|0A`` a new line.

What is taken (everything else is ignored):

* disks: every ``<bus><n>:<m>`` slot of an ``ide``, ``sata``, ``scsi`` or ``nvme`` controller with
  ``present = "TRUE"`` and a ``fileName``, whose ``deviceType`` is a disk (absent, ``disk``,
  ``scsi-hardDisk``, ``ata-hardDisk``, ``plainDisk``), in controller order (:data:`CONTROLLERS`, then
  controller number, then unit); a physical disk (``rawDisk``, ``scsi-passthru``) is refused, a CD-ROM
  slot is ignored with one info line. The disk's ``mode`` (``persistent``, ``independent-persistent``,
  ``independent-nonpersistent``, ...) is kept: the base file is what is converted in every mode.
* ``memsize`` (MiB), ``numvcpus`` and ``cpuid.coresPerSocket``, ``firmware`` (``efi`` or ``bios``),
  ``displayName``, ``annotation``, ``guestOS``, ``virtualHW.version``, ``bios.hddOrder``;
* every present ``ethernet<n>``: ``virtualDev`` and its MAC (``addressType`` ``static`` → ``address``,
  ``generated``/``vpx`` → ``generatedAddress``; without ``addressType`` the ``address`` if one is written).

Refused, one line naming the file and line: binary data, more than :data:`MAX_VMX_BYTES`, a line that is
not ``key = value``, an unknown ``.encoding``, the same disk slot written twice (also as ``scsi0:00`` and
``SCSI0:0``), a unit outside its controller's range, a MAC that is not six hex pairs, a memory or CPU
count that is not a number in range.

The disk files themselves are not opened here (see :mod:`pipeline.vmware.resolve`).
"""

from __future__ import annotations

import codecs
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.safeio import MiB, escape, read_capped

MAX_VMX_BYTES = 1 * MiB
CONTROLLERS = ("ide", "sata", "scsi", "nvme")  # the order disks are listed in (and the system disk found)
MAX_CONTROLLERS = {"ide": 2, "sata": 4, "scsi": 4, "nvme": 4}
MAX_UNITS = {"ide": 2, "sata": 30, "scsi": 16, "nvme": 15}
DISK_TYPES = ("", "disk", "scsi-harddisk", "ata-harddisk", "plaindisk", "sata-harddisk", "nvme-harddisk")
PHYSICAL_TYPES = ("rawdisk", "scsi-passthru", "atapi-passthru")
NIC_MODELS = ("vlance", "e1000", "e1000e", "vmxnet", "vmxnet2", "vmxnet3")
MAX_MEMORY_MIB = 24 * 1024 * 1024
MAX_VCPUS = 768

_LINE_RE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*(?:"(.*)"|([^"#\s]*))\s*$')
_SLOT_RE = re.compile(r"^(ide|sata|scsi|nvme)(\d+):(\d+)\.(.+)$")
_CTRL_RE = re.compile(r"^(ide|sata|scsi|nvme)(\d+)\.(.+)$")
_NIC_RE = re.compile(r"^ethernet(\d+)\.(.+)$")
_ESC_RE = re.compile(r"(?:\|[0-9A-Fa-f]{2})+")
_MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_TRUE = ("true", "yes", "1", "on")


@dataclass(frozen=True)
class VmxDisk:
    slot: str  # "scsi0:1" (normalised: lower case, no leading zeros)
    bus: str  # ide | sata | scsi | nvme
    controller: int
    unit: int
    file_name: str  # as written in the .vmx
    path: Path  # resolved against the .vmx's folder (normalised, not resolved through links)
    mode: str  # persistent | independent-persistent | independent-nonpersistent | nonpersistent | ...
    line: int
    controller_model: str | None = None  # scsi<n>.virtualDev: lsilogic, lsisas1068, pvscsi, buslogic


@dataclass(frozen=True)
class VmxNic:
    index: int  # ethernet<index>
    model: str | None  # virtualDev; None when the .vmx does not say (VMware then picks by guest OS)
    mac: str | None  # lower case; None when the .vmx has none yet (a VM never powered on)
    address_type: str  # static | generated | vpx
    line: int


@dataclass(frozen=True)
class Vmx:
    path: Path
    encoding: str
    values: dict[str, str]  # lower-cased key → value (escapes undone)
    lines: dict[str, int]  # lower-cased key → its line
    disks: tuple[VmxDisk, ...]
    nics: tuple[VmxNic, ...]
    memory_mib: int | None
    vcpus: int | None
    cores_per_socket: int | None
    firmware: str | None  # "efi" | "bios" | None (not said: VMware's default, BIOS)
    display_name: str | None
    annotation: str | None
    guest_os: str | None
    hw_version: int | None
    info: tuple[str, ...] = field(default_factory=tuple)  # one line per ignored device

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.values.get(key.lower(), default)

    def where(self, key: str) -> str:
        """``file:line`` of a key, for messages."""
        line = self.lines.get(key.lower())
        return f"{escape(self.path, 300)}" + (f":{line}" if line else "")

    @property
    def boot_disk(self) -> VmxDisk | None:
        """The disk the VM boots from: the first of ``bios.hddOrder`` that is a disk, else the first disk."""
        order = [s.strip().lower() for s in (self.get("bios.hddorder") or "").split(",") if s.strip()]
        by_slot = {d.slot: d for d in self.disks}
        for s in order:
            m = re.match(r"^(ide|sata|scsi|nvme)(\d+):(\d+)$", s)
            if m and (d := by_slot.get(f"{m.group(1)}{int(m.group(2))}:{int(m.group(3))}")):
                return d
        return self.disks[0] if self.disks else None


def _fail(path: Path, line: int | None, msg: str) -> InputError:
    return InputError(f"{escape(path, 300)}" + (f":{line}" if line else "") + f": {msg}")


def _codec(name: str) -> str | None:
    try:
        return codecs.lookup(name).name
    except LookupError:
        return None


def _decode(data: bytes, path: Path) -> tuple[str, str]:
    """(text, encoding): the charset from the ``.encoding`` line, else UTF-8, else windows-1252."""
    for no, raw in enumerate(data.split(b"\n")[:64], 1):
        m = re.match(rb'^\s*\.encoding\s*=\s*"?([A-Za-z0-9_.:\-]*)"?\s*$', raw.rstrip(b"\r"), re.I)
        if m:
            name = m.group(1).decode("ascii")
            enc = _codec(name)
            if enc is None:
                raise _fail(path, no, f".encoding {name!r} is not a known character set")
            try:
                return data.decode(enc), enc
            except UnicodeDecodeError as e:
                line = data[:e.start].count(b"\n") + 1
                raise _fail(path, line, f"not valid {name} text (byte 0x{data[e.start]:02x})") from None
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return data.decode("cp1252", "replace"), "cp1252"


def _unescape(value: str, enc: str) -> str:
    def one(m: re.Match[str]) -> str:
        raw = bytes.fromhex(m.group(0).replace("|", ""))
        return raw.decode(enc, "replace")
    return _ESC_RE.sub(one, value)


def _binary(data: bytes) -> int | None:
    """Offset of the first byte no text file has (NUL, other C0 controls but tab/CR/LF/FF, DEL)."""
    m = re.search(rb"[\x00-\x08\x0b\x0e-\x1f\x7f]", data)
    return m.start() if m else None


def parse_vmx(data: bytes, path: Path) -> Vmx:
    """The facts of a ``.vmx`` whose bytes are ``data`` (``path`` names it and anchors its disks)."""
    if len(data) > MAX_VMX_BYTES:
        raise _fail(path, None, f"too large for a .vmx ({len(data)} bytes, at most {MAX_VMX_BYTES} accepted)")
    if (off := _binary(data)) is not None:
        raise _fail(path, data[:off].count(b"\n") + 1,
                    f"not a .vmx file (binary data at byte {off}; a .vmx is text, key = \"value\" lines)")
    text, enc = _decode(data, path)
    values: dict[str, str] = {}
    lines: dict[str, int] = {}
    slots: dict[tuple[str, int, int, str], int] = {}  # (bus, controller, unit, field) → line
    for no, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = _LINE_RE.match(line)
        if not m:
            raise _fail(path, no, f'expected key = "value", got {escape(s, 60)!r}')
        key = m.group(1).lower()
        value = _unescape(m.group(2), enc) if m.group(2) is not None else (m.group(3) or "")
        sm = _SLOT_RE.match(key)
        if sm:
            bus, ctrl, unit = sm.group(1), int(sm.group(2)), int(sm.group(3))
            skey = (bus, ctrl, unit, sm.group(4))
            if skey in slots:
                raise _fail(path, no, f"device slot {bus}{ctrl}:{unit} has {sm.group(4)} twice "
                                      f"(also on line {slots[skey]}): refused")
            slots[skey] = no
            key = f"{bus}{ctrl}:{unit}.{sm.group(4)}"
        values[key] = value
        lines[key] = no
    return _facts(path, enc, values, lines)


def _int(path: Path, lines: dict[str, int], values: dict[str, str], key: str, lo: int, hi: int) -> int | None:
    v = values.get(key)
    if v is None or v == "":
        return None
    if not v.strip().isdigit() or not lo <= int(v) <= hi:
        raise _fail(path, lines.get(key), f"{key} is {escape(v, 40)!r}; expected a whole number {lo}..{hi}")
    return int(v)


def is_unicast_mac(mac: str) -> bool:
    """Six lower-case hex pairs, the group bit clear (a NIC's own address): VMware's MACs and ours."""
    return bool(_MAC_RE.match(mac)) and not int(mac[:2], 16) & 1


def _true(values: dict[str, str], key: str, default: bool = False) -> bool:
    v = values.get(key)
    return default if v is None else v.strip().lower() in _TRUE


def _facts(path: Path, enc: str, values: dict[str, str], lines: dict[str, int]) -> Vmx:
    info: list[str] = []
    disks: list[VmxDisk] = []
    seen_slots: set[tuple[str, int, int]] = set()
    for key in values:
        m = _SLOT_RE.match(key)
        if m:
            seen_slots.add((m.group(1), int(m.group(2)), int(m.group(3))))
    here = path.parent
    for bus, ctrl, unit in sorted(seen_slots, key=lambda s: (CONTROLLERS.index(s[0]), s[1], s[2])):
        slot = f"{bus}{ctrl}:{unit}"
        if not _true(values, f"{slot}.present"):
            continue
        if bus != "ide" and not _true(values, f"{bus}{ctrl}.present", default=True):
            info.append(f"{slot}: its controller {bus}{ctrl} is not present; ignored")
            continue
        line = lines.get(f"{slot}.present")
        if ctrl >= MAX_CONTROLLERS[bus] or unit >= MAX_UNITS[bus] or (bus == "scsi" and unit == 7):
            own = ", 7 is the controller's own" if bus == "scsi" else ""
            limits = f"controllers 0..{MAX_CONTROLLERS[bus] - 1}, units 0..{MAX_UNITS[bus] - 1}{own}"
            raise _fail(path, line, f"device slot {slot} does not exist on a VMware {bus} controller "
                                    f"({limits})")
        dtype = values.get(f"{slot}.devicetype", "").strip().lower()
        name = values.get(f"{slot}.filename", "")
        if "cdrom" in dtype or name.lower().endswith(".iso"):
            info.append(f"{slot}: CD-ROM ({escape(name or dtype, 80)}) ignored")
            continue
        if dtype in PHYSICAL_TYPES:
            raise _fail(path, lines.get(f"{slot}.devicetype"),
                        f"{slot} is a physical device ({dtype}); only virtual disks (.vmdk) can be migrated")
        if dtype not in DISK_TYPES:
            info.append(f"{slot}: device type {escape(dtype, 40)!r} ignored")
            continue
        if not name:
            raise _fail(path, line, f"disk {slot} is present but has no fileName")
        mode = values.get(f"{slot}.mode", "persistent").strip().lower() or "persistent"
        disks.append(VmxDisk(slot, bus, ctrl, unit, name, Path(os.path.normpath(here / name)), mode,
                             lines.get(f"{slot}.filename", line or 0),
                             values.get(f"{bus}{ctrl}.virtualdev") or None))
    nics: list[VmxNic] = []
    nic_ids = sorted({int(m.group(1)) for k in values if (m := _NIC_RE.match(k))})
    for n in nic_ids:
        p = f"ethernet{n}"
        if not _true(values, f"{p}.present"):
            continue
        # without addressType VMware generates one, unless an address is written (then it is static)
        atype = (values.get(f"{p}.addresstype") or ("static" if values.get(f"{p}.address") else "generated")
                 ).strip().lower()
        mkey = f"{p}.address" if atype == "static" else f"{p}.generatedaddress"
        mac = (values.get(mkey) or "").strip().lower().replace("-", ":") or None
        if mac is not None and not is_unicast_mac(mac):
            raise _fail(path, lines.get(mkey), f"{mkey} is {escape(mac, 40)!r}; expected a unicast MAC, six "
                                               "hex pairs like 00:50:56:01:02:03")
        model = (values.get(f"{p}.virtualdev") or "").strip().lower() or None
        nics.append(VmxNic(n, model, mac, atype, lines.get(f"{p}.present", 0)))
    for dev, what in (("floppy0", "floppy"), ("floppy1", "floppy"), ("usb", "USB controller"),
                      ("usb_xhci", "USB 3 controller"), ("ehci", "USB 2 controller"), ("sound", "sound card"),
                      ("serial0", "serial port"), ("parallel0", "parallel port")):
        if _true(values, f"{dev}.present"):
            info.append(f"{dev}: {what} ignored")
    firmware = (values.get("firmware") or "").strip().lower() or None
    if firmware not in (None, "efi", "bios"):
        raise _fail(path, lines.get("firmware"),
                    f"firmware is {escape(firmware, 40)!r}; expected efi or bios")
    vcpus = _int(path, lines, values, "numvcpus", 1, MAX_VCPUS)
    cores = _int(path, lines, values, "cpuid.corespersocket", 1, MAX_VCPUS)
    if cores and cores > (vcpus or 1):
        raise _fail(path, lines.get("cpuid.corespersocket"),
                    f"cpuid.coresPerSocket {cores} is more than numvcpus {vcpus or 1}")
    hw = values.get("virtualhw.version", "")
    return Vmx(
        path=path, encoding=enc, values=values, lines=lines, disks=tuple(disks), nics=tuple(nics),
        memory_mib=_int(path, lines, values, "memsize", 1, MAX_MEMORY_MIB), vcpus=vcpus,
        cores_per_socket=cores, firmware=firmware,
        display_name=values.get("displayname") or None, annotation=values.get("annotation") or None,
        guest_os=values.get("guestos") or None, hw_version=int(hw) if hw.strip().isdigit() else None,
        info=tuple(info))


def read_vmx(path: Path) -> Vmx:
    """Read and parse a ``.vmx`` (a regular file of at most :data:`MAX_VMX_BYTES`, never anything else)."""
    return parse_vmx(read_capped(path, MAX_VMX_BYTES, ".vmx file"), path)


def read_vmsd_names(path: Path) -> dict[str, str]:
    """Snapshot file name (lower case, as in ``snapshot<n>.disk<m>.fileName``) → the snapshot's
    ``displayName``, from a VM's ``.vmsd`` (the same dictionary format); {} when there is none or it is
    unreadable (it only makes a refusal clearer)."""
    try:
        v = parse_vmx(read_capped(path, MAX_VMX_BYTES, ".vmsd file"), path)
    except InputError:
        return {}
    out: dict[str, str] = {}
    for key, value in v.values.items():
        m = re.match(r"^(snapshot\d+)\.disk\d+\.filename$", key)
        if m and value:
            out[value.lower()] = v.values.get(f"{m.group(1)}.displayname", "") or m.group(1)
    return out
