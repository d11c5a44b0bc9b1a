"""pipeline.tools.virt against a real libvirtd (qemu:///system) started by the fx_libvirtd fixture.

Guests run under TCG (``GHO2KVM_FORCE_TCG=1``; /dev/kvm exists here but guests hang), on a tiny
blank raw disk: SeaBIOS finds nothing to boot and says so.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import libvirt
import pytest

from pipeline.core.errors import InputError
from pipeline.core.settings import resolve
from pipeline.domain import DomainSpec, HostCaps, build_domain, render
from pipeline.tools import bootcheck, virt
from pipeline.tools.run import run

pytestmark = pytest.mark.libvirtd

PREFIX = f"gho2kvm-test-{os.getpid()}"


@pytest.fixture(scope="module")
def uri(libvirtd_system: str) -> str:
    return libvirtd_system


@pytest.fixture(scope="module")
def host(uri: str) -> HostCaps:
    return virt.host_caps_for_uri(uri, prefer_kvm=False)


@pytest.fixture
def disk(shared_tmp: Path) -> Path:
    path = shared_tmp / "tiny.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", str(path), "4M"], step="test-disk", timeout=60)
    return path


@pytest.fixture
def spec(disk: Path, uri: str, request: pytest.FixtureRequest):
    name = f"{PREFIX}-{request.node.name}"[:60].replace("[", "-").replace("]", "")
    s = DomainSpec(name=name, image_id=name, disk_path=str(disk), memory_mib=64, os_major=5, os_minor=1)
    yield s
    virt.undefine(uri, s.name)


def test_host_caps_tcg(host: HostCaps, monkeypatch: pytest.MonkeyPatch, uri: str) -> None:
    x = host.arch("x86_64")
    assert x.domain_type == "qemu"
    assert x.machine.startswith("pc-i440fx-")
    assert x.emulator and Path(x.emulator).exists()
    monkeypatch.setenv("GHO2KVM_FORCE_TCG", "1")  # read once, by the settings, and passed down
    prefer_kvm = not resolve().force_tcg
    assert virt.host_caps_for_uri(uri, prefer_kvm=prefer_kvm).arch("x86_64").domain_type == "qemu"


def test_define_lifecycle(uri: str, host: HostCaps, spec: DomainSpec) -> None:
    xml = render(build_domain(spec, host))
    r = virt.define(uri, xml, image_id=spec.image_id)
    assert r.action == "created"
    assert virt.define(uri, xml).action == "unchanged"
    changed = render(build_domain(dataclasses.replace(spec, memory_mib=96), host))
    assert virt.define(uri, changed).action == "updated"
    assert virt.define(uri, changed).action == "unchanged"
    assert virt.define(uri, changed, autostart=True).action == "updated"
    assert virt.define(uri, changed, autostart=False).action == "updated"
    # someone else's VM with our name: refused, left untouched
    other = render(build_domain(dataclasses.replace(spec, image_id="someone-else", memory_mib=128), host))
    with pytest.raises(InputError, match="refusing to overwrite"):
        virt.define(uri, other)
    conn = libvirt.open(uri)
    try:
        assert conn.lookupByName(spec.name).info()[1] == 96 * 1024
    finally:
        conn.close()
    assert virt.undefine(uri, spec.name) is True
    assert virt.undefine(uri, spec.name) is False


def test_validation_errors_from_libvirt(uri: str, host: HostCaps, spec: DomainSpec) -> None:
    good = render(build_domain(spec, host))
    for bad, expect in [
        (good.replace('placement="static">1<', 'placement="static">300<'), "(?i)cpus"),  # driver check
        (good.replace("<memballoon", "<bogus /><memballoon"), "validate"),  # schema
    ]:
        with pytest.raises(InputError, match=expect) as exc:
            virt.define(uri, bad, image_id=spec.image_id)
        assert "\n" not in str(exc.value) and spec.name in str(exc.value)
        assert exc.value.image_id == spec.image_id and not exc.value.transient


def test_boot_check_missing_disk(uri: str, host: HostCaps, spec: DomainSpec) -> None:
    virt.define(uri, render(build_domain(dataclasses.replace(spec, disk_path="/nonexistent/disk.raw"), host)))
    with pytest.raises(virt.BootCheckError, match="failed to start.*/nonexistent/disk.raw") as exc:
        bootcheck.boot_check(uri, spec.name, 1, Path("/nonexistent/shot.png"), image_id=spec.image_id)
    assert not exc.value.transient


def test_uefi_define(uri: str, host: HostCaps, spec: DomainSpec) -> None:
    if host.arch("x86_64").uefi_loader is None:
        pytest.skip("no UEFI firmware offered by this host")
    xml = render(build_domain(dataclasses.replace(spec, firmware="uefi", os_major=6, os_minor=1,
                                                  disk_bus="sata"), host))
    assert virt.define(uri, xml).action == "created"
    assert virt.define(uri, xml).action == "unchanged"  # libvirt's added <nvram> is not a change


def test_boot_check_tcg(uri: str, host: HostCaps, spec: DomainSpec, shared_tmp: Path) -> None:
    """An all-zero disk: SeaBIOS says so ("not a bootable disk", "No bootable device"); the check
    fails with that line and destroys the guest, also when asked to keep it running."""
    virt.define(uri, render(build_domain(spec, host)))
    shot = shared_tmp / "boot.png"
    with pytest.raises(virt.BootCheckError, match="guest did not boot, the screen says") as exc:
        bootcheck.boot_check(uri, spec.name, 60, shot, keep_running=True, image_id=spec.image_id)
    r = exc.value.details["boot_check"]
    assert (r["verdict"], r["mode"], r["kept_running"]) == ("no-boot-device", "text", False)
    assert "bootable" in r["message"] and r["message"] in r["text"]
    assert r["seconds_to_verdict"] < 50
    assert shot.read_bytes().startswith(b"\x89PNG") and (r["width"], r["height"]) == (720, 400)
    conn = libvirt.open(uri)
    try:
        assert not conn.lookupByName(spec.name).isActive()
    finally:
        conn.close()
    assert virt.undefine(uri, spec.name) is True
