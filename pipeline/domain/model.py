"""Declarative libvirt domain model.

Small frozen dataclasses, one per XML element we emit. Each knows how to turn itself into an
:class:`xml.etree.ElementTree.Element` with its children in a FIXED order (libvirt's own formatter
order, in the style of virt-manager's xmlbuilder), so rendering the same model always gives the same
bytes. No string templates: all escaping is done by ElementTree.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: str | None) -> ET.Element:
    """Append ``<tag>`` with the non-None ``attrs`` (in the order given) and optional text."""
    el = ET.SubElement(parent, tag, {k.rstrip("_"): v for k, v in attrs.items() if v is not None})
    if text is not None:
        el.text = text
    return el


def _yn(value: bool) -> str:
    return "yes" if value else "no"


@dataclass(frozen=True)
class Loader:
    """UEFI firmware code image (``<loader>``); libvirt creates the per-domain NVRAM from its template."""

    path: str
    readonly: bool = True
    type: str = "pflash"

    def build(self, parent: ET.Element) -> None:
        _sub(parent, "loader", self.path, readonly=_yn(self.readonly), type=self.type)


@dataclass(frozen=True)
class Os:
    """``firmware='efi'``: libvirt picks the UEFI firmware from the host's descriptors
    (``<firmware><feature name='secure-boot' enabled=…/>``); a ``loader`` names it instead."""

    arch: str
    machine: str
    type: str = "hvm"
    loader: Loader | None = None
    boot: tuple[str, ...] = ("hd",)
    firmware: str | None = None  # "efi": autoselection
    secure_boot: bool = False

    def build(self, parent: ET.Element) -> None:
        os_el = _sub(parent, "os", firmware=self.firmware)
        _sub(os_el, "type", self.type, arch=self.arch, machine=self.machine)
        if self.firmware is not None:
            fw = _sub(os_el, "firmware")
            _sub(fw, "feature", enabled=_yn(self.secure_boot), name="secure-boot")
            if self.secure_boot:
                _sub(fw, "feature", enabled="yes", name="enrolled-keys")
        if self.loader is not None:
            self.loader.build(os_el)
        for dev in self.boot:
            _sub(os_el, "boot", dev=dev)


@dataclass(frozen=True)
class HyperV:
    """Hyper-V enlightenments (``<hyperv mode='custom'>``) for Windows 7 / 2008 R2 and later."""

    relaxed: bool = True
    vapic: bool = True
    spinlock_retries: int | None = 8191  # None: no <spinlocks>

    def build(self, parent: ET.Element) -> None:
        hv = _sub(parent, "hyperv", mode="custom")
        if self.relaxed:
            _sub(hv, "relaxed", state="on")
        if self.vapic:
            _sub(hv, "vapic", state="on")
        if self.spinlock_retries is not None:
            _sub(hv, "spinlocks", state="on", retries=str(self.spinlock_retries))


@dataclass(frozen=True)
class Features:
    acpi: bool = True
    apic: bool = True
    pae: bool = True
    hyperv: HyperV | None = None
    smm: bool = False  # secure boot's firmware needs SMM

    def build(self, parent: ET.Element) -> None:
        if not (self.acpi or self.apic or self.pae or self.hyperv or self.smm):
            return
        feat = _sub(parent, "features")
        if self.acpi:
            _sub(feat, "acpi")
        if self.apic:
            _sub(feat, "apic")
        if self.pae:
            _sub(feat, "pae")
        if self.hyperv is not None:
            self.hyperv.build(feat)
        if self.smm:
            _sub(feat, "smm", state="on")


@dataclass(frozen=True)
class Timer:
    name: str
    tickpolicy: str | None = None
    present: bool | None = None

    def build(self, parent: ET.Element) -> None:
        _sub(parent, "timer", name=self.name, tickpolicy=self.tickpolicy,
             present=None if self.present is None else _yn(self.present))


@dataclass(frozen=True)
class Clock:
    offset: str = "utc"
    timers: tuple[Timer, ...] = ()

    def build(self, parent: ET.Element) -> None:
        clock = _sub(parent, "clock", offset=self.offset)
        for t in self.timers:
            t.build(clock)


@dataclass(frozen=True)
class Disk:
    path: str | None  # None: an empty (CD-ROM) drive
    format: str  # raw | qcow2
    bus: str  # ide | sata | virtio
    dev: str  # hda | sda | vda
    cache: str | None = None
    io: str | None = None
    readonly: bool = False
    device: str = "disk"  # disk | cdrom

    def build(self, parent: ET.Element) -> None:
        disk = _sub(parent, "disk", type="file", device=self.device)
        if self.path is not None:
            _sub(disk, "driver", name="qemu", type=self.format, cache=self.cache, io=self.io)
            _sub(disk, "source", file=self.path)
        _sub(disk, "target", dev=self.dev, bus=self.bus)
        if self.readonly:
            _sub(disk, "readonly")


@dataclass(frozen=True)
class Controller:
    type: str
    index: int = 0
    model: str | None = None

    def build(self, parent: ET.Element) -> None:
        _sub(parent, "controller", type=self.type, index=str(self.index), model=self.model)


@dataclass(frozen=True)
class Interface:
    type: str  # user | network | bridge
    mac: str
    model: str  # rtl8139 | e1000 | virtio
    source: str | None = None  # network or bridge name

    def build(self, parent: ET.Element) -> None:
        iface = _sub(parent, "interface", type=self.type)
        _sub(iface, "mac", address=self.mac)
        if self.type == "network":
            _sub(iface, "source", network=self.source)
        elif self.type == "bridge":
            _sub(iface, "source", bridge=self.source)
        _sub(iface, "model", type=self.model)


@dataclass(frozen=True)
class Input:
    type: str = "tablet"
    bus: str = "usb"

    def build(self, parent: ET.Element) -> None:
        _sub(parent, "input", type=self.type, bus=self.bus)


@dataclass(frozen=True)
class Graphics:
    type: str = "vnc"
    listen: str = "127.0.0.1"
    autoport: bool = True
    port: int | None = None

    def build(self, parent: ET.Element) -> None:
        port = "-1" if self.autoport else str(self.port)
        g = _sub(parent, "graphics", type=self.type, port=port, autoport=_yn(self.autoport),
                 listen=self.listen)
        _sub(g, "listen", type="address", address=self.listen)


@dataclass(frozen=True)
class Video:
    model: str  # cirrus | vga | qxl | virtio
    heads: int = 1
    primary: bool = True

    def build(self, parent: ET.Element) -> None:
        video = _sub(parent, "video")
        _sub(video, "model", type=self.model, heads=str(self.heads), primary=_yn(self.primary))


@dataclass(frozen=True)
class MemBalloon:
    model: str = "none"  # none | virtio

    def build(self, parent: ET.Element) -> None:
        _sub(parent, "memballoon", model=self.model)


@dataclass(frozen=True)
class Domain:
    type: str  # kvm | qemu
    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    os: Os
    emulator: str | None
    title: str | None = None
    description: str | None = None
    features: Features = field(default_factory=Features)
    clock: Clock = field(default_factory=Clock)
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    disks: tuple[Disk, ...] = ()
    controllers: tuple[Controller, ...] = ()
    interfaces: tuple[Interface, ...] = ()
    inputs: tuple[Input, ...] = ()
    graphics: tuple[Graphics, ...] = ()
    videos: tuple[Video, ...] = ()
    memballoon: MemBalloon = field(default_factory=MemBalloon)

    def to_element(self) -> ET.Element:
        dom = ET.Element("domain", {"type": self.type})
        _sub(dom, "name", self.name)
        _sub(dom, "uuid", self.uuid)
        if self.title is not None:
            _sub(dom, "title", self.title)
        if self.description is not None:
            _sub(dom, "description", self.description)
        _sub(dom, "memory", str(self.memory_mib), unit="MiB")
        _sub(dom, "currentMemory", str(self.memory_mib), unit="MiB")
        _sub(dom, "vcpu", str(self.vcpus), placement="static")
        self.os.build(dom)
        self.features.build(dom)
        self.clock.build(dom)
        _sub(dom, "on_poweroff", self.on_poweroff)
        _sub(dom, "on_reboot", self.on_reboot)
        _sub(dom, "on_crash", self.on_crash)
        devices = _sub(dom, "devices")
        if self.emulator is not None:
            _sub(devices, "emulator", self.emulator)
        for group in (self.disks, self.controllers, self.interfaces, self.inputs, self.graphics,
                      self.videos):
            for dev in group:
                dev.build(devices)
        self.memballoon.build(devices)
        return dom
