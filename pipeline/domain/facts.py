"""Facts → model: what the host offers (:class:`pipeline.model.host.HostCaps`) + what we want
(:class:`DomainSpec`) → :class:`~pipeline.domain.model.Domain`.

Nothing host-specific is hard-coded: the emulator path, the machine type (the host's canonical
name for ``pc``, i.e. i440fx, so the guest sees the PIIX3 IDE controller Windows XP has drivers
for) and the UEFI firmware come from ``virConnectGetCapabilities`` and
``virConnectGetDomainCapabilities``, which :func:`pipeline.tools.virt.host_caps` fetches; this module
only reads their XML (no libvirt here).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import uuid as uuid_mod
from dataclasses import dataclass

from pipeline.core.choices import (
    DEFAULT_DISK_CACHE,
    DEFAULT_DISK_IO,
    IO_NATIVE_CACHES,
    DiskBus,
    DiskCache,
    DiskFormat,
    DiskIo,
    Firmware,
    NicModel,
    Step,
    values,
)
from pipeline.core.errors import InputError
from pipeline.domain.model import (
    Clock,
    Controller,
    Disk,
    Domain,
    Features,
    Graphics,
    HyperV,
    Input,
    Interface,
    Loader,
    MemBalloon,
    Os,
    Timer,
    Video,
)
from pipeline.model.host import ARCHES, HostCaps

#: uuid5 namespace for domain UUIDs derived from the image id. Never change it: existing domains
#: are recognised by their UUID.
DOMAIN_UUID_NAMESPACE = uuid_mod.UUID("6b0c2f4e-7a51-5c8e-9d3f-1e2a4b6c8d0f")


DISK_DEV_PREFIX = {DiskBus.IDE: "hd", DiskBus.SATA: "sd", DiskBus.VIRTIO: "vd"}
DISK_FORMATS = values(DiskFormat)
DISK_BUSES = values(DiskBus)
NIC_MODELS = values(NicModel)
DISK_CACHE_MODES = values(DiskCache)
DISK_IO_MODES = values(DiskIo)
FIRMWARES = values(Firmware)


# ---------------------------------------------------------------------------------------------
# Spec → Domain


@dataclass(frozen=True)
class DomainSpec:
    name: str
    image_id: str
    disk_path: str  # absolute
    title: str | None = None
    description: str | None = None
    uuid: str | None = None  # None: uuid5(DOMAIN_UUID_NAMESPACE, image_id)
    mac: str | None = None  # None: 52:54:00 + 3 bytes of sha256(image_id)
    memory_mib: int = 512
    vcpus: int = 1
    disk_format: str = "raw"
    disk_bus: str = "ide"
    nic_model: str = "rtl8139"
    network: str = "user"  # user | network:NAME | bridge:NAME
    os_major: int | None = None  # Windows version from inspection: XP 5.1, 2003 5.2, 7 6.1
    os_minor: int | None = None
    arch: str = "x86_64"
    firmware: str = "bios"  # bios | uefi
    uefi_loader: str | None = None  # uefi: this firmware file; None: libvirt's autoselection
    secure_boot: bool = False
    clock_offset: str = "localtime"  # utc when the guest keeps its RTC in UTC (RealTimeIsUniversal)
    disk_cache: str = DEFAULT_DISK_CACHE  # DISK_CACHE_MODES; "default": libvirt's (attribute left out)
    disk_io: str = DEFAULT_DISK_IO  # DISK_IO_MODES
    cdrom: str | None = None  # None: no CD-ROM; "": an empty IDE drive; else the ISO's absolute path


def default_uuid(image_id: str) -> str:
    return str(uuid_mod.uuid5(DOMAIN_UUID_NAMESPACE, image_id))


def default_mac(image_id: str) -> str:
    h = hashlib.sha256(("gho2kvm-mac:" + image_id).encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def parse_network(network: str, *, image_id: str | None = None) -> tuple[str, str | None]:
    if network == "user":
        return "user", None
    kind, sep, name = network.partition(":")
    if sep and kind in ("network", "bridge") and name.strip():
        return kind, name.strip()
    raise InputError(f"network '{network}': expected user, network:NAME or bridge:NAME",
                     image_id=image_id, step=Step.XML_RENDER)


def video_model(os_major: int | None, os_minor: int | None) -> str:
    """cirrus for XP/2003 (and unknown: every Windows has a driver), std VGA for Vista/7 and later."""
    if os_major is not None and os_major >= 6:
        return "vga"
    return "cirrus"


def hyperv_for(os_major: int | None, os_minor: int | None) -> bool:
    """Hyper-V enlightenments for Windows 7 / 2008 R2 (6.1) and later; none for 5.x, Vista and unknown."""
    return os_major is not None and (os_major, os_minor or 0) >= (6, 1)


def _check(spec: DomainSpec) -> None:
    problems: list[str] = []
    if not spec.name or "/" in spec.name or spec.name != spec.name.strip():
        problems.append(f"name {spec.name!r} must be non-empty, without '/' or surrounding spaces")
    if spec.title is not None and ("\n" in spec.title or "\r" in spec.title):
        problems.append("title must be a single line")
    if not os.path.isabs(spec.disk_path):
        problems.append(f"disk_path {spec.disk_path!r} must be absolute")
    if spec.disk_format not in DISK_FORMATS:
        problems.append(f"disk_format {spec.disk_format!r} not in {DISK_FORMATS}")
    if spec.disk_bus not in DISK_BUSES:
        problems.append(f"disk_bus {spec.disk_bus!r} not in {DISK_BUSES}")
    if spec.nic_model not in NIC_MODELS:
        problems.append(f"nic_model {spec.nic_model!r} not in {NIC_MODELS}")
    if spec.disk_cache not in DISK_CACHE_MODES:
        problems.append(f"disk_cache {spec.disk_cache!r} not in {DISK_CACHE_MODES}")
    if spec.disk_io not in DISK_IO_MODES:
        problems.append(f"disk_io {spec.disk_io!r} not in {DISK_IO_MODES}")
    elif spec.disk_io == "native" and spec.disk_cache not in IO_NATIVE_CACHES:
        problems.append(f"disk_io 'native' needs disk_cache {' or '.join(IO_NATIVE_CACHES)}, "
                        f"got '{spec.disk_cache}'")
    if spec.cdrom and not os.path.isabs(spec.cdrom):
        problems.append(f"cdrom {spec.cdrom!r} must be absolute")
    if spec.firmware not in FIRMWARES:
        problems.append(f"firmware {spec.firmware!r} not in {FIRMWARES}")
    if spec.arch not in ARCHES:
        problems.append(f"arch {spec.arch!r} not in {ARCHES}")
    if spec.memory_mib < 16:
        problems.append(f"memory_mib {spec.memory_mib} too small")
    if spec.vcpus < 1:
        problems.append(f"vcpus {spec.vcpus} must be >= 1")
    if spec.uuid is not None:
        try:
            uuid_mod.UUID(spec.uuid)
        except ValueError:
            problems.append(f"uuid {spec.uuid!r} is not a UUID")
    if spec.mac is not None:
        parts = spec.mac.split(":")
        if len(parts) != 6 or not all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p)
                                      for p in parts):
            problems.append(f"mac {spec.mac!r} is not a MAC address")
        elif int(parts[0], 16) & 1:
            problems.append(f"mac {spec.mac!r} is a multicast address")
    if problems:
        raise InputError("domain spec: " + "; ".join(problems), image_id=spec.image_id, step=Step.XML_RENDER)


ARCH_ALIASES = {"i386": "i686", "i486": "i686", "i586": "i686", "x86": "i686", "amd64": "x86_64"}
FIRMWARE_ALIASES = {"efi": "uefi", "legacy": "bios"}


def normalise(spec: DomainSpec) -> DomainSpec:
    """Accept the spellings inspection tools use (i386, amd64, efi) for arch and firmware."""
    arch = ARCH_ALIASES.get(spec.arch, spec.arch)
    firmware = FIRMWARE_ALIASES.get(spec.firmware, spec.firmware)
    if (arch, firmware) == (spec.arch, spec.firmware):
        return spec
    return dataclasses.replace(spec, arch=arch, firmware=firmware)


def _attr(mode: str) -> str | None:
    """``default`` means libvirt's own default: the attribute is left out."""
    return None if mode == "default" else mode


def build_domain(spec: DomainSpec, host: HostCaps) -> Domain:
    """The libvirt domain for a converted Windows disk, on this host."""
    spec = normalise(spec)
    _check(spec)
    arch = host.arch(spec.arch)
    iface_type, iface_source = parse_network(spec.network, image_id=spec.image_id)
    if arch.disk_buses and spec.disk_bus not in arch.disk_buses:
        raise InputError(f"disk_bus {spec.disk_bus} not offered by {host.uri} for {spec.arch} "
                         f"(have: {', '.join(arch.disk_buses)})", image_id=spec.image_id,
                         step=Step.XML_RENDER)
    video = video_model(spec.os_major, spec.os_minor)
    if arch.video_models and video not in arch.video_models:
        raise InputError(f"video model {video} not offered by {host.uri} "
                         f"(have: {', '.join(arch.video_models)})", image_id=spec.image_id,
                         step=Step.XML_RENDER)
    loader, firmware = None, None
    if spec.firmware == "uefi":
        # a named loader as given; else libvirt's firmware autoselection from the host's firmware
        # descriptors (qemu:///system) or its own defaults (test:///default): no path guessed here
        if spec.uefi_loader:
            loader = Loader(path=spec.uefi_loader)
        else:
            firmware = "efi"
    virtio = spec.disk_bus == "virtio" or spec.nic_model == "virtio"
    hv = hyperv_for(spec.os_major, spec.os_minor)
    timers = [Timer("rtc", tickpolicy="catchup"), Timer("pit", tickpolicy="delay"),
              Timer("hpet", present=False)]
    if hv:
        timers.append(Timer("hypervclock", present=True))
    disks = [Disk(path=spec.disk_path, format=spec.disk_format, bus=spec.disk_bus,
                  dev=DISK_DEV_PREFIX[DiskBus(spec.disk_bus)] + "a", cache=_attr(spec.disk_cache),
                  io=_attr(spec.disk_io))]
    if spec.cdrom is not None:
        # IDE secondary master: every Windows has the driver, whatever bus the system disk uses
        disks.append(Disk(path=spec.cdrom or None, format="raw", bus="ide", dev="hdc", readonly=True,
                          device="cdrom"))
    return Domain(
        type=arch.domain_type,
        name=spec.name,
        uuid=(spec.uuid or default_uuid(spec.image_id)).lower(),
        title=spec.title,
        description=spec.description,
        memory_mib=spec.memory_mib,
        vcpus=spec.vcpus,
        os=Os(arch=spec.arch, machine=arch.machine, loader=loader, firmware=firmware,
              secure_boot=spec.secure_boot and firmware is not None),
        features=Features(acpi=True, apic=True, pae=True, hyperv=HyperV() if hv else None,
                          smm=spec.secure_boot and spec.firmware == "uefi"),
        clock=Clock(offset=spec.clock_offset, timers=tuple(timers)),
        emulator=arch.emulator,
        disks=tuple(disks),
        controllers=(Controller("usb", 0, "piix3-uhci"),),
        interfaces=(Interface(type=iface_type, source=iface_source, model=spec.nic_model,
                              mac=(spec.mac or default_mac(spec.image_id)).lower()),),
        inputs=(Input("tablet", "usb"),),
        graphics=(Graphics("vnc", listen="127.0.0.1", autoport=True),),
        videos=(Video(video),),
        memballoon=MemBalloon("virtio" if virtio else "none"),
    )
