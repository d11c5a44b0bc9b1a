"""Domain model → XML: golden files, schema validation, escaping, stable identities.

Regenerate the golden files with ``GHO2KVM_REGEN_GOLDEN=1 pytest tests/test_domain_render.py``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.domain import ArchCaps, DomainSpec, HostCaps, build_domain, default_mac, default_uuid, render
from pipeline.tools.run import run

GOLDEN = Path(__file__).parent / "golden" / "domain"
REGEN = os.environ.get("GHO2KVM_REGEN_GOLDEN") == "1"

HOST = HostCaps(
    uri="qemu:///system",
    driver="QEMU",
    arches=(
        ArchCaps(arch="x86_64", domain_type="kvm", emulator="/usr/bin/qemu-system-x86_64",
                 machine="pc-i440fx-7.2", kvm_offered=True,
                 uefi_loaders=("/usr/share/OVMF/OVMF_CODE_4M.fd",),
                 disk_buses=("ide", "fdc", "scsi", "virtio", "usb", "sata"),
                 video_models=("vga", "cirrus", "vmvga", "qxl", "virtio", "none", "bochs", "ramfb")),
        ArchCaps(arch="i686", domain_type="qemu", emulator="/usr/bin/qemu-system-i386",
                 machine="pc-i440fx-7.2"),
    ),
)

BASE = DomainSpec(name="xp-ghost", image_id="xp-ghost", disk_path="/var/lib/gho2kvm/images/xp-ghost.raw",
                  os_major=5, os_minor=1)

VARIANTS: dict[str, DomainSpec] = {
    "xp_ide": dataclasses.replace(BASE, arch="i686", title="Accounting XP", description="from Ghost image"),
    "w2003_ide_e1000": dataclasses.replace(BASE, name="srv2003", image_id="srv2003", os_major=5, os_minor=2,
                                           nic_model="e1000", network="network:default", memory_mib=1024),
    "w7_sata": dataclasses.replace(BASE, name="w7", image_id="w7", os_major=6, os_minor=1, disk_bus="sata",
                                   disk_format="qcow2", disk_path="/var/lib/gho2kvm/images/w7.qcow2",
                                   vcpus=2, memory_mib=2048, nic_model="e1000"),
    "w7_virtio": dataclasses.replace(BASE, name="w7v", image_id="w7v", os_major=6, os_minor=1,
                                     disk_bus="virtio", nic_model="virtio", memory_mib=2048),
    "w7_uefi": dataclasses.replace(BASE, name="w7-uefi", image_id="w7-uefi", os_major=6, os_minor=1,
                                   firmware="uefi", disk_bus="sata", memory_mib=2048),
    "xp_bridge": dataclasses.replace(BASE, name="xp-br", image_id="xp-br", network="bridge:br0",
                                     uuid="12345678-1234-5678-9abc-def012345678", mac="52:54:00:AA:BB:CC"),
    "unknown_os_network": dataclasses.replace(BASE, name="mystery", image_id="mystery", os_major=None,
                                              os_minor=None, network="network:lab"),
    "xp_cdrom_empty": dataclasses.replace(BASE, name="xp-cd", image_id="xp-cd", cdrom=""),
    "w2003_cache_default": dataclasses.replace(BASE, name="srv2003d", image_id="srv2003d", os_major=5,
                                               os_minor=2, disk_cache="default", disk_io="default"),
    "vista_writethrough": dataclasses.replace(BASE, name="vista", image_id="vista", os_major=6, os_minor=0,
                                              disk_cache="writethrough", disk_io="threads", memory_mib=2048),
    "w10_cdrom_iso_writeback": dataclasses.replace(
        BASE, name="w10", image_id="w10", os_major=10, os_minor=0, disk_bus="sata", nic_model="e1000",
        memory_mib=4096, cdrom="/srv/iso/virtio-win.iso", disk_cache="writeback", disk_io="threads"),
    "w10_virtio_io_uring": dataclasses.replace(BASE, name="w10v", image_id="w10v", os_major=10, os_minor=0,
                                               disk_bus="virtio", nic_model="virtio", memory_mib=4096,
                                               disk_io="io_uring"),
}


def _xml(spec: DomainSpec, host: HostCaps = HOST) -> str:
    return render(build_domain(spec, host))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_golden(variant: str) -> None:
    xml = _xml(VARIANTS[variant])
    path = GOLDEN / f"{variant}.xml"
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(xml)
    assert path.exists(), f"{path} missing; run with GHO2KVM_REGEN_GOLDEN=1"
    assert xml == path.read_text(), f"{variant} differs from {path}; regenerate if intended"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_virt_xml_validate(variant: str, tmp_path: Path) -> None:
    path = tmp_path / f"{variant}.xml"
    path.write_text(_xml(VARIANTS[variant]))
    run(["virt-xml-validate", str(path), "domain"], step="test-validate", timeout=60)


def test_escaping_name_title_description(tmp_path: Path) -> None:
    nasty = "a&b<c>\"d'e"
    spec = dataclasses.replace(BASE, name=nasty, title=f"T {nasty}", description=f"D {nasty}\nline 2")
    xml = _xml(spec)
    assert nasty not in xml  # & and < never appear raw
    root = ET.fromstring(xml)
    assert root.findtext("name") == nasty
    assert root.findtext("title") == f"T {nasty}"
    assert root.findtext("description") == f"D {nasty}\nline 2"
    path = tmp_path / "nasty.xml"
    path.write_text(xml)
    run(["virt-xml-validate", str(path), "domain"], step="test-validate", timeout=60)


def test_rerender_is_byte_identical() -> None:
    for spec in VARIANTS.values():
        assert _xml(spec) == _xml(dataclasses.replace(spec))


def test_stable_uuid_and_mac() -> None:
    assert default_uuid("xp-ghost") == default_uuid("xp-ghost")
    assert default_uuid("xp-ghost") != default_uuid("xp-ghost2")
    assert uuid.UUID(default_uuid("xp-ghost")).version == 5
    mac = default_mac("xp-ghost")
    assert mac == default_mac("xp-ghost") != default_mac("xp-ghost2")
    assert re.fullmatch(r"52:54:00(:[0-9a-f]{2}){3}", mac)
    root = ET.fromstring(_xml(BASE))
    assert root.findtext("uuid") == default_uuid("xp-ghost")
    assert root.find("devices/interface/mac").get("address") == mac  # type: ignore[union-attr]
    # explicit values win (and are normalised to lower case)
    root = ET.fromstring(_xml(VARIANTS["xp_bridge"]))
    assert root.findtext("uuid") == "12345678-1234-5678-9abc-def012345678"
    assert root.find("devices/interface/mac").get("address") == "52:54:00:aa:bb:cc"  # type: ignore[union-attr]


def _dev(xml: str, path: str) -> ET.Element:
    el = ET.fromstring(xml).find(path)
    assert el is not None, path
    return el


def test_windows_defaults() -> None:
    xml = _xml(VARIANTS["xp_ide"])
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu"  # i686 on HOST offers only qemu
    assert root.find("clock").get("offset") == "localtime"  # type: ignore[union-attr]
    assert [f.tag for f in root.find("features")] == ["acpi", "apic", "pae"]  # type: ignore[union-attr]
    assert _dev(xml, "os/type").get("machine") == "pc-i440fx-7.2"
    assert _dev(xml, "os/type").get("arch") == "i686"
    assert root.findtext("devices/emulator") == "/usr/bin/qemu-system-i386"
    assert _dev(xml, "devices/disk/target").attrib == {"dev": "hda", "bus": "ide"}
    assert _dev(xml, "devices/interface/model").get("type") == "rtl8139"
    assert _dev(xml, "devices/interface").get("type") == "user"
    assert _dev(xml, "devices/video/model").get("type") == "cirrus"
    assert _dev(xml, "devices/input").attrib == {"type": "tablet", "bus": "usb"}
    g = _dev(xml, "devices/graphics")
    assert (g.get("type"), g.get("listen"), g.get("autoport")) == ("vnc", "127.0.0.1", "yes")
    assert _dev(xml, "devices/memballoon").get("model") == "none"
    assert root.find("os/loader") is None


@pytest.mark.parametrize(("bus", "dev"), [("ide", "hda"), ("sata", "sda"), ("virtio", "vda")])
def test_disk_bus_dev(bus: str, dev: str) -> None:
    xml = _xml(dataclasses.replace(BASE, disk_bus=bus))
    assert _dev(xml, "devices/disk/target").attrib == {"dev": dev, "bus": bus}
    assert _dev(xml, "devices/memballoon").get("model") == ("virtio" if bus == "virtio" else "none")


@pytest.mark.parametrize(("major", "minor", "video"),
                         [(5, 1, "cirrus"), (5, 2, "cirrus"), (6, 1, "vga"), (None, None, "cirrus")])
def test_video_by_version(major: int | None, minor: int | None, video: str) -> None:
    xml = _xml(dataclasses.replace(BASE, os_major=major, os_minor=minor))
    assert _dev(xml, "devices/video/model").get("type") == video


def test_kvm_domain_type_and_uefi_autoselection() -> None:
    xml = _xml(VARIANTS["w7_uefi"])
    root = ET.fromstring(xml)
    assert root.get("type") == "kvm"
    assert root.find("os").get("firmware") == "efi"  # libvirt picks the firmware (descriptors)
    assert root.find("os/loader") is None
    assert _dev(xml, "os/firmware/feature").attrib == {"enabled": "no", "name": "secure-boot"}
    assert root.find("features/smm") is None


def test_uefi_named_loader_and_secure_boot() -> None:
    spec = dataclasses.replace(VARIANTS["w7_uefi"], uefi_loader="/opt/fw/CODE.fd")
    xml = _xml(spec)
    assert _dev(xml, "os/loader").text == "/opt/fw/CODE.fd"
    assert _dev(xml, "os/loader").attrib == {"readonly": "yes", "type": "pflash"}
    assert ET.fromstring(xml).find("os").get("firmware") is None
    xml = _xml(dataclasses.replace(VARIANTS["w7_uefi"], secure_boot=True))
    feats = {f.get("name"): f.get("enabled") for f in ET.fromstring(xml).findall("os/firmware/feature")}
    assert feats == {"secure-boot": "yes", "enrolled-keys": "yes"}
    assert _dev(xml, "features/smm").get("state") == "on"


def test_uefi_on_a_host_without_loaders_still_renders() -> None:
    # i686 of HOST lists no loader (like test:///default): autoselection leaves the choice to libvirt
    xml = _xml(dataclasses.replace(BASE, arch="i686", firmware="uefi"))
    assert ET.fromstring(xml).find("os").get("firmware") == "efi"


@pytest.mark.parametrize(("rtiu", "offset"), [(None, "localtime"), (0, "localtime"), (1, "utc")])
def test_clock_offset_follows_real_time_is_universal(rtiu: int | None, offset: str) -> None:
    from pipeline.model.guest import BootSettings
    from pipeline.model.inspect import InspectFacts
    from pipeline.steps.xml_render import clock_offset

    facts = InspectFacts(os="windows", boot_settings=BootSettings(real_time_is_universal=rtiu))
    assert clock_offset(facts) == offset
    xml = _xml(dataclasses.replace(BASE, clock_offset=clock_offset(facts)))
    assert _dev(xml, "clock").get("offset") == offset


@pytest.mark.parametrize(("network", "itype", "attr", "value"), [
    ("network:default", "network", "network", "default"),
    ("bridge:br0", "bridge", "bridge", "br0"),
])
def test_network_sources(network: str, itype: str, attr: str, value: str) -> None:
    xml = _xml(dataclasses.replace(BASE, network=network))
    assert _dev(xml, "devices/interface").get("type") == itype
    assert _dev(xml, "devices/interface/source").attrib == {attr: value}


@pytest.mark.parametrize(("field", "value", "match"), [
    ("network", "bridge:", "network 'bridge:'"),
    ("network", "tap:x", "network 'tap:x'"),
    ("disk_path", "relative/disk.raw", "must be absolute"),
    ("disk_bus", "scsi", "disk_bus"),
    ("disk_format", "vmdk", "disk_format"),
    ("nic_model", "pcnet", "nic_model"),
    ("name", "a/b", "name"),
    ("title", "two\nlines", "single line"),
    ("uuid", "not-a-uuid", "uuid"),
    ("mac", "01:00:00:00:00:01", "multicast"),
    ("firmware", "coreboot", "firmware"),
])
def test_bad_spec_is_input_error(field: str, value: str, match: str) -> None:
    with pytest.raises(InputError, match=match) as exc:
        _xml(dataclasses.replace(BASE, **{field: value}))
    assert exc.value.image_id == "xp-ghost"
    assert "\n" not in str(exc.value)


def test_disk_bus_not_offered_by_host() -> None:
    host = dataclasses.replace(HOST, arches=(dataclasses.replace(HOST.arches[0], disk_buses=("ide",)),))
    with pytest.raises(InputError, match="disk_bus sata not offered"):
        _xml(dataclasses.replace(BASE, disk_bus="sata"), host)


def test_arch_and_firmware_aliases() -> None:
    xml = _xml(dataclasses.replace(BASE, arch="i386"))
    assert _dev(xml, "os/type").get("arch") == "i686"
    xml = _xml(dataclasses.replace(BASE, arch="amd64", firmware="efi"))
    assert _dev(xml, "os/type").get("arch") == "x86_64"
    assert ET.fromstring(xml).find("os").get("firmware") == "efi"


def test_unknown_arch_on_host() -> None:
    host = dataclasses.replace(HOST, arches=HOST.arches[:1])
    with pytest.raises(InputError, match="no hvm guest for arch i686"):
        _xml(dataclasses.replace(BASE, arch="i686"), host)


@pytest.mark.parametrize(("major", "minor", "hyperv"),
                         [(5, 1, False), (5, 2, False), (6, 0, False), (6, 1, True), (6, 3, True),
                          (10, 0, True), (None, None, False)])
def test_hyperv_enlightenments_by_version(major: int | None, minor: int | None, hyperv: bool) -> None:
    root = ET.fromstring(_xml(dataclasses.replace(BASE, os_major=major, os_minor=minor)))
    hv = root.find("features/hyperv")
    timers = [t.get("name") for t in root.findall("clock/timer")]
    if not hyperv:
        assert hv is None and "hypervclock" not in timers
        return
    assert hv is not None and hv.get("mode") == "custom"
    assert {c.tag: dict(c.attrib) for c in hv} == {
        "relaxed": {"state": "on"}, "vapic": {"state": "on"}, "spinlocks": {"state": "on", "retries": "8191"}}
    assert root.find("clock/timer[@name='hypervclock']").get("present") == "yes"  # type: ignore[union-attr]


def test_cdrom_drives() -> None:
    root = ET.fromstring(_xml(VARIANTS["xp_cdrom_empty"]))
    cd = root.find("devices/disk[@device='cdrom']")
    assert cd is not None and cd.find("source") is None and cd.find("readonly") is not None
    assert cd.find("target").attrib == {"dev": "hdc", "bus": "ide"}  # type: ignore[union-attr]
    root = ET.fromstring(_xml(VARIANTS["w10_cdrom_iso_writeback"]))
    cd = root.find("devices/disk[@device='cdrom']")
    assert cd.find("source").get("file") == "/srv/iso/virtio-win.iso"  # type: ignore[union-attr]
    assert cd.find("driver").attrib == {"name": "qemu", "type": "raw"}  # type: ignore[union-attr]
    assert root.find("devices/disk[@device='disk']/target").get("bus") == "sata"  # type: ignore[union-attr]
    assert ET.fromstring(_xml(BASE)).find("devices/disk[@device='cdrom']") is None


@pytest.mark.parametrize(("cache", "io", "attrs"), [
    ("none", "native", {"cache": "none", "io": "native"}),
    ("writeback", "threads", {"cache": "writeback", "io": "threads"}),
    ("default", "default", {}),
    ("directsync", "native", {"cache": "directsync", "io": "native"}),
])
def test_disk_cache_and_io(cache: str, io: str, attrs: dict[str, str]) -> None:
    drv = _dev(_xml(dataclasses.replace(BASE, disk_cache=cache, disk_io=io)), "devices/disk/driver")
    assert {k: v for k, v in drv.attrib.items() if k in ("cache", "io")} == attrs


def test_io_native_needs_direct_cache() -> None:
    with pytest.raises(InputError, match="disk_io 'native' needs disk_cache none or directsync"):
        _xml(dataclasses.replace(BASE, disk_cache="writeback", disk_io="native"))
