"""libvirt domain XML: declarative model, host facts → model, deterministic rendering."""

from pipeline.domain.facts import DomainSpec, build_domain, default_mac, default_uuid
from pipeline.domain.model import Domain
from pipeline.domain.render import render
from pipeline.model.host import ArchCaps, HostCaps, host_caps_from_xml

__all__ = [
    "ArchCaps",
    "Domain",
    "DomainSpec",
    "HostCaps",
    "build_domain",
    "default_mac",
    "default_uuid",
    "host_caps_from_xml",
    "render",
]
