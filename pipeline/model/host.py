"""What a libvirt host offers (:class:`HostCaps`), read from its capabilities XML.

``virConnectGetCapabilities`` and ``virConnectGetDomainCapabilities`` are fetched by
:func:`pipeline.tools.virt.host_caps`; this module only reads their XML (no libvirt here), and
:func:`pipeline.domain.facts.build_domain` builds a domain for it.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.core.choices import Arch, values
from pipeline.core.errors import InputError

ARCHES = values(Arch)


#: ``f(emulator, arch, machine, domain type)`` → the host's domain capabilities XML for them, or None
#: where the driver has none
DomainCapsSource = Callable[[str | None, str, str, str], str | None]


# ---------------------------------------------------------------------------------------------
# Host capabilities


@dataclass(frozen=True)
class ArchCaps:
    arch: str
    domain_type: str  # kvm | qemu
    emulator: str | None
    machine: str  # canonical i440fx machine, e.g. pc-i440fx-7.2 (or "pc" when unknown)
    kvm_offered: bool = False
    uefi_loaders: tuple[str, ...] = ()  # from domain capabilities, preferred first
    disk_buses: tuple[str, ...] = ()  # empty = unknown (not checked)
    video_models: tuple[str, ...] = ()  # empty = unknown (not checked)

    @property
    def uefi_loader(self) -> str | None:
        return self.uefi_loaders[0] if self.uefi_loaders else None


@dataclass(frozen=True)
class HostCaps:
    uri: str
    driver: str  # libvirt driver name: QEMU, Test, ...
    arches: tuple[ArchCaps, ...]

    def arch(self, name: str) -> ArchCaps:
        for a in self.arches:
            if a.arch == name:
                return a
        have = ", ".join(a.arch for a in self.arches) or "none"
        raise InputError(f"libvirt at {self.uri} offers no hvm guest for arch {name} (have: {have})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick_machine(arch_el: ET.Element) -> str:
    """Canonical name of the ``pc`` (i440fx) alias, else the newest pc-i440fx-*, else ``pc``."""
    i440fx: list[str] = []
    for m in arch_el.findall("machine"):
        name = (m.text or "").strip()
        if name == "pc" and m.get("canonical"):
            return m.get("canonical", "pc")
        if name.startswith("pc-i440fx-"):
            i440fx.append(name)
    if i440fx:
        return sorted(i440fx, key=_version_key)[-1]
    return "pc"


def _version_key(machine: str) -> tuple[int, ...]:
    out = []
    for part in machine.removeprefix("pc-i440fx-").split("."):
        out.append(int(part) if part.isdigit() else -1)
    return tuple(out)


def _loader_rank(path: str) -> tuple[int, str]:
    low = os.path.basename(path).lower()
    # Plain (non secure-boot, no pre-enrolled keys) OVMF first: Windows 7 cannot do secure boot.
    bad = any(s in low for s in ("secboot", "secure", ".ms.", "snakeoil", "enrolled"))
    return (1 if bad else 0, path)


def _parse_domcaps(xml: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    root = ET.fromstring(xml)
    loaders: list[str] = []
    os_el = root.find("os")
    if os_el is not None and os_el.get("supported") == "yes":
        loader = os_el.find("loader")
        if loader is not None and loader.get("supported") == "yes":
            loaders = [(v.text or "").strip() for v in loader.findall("value") if (v.text or "").strip()]
    buses = tuple(v.text or "" for v in root.findall("devices/disk/enum[@name='bus']/value"))
    videos = tuple(v.text or "" for v in root.findall("devices/video/enum[@name='modelType']/value"))
    return tuple(sorted(loaders, key=_loader_rank)), buses, videos


def host_caps_from_xml(caps_xml: str, *, uri: str, driver: str, domain_caps: DomainCapsSource,
                       prefer_kvm: bool, arches: tuple[str, ...] = ARCHES) -> HostCaps:
    """What a libvirt host offers for hvm guests of ``arches``, from its capabilities XML
    (``virConnectGetCapabilities``) and, per arch, ``domain_caps`` (``virConnectGetDomainCapabilities``).

    Domain type ``kvm`` when the host offers it and ``prefer_kvm``, else ``qemu``. The libvirt *test*
    driver offers neither; for it we describe a plain ``qemu`` guest so the pipeline can be exercised
    against ``test:///default``.
    """
    caps = ET.fromstring(caps_xml)
    found: list[ArchCaps] = []
    fallback_emulator: str | None = None
    for guest in caps.findall("guest"):
        if (guest.findtext("os_type") or "").strip() != "hvm":
            continue
        arch_el = guest.find("arch")
        if arch_el is None:
            continue
        name = arch_el.get("name", "")
        emulator = (arch_el.findtext("emulator") or "").strip() or None
        fallback_emulator = fallback_emulator or emulator
        if name not in arches:
            continue
        types = {d.get("type", ""): (d.findtext("emulator") or "").strip() or emulator
                 for d in arch_el.findall("domain")}
        if "kvm" in types and prefer_kvm:
            dtype = "kvm"
        elif "qemu" in types:
            dtype = "qemu"
        elif "kvm" in types:
            dtype = "kvm"  # KVM only host; forcing TCG is impossible there
        else:
            continue
        emulator = types[dtype]
        machine = _pick_machine(arch_el)
        loaders: tuple[str, ...] = ()
        buses: tuple[str, ...] = ()
        videos: tuple[str, ...] = ()
        # older/other drivers have no domain capabilities: UEFI is then reported as unavailable
        domcaps = domain_caps(emulator, name, machine, dtype)
        if domcaps is not None:
            loaders, buses, videos = _parse_domcaps(domcaps)
        found.append(ArchCaps(arch=name, domain_type=dtype, emulator=emulator, machine=machine,
                              kvm_offered="kvm" in types, uefi_loaders=loaders, disk_buses=buses,
                              video_models=videos))
    if not found and driver.lower() == "test":
        found = [ArchCaps(arch=a, domain_type="qemu", emulator=fallback_emulator, machine="pc")
                 for a in arches]
    if not found:
        raise InputError(f"libvirt at {uri} (driver {driver}) offers neither kvm nor qemu hvm guests "
                         f"for {'/'.join(arches)}")
    return HostCaps(uri=uri, driver=driver, arches=tuple(found))
