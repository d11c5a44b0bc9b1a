"""The per-version domain choices start under a real libvirtd + qemu (TCG): Hyper-V enlightenments and
the hypervclock timer, cache='none' io='native', an empty IDE CD-ROM, an ISO in it, virtio disk and NIC."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import libvirt
import pytest

from pipeline.domain import DomainSpec, HostCaps, build_domain, render
from pipeline.tools import virt
from pipeline.tools.run import run

pytestmark = pytest.mark.libvirtd

PREFIX = f"gho2kvm-guest-{os.getpid()}"


@pytest.mark.parametrize(("label", "changes"), [
    ("w7-hyperv-cdrom", {"os_major": 6, "os_minor": 1, "disk_bus": "sata", "nic_model": "e1000",
                         "cdrom": ""}),
    ("w10-virtio-iso", {"os_major": 10, "os_minor": 0, "disk_bus": "virtio", "nic_model": "virtio",
                        "cdrom": "ISO"}),
    ("xp-writeback-threads", {"os_major": 5, "os_minor": 1, "disk_cache": "writeback", "disk_io": "threads"}),
])
def test_domain_choices_start_under_tcg(libvirtd_system: str, shared_tmp: Path, label: str,
                                        changes: dict[str, object]) -> None:
    uri = libvirtd_system
    disk = shared_tmp / f"{label}.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(disk), "4M"], step="test-disk", timeout=60)
    if changes.get("cdrom") == "ISO":
        iso = shared_tmp / "empty.iso"
        iso.write_bytes(b"\0" * 65536)
        changes = {**changes, "cdrom": str(iso)}
    name = f"{PREFIX}-{label}"
    host: HostCaps = virt.host_caps_for_uri(uri, prefer_kvm=False)
    spec = dataclasses.replace(DomainSpec(name=name, image_id=name, disk_path=str(disk), memory_mib=64),
                               **changes)  # type: ignore[arg-type]
    virt.define(uri, render(build_domain(spec, host)))
    conn = libvirt.open(uri)
    try:
        dom = conn.lookupByName(name)
        dom.create()  # qemu refuses unknown/unsupported options right here
        time.sleep(2)
        assert dom.isActive(), f"{label} stopped"
        live = dom.XMLDesc(0)
        if spec.os_major and spec.os_major >= 6:
            assert "<hyperv" in live and "hypervclock" in live
        dom.destroy()
    finally:
        conn.close()
        virt.undefine(uri, name)
