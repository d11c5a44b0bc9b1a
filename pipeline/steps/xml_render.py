"""The xml-render step: inspect facts + config + host capabilities → ``domain.xml`` (a validated
:mod:`pipeline.domain` model in fixed element order)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import atomic, log
from pipeline.core.choices import Step
from pipeline.core.config import ImageConfig
from pipeline.core.receipts import NAMED, UPSTREAM
from pipeline.model.inspect import InspectFacts
from pipeline.model.results import DomainXml

STEP = Step.XML_RENDER


@dataclass(frozen=True)
class DomainConfig:
    """The domain part of an image's config."""

    name: str
    libvirt_uri: str
    memory_mib: int | None = None  # None: by Windows version
    vcpus: int = 1
    disk_bus: str = "ide"
    nic_model: str | None = None  # None: by Windows version
    network: str = "user"
    format: str = "raw"
    disk_cache: str = "none"
    disk_io: str = "native"
    cdrom: bool | Path = field(default=False, metadata=NAMED)  # True: an empty drive; a Path: that ISO
    virtio: Path | None = field(default=None, metadata=NAMED)  # the virtio-win tree: switch-over wanted
    title: str | None = None
    description: str | None = None
    uuid: str | None = None
    mac: str | None = None
    uefi_loader: str | None = None  # None: libvirt's firmware autoselection for a UEFI guest
    secure_boot: bool = False

    @classmethod
    def from_config(cls, image: ImageConfig) -> DomainConfig:
        return cls(name=image.domain_name, libvirt_uri=image.libvirt_uri, memory_mib=image.memory_mib,
                   vcpus=image.vcpus, disk_bus=image.disk_bus, nic_model=image.nic_model,
                   network=image.network, format=image.format, disk_cache=image.disk_cache,
                   disk_io=image.disk_io, cdrom=image.cdrom,
                   virtio=image.virtio.drivers if image.virtio is not None else None, title=image.title,
                   description=image.description, uuid=image.uuid, mac=image.mac,
                   uefi_loader=image.uefi_loader, secure_boot=image.secure_boot)


@dataclass(frozen=True)
class RenderInput:
    image_id: str
    image_dir: Path = field(metadata=NAMED)  # domain.xml goes here
    disk_path: Path = field(default=Path(), metadata=NAMED)  # the final disk (absolute)
    domain: DomainConfig = field(default_factory=lambda: DomainConfig(name="?", libvirt_uri="test:///default"))
    force_tcg: bool = False  # domain type qemu even where the host offers kvm
    facts: InspectFacts = field(default_factory=InspectFacts, metadata=UPSTREAM)
    installed_virtio: tuple[str, ...] = field(default=(), metadata=UPSTREAM)  # what registry-merge copied


def clock_offset(facts: InspectFacts) -> str:
    """``utc`` when the guest keeps its hardware clock in UTC (``RealTimeIsUniversal`` = 1), else
    ``localtime`` (what Windows expects by default)."""
    settings = facts.boot_settings
    return "utc" if settings is not None and settings.real_time_is_universal == 1 else "localtime"


def render_domain(inp: RenderInput) -> DomainXml:
    from pipeline.domain.facts import DomainSpec, build_domain
    from pipeline.domain.render import render
    from pipeline.model import windows as guest
    from pipeline.tools import virt

    d, facts = inp.domain, inp.facts
    tree = str(d.virtio) if d.virtio is not None else None
    ready = guest.decide(inp.image_id, d.disk_bus, d.nic_model, facts, virtio_tree=tree,
                         installed=list(inp.installed_virtio))
    ready.raise_refusals(inp.image_id, STEP)
    host = virt.host_caps_for_uri(d.libvirt_uri, prefer_kvm=not inp.force_tcg, image_id=inp.image_id)
    spec = DomainSpec(
        name=d.name, image_id=inp.image_id, disk_path=str(inp.disk_path),
        title=d.title, description=d.description, uuid=d.uuid, mac=d.mac,
        memory_mib=d.memory_mib or guest.default_memory_mib(facts), vcpus=d.vcpus,
        disk_format=d.format, disk_bus=ready.disk_bus, nic_model=ready.nic_model, network=d.network,
        disk_cache=d.disk_cache, disk_io=d.disk_io,
        cdrom=None if d.cdrom is False else "" if d.cdrom is True else str(d.cdrom),
        os_major=facts.major_version if facts.is_windows else None,
        os_minor=facts.minor_version if facts.is_windows else None,
        arch={"i386": "i686", "x86_64": "x86_64"}.get(facts.arch or "", "x86_64"),
        firmware=facts.firmware or "bios", uefi_loader=d.uefi_loader, secure_boot=d.secure_boot,
        clock_offset=clock_offset(facts),
    )
    xml = render(build_domain(spec, host))
    path = inp.image_dir / "domain.xml"
    atomic.write_text(path, xml)
    for w in ready.warnings:
        log.get().warning("guest readiness", detail=w)
    return DomainXml(domain_xml=path, name=spec.name, uri=d.libvirt_uri, disk_bus=spec.disk_bus,
                     nic_model=spec.nic_model, memory_mib=spec.memory_mib, warnings=tuple(ready.warnings))
