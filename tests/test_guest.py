"""Guest readiness, fix sets per version, virtio trees and .reg control-set findings on inspect facts
(no appliance: the facts are what inspect stores)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from pipeline.app import fakedisk
from pipeline.core.config import ImageConfig, VirtioConfig
from pipeline.core.errors import InputError
from pipeline.guest import virtio
from pipeline.model import windows as guest
from pipeline.model.inspect import InspectFacts
from pipeline.registry import builtin
from pipeline.registry.plan import control_set_findings, map_key, plan, remap_control_sets
from pipeline.registry.regfile import RegSyntaxError, parse_text
from pipeline.steps.registry_merge import MergeInput, collect_ops, plan_warnings

IDE = {"atapi.sys": True, "intelide.sys": True, "pciide.sys": True, "pciidex.sys": True}


def facts(major: int, minor: int, product: str, arch: str = "i386", *, extra: tuple[str, ...] = (),
          services: dict[str, int | None] | None = None, ccs: str = "ControlSet001") -> InspectFacts:
    present = {f: IDE.get(f, False) or f in extra for f in guest.DRIVER_FILES}
    return InspectFacts(os="windows", major_version=major, minor_version=minor, product_name=product,
                        arch=arch, drivers_present=present, services=services or {},
                        current_control_set=ccs)


XP = facts(5, 1, "Microsoft Windows XP")
W2003 = facts(5, 2, "Microsoft Windows Server 2003")
VISTA = facts(6, 0, "Windows Vista (TM) Business", extra=("msahci.sys",))
W7 = facts(6, 1, "Windows 7 Professional", "x86_64", extra=("msahci.sys",), ccs="ControlSet002")
W7_NO_AHCI = facts(6, 1, "Windows 7 Professional", "x86_64")
W2008R2 = facts(6, 1, "Windows Server 2008 R2 Standard", "x86_64", extra=("msahci.sys",))
W81 = facts(6, 3, "Windows 8.1 Pro", "x86_64", extra=("storahci.sys",))
W10 = facts(10, 0, "Windows 10 Pro", "x86_64", extra=("storahci.sys",))
W2019 = facts(10, 0, "Windows Server 2019 Standard", "x86_64", extra=("storahci.sys",))
W7_WITH_VIOSTOR = facts(6, 1, "Windows 7 Professional", "x86_64",
                        extra=("msahci.sys", "viostor.sys", "netkvm.sys"),
                        services={"viostor": 0, "netkvm": 3})
LINUX = InspectFacts(os="unknown", os_type="linux")


@pytest.mark.parametrize(("f", "fam", "name"), [
    (XP, "nt5", "Windows XP"), (W2003, "nt5", "Windows Server 2003"), (VISTA, "nt6", "Windows Vista"),
    (W7, "nt6", "Windows 7"), (W2008R2, "nt6", "Windows Server 2008 R2"), (W81, "nt62", "Windows 8.1"),
    (W10, "nt62", "Windows 10"), (W2019, "nt62", "Windows Server 2019"), (LINUX, None, None),
])
def test_family_and_name(f: InspectFacts, fam: str | None, name: str | None) -> None:
    assert guest.facts_family(f) == fam
    if name:
        assert guest.guest_name(f) == name


# ------------------------------------------------------------------------------------ refusals

@pytest.mark.parametrize(("f", "bus", "expected"), [
    (XP, "sata", "image 'g1': disk_bus 'sata': Windows XP has no AHCI driver; use ide, or virtio with "
                 "virtio.drivers"),
    (W2003, "sata", "image 'g1': disk_bus 'sata': Windows Server 2003 has no AHCI driver; use ide, or virtio "
                    "with virtio.drivers"),
    (XP, "virtio", "image 'g1': disk_bus 'virtio': Windows XP has no viostor.sys (virtio block driver); use "
                   "ide, or set virtio.drivers to a virtio-win ISO or folder"),
    (W7, "virtio", "image 'g1': disk_bus 'virtio': Windows 7 has no viostor.sys"),
    (W10, "virtio", "image 'g1': disk_bus 'virtio': Windows 10 has no viostor.sys"),
    (W7_NO_AHCI, "sata", "image 'g1': disk_bus 'sata': Windows 7 has no msahci.sys in System32\\drivers"),
    (facts(10, 0, "Windows 10 Pro", "x86_64"), "sata",
     "image 'g1': disk_bus 'sata': Windows 10 has no storahci.sys"),
])
def test_bus_the_guest_cannot_drive_is_refused(f: InspectFacts, bus: str, expected: str) -> None:
    r = guest.decide("g1", bus, None, f)
    assert len(r.refusals) == 1 and r.refusals[0].startswith(expected)
    with pytest.raises(InputError) as exc:
        r.raise_refusals("g1", "registry-merge")
    assert "\n" not in str(exc.value) and "g1" in str(exc.value)


@pytest.mark.parametrize(("f", "bus"), [(XP, "ide"), (W2003, "ide"), (VISTA, "sata"), (W7, "sata"),
                                        (W7, "ide"), (W10, "sata"), (W10, "ide"), (W7_WITH_VIOSTOR, "virtio"),
                                        (LINUX, "sata"), (LINUX, "virtio")])
def test_bus_the_guest_can_drive(f: InspectFacts, bus: str) -> None:
    r = guest.decide("g1", bus, None, f)
    assert r.refusals == () and r.disk_bus == bus


@pytest.mark.parametrize(("f", "nic", "warned"), [
    (XP, "rtl8139", None), (XP, "e1000", "ships no Intel PRO/1000 driver"),
    (W7, "e1000", None), (W7, "rtl8139", "ships no RTL8139 driver"), (W10, "rtl8139", "ships no RTL8139"),
    (XP, "virtio", "has no netkvm.sys"), (W7_WITH_VIOSTOR, "virtio", None),
])
def test_nic_without_driver_is_a_warning(f: InspectFacts, nic: str, warned: str | None) -> None:
    r = guest.decide("g1", "ide", nic, f)
    assert r.refusals == () and r.nic_model == nic
    assert [w for w in r.warnings if warned and warned in w] if warned else r.warnings == ()


def test_default_nic_and_memory_by_version() -> None:
    assert [guest.decide("g", "ide", None, f).nic_model for f in (XP, W2003, W7, W10, LINUX)] == [
        "rtl8139", "rtl8139", "e1000", "e1000", "rtl8139"]
    assert [guest.default_memory_mib(f) for f in (XP, W2003, VISTA, W7, W10, LINUX)] == [
        512, 512, 1024, 2048, 4096, 512]


# ------------------------------------------------------------------------------ virtio switch-over

def test_virtio_switch_over_decisions() -> None:
    tree = "/srv/virtio-win.iso"
    # plan time (registry-merge not run yet): virtio expected
    r = guest.decide("x", "ide", "rtl8139", XP, virtio_tree=tree)
    assert (r.disk_bus, r.nic_model, r.refusals) == ("virtio", "virtio", ())
    # both drivers installed by registry-merge
    r = guest.decide("x", "ide", "rtl8139", XP, virtio_tree=tree, installed=["viostor", "netkvm"])
    assert (r.disk_bus, r.nic_model, r.warnings) == ("virtio", "virtio", ())
    # none found: keep IDE and the configured NIC, with warnings naming the folder looked for
    r = guest.decide("x", "virtio", "virtio", XP, virtio_tree=tree, installed=[])
    assert (r.disk_bus, r.nic_model, r.refusals) == ("ide", "rtl8139", ())
    assert any("no viostor (xp/x86) in /srv/virtio-win.iso; disk stays on ide" in w for w in r.warnings)
    assert any("no netkvm (xp/x86)" in w and "NIC stays rtl8139" in w for w in r.warnings)
    assert r.virtio_warnings == r.warnings
    # registry-merge reports only the tree's warnings; a NIC model warning is xml-render's
    r = guest.decide("x", "ide", "e1000", XP, virtio_tree=tree, installed=["viostor"])
    assert (r.disk_bus, r.nic_model) == ("virtio", "e1000")
    assert len(r.warnings) == 2 and len(r.virtio_warnings) == 1 and "netkvm" in r.virtio_warnings[0]
    # Windows 10: viostor switched over (DriverDatabase), netkvm not: the NIC stays with a warning
    r = guest.decide("x", "ide", "e1000", W10, virtio_tree=tree)
    assert (r.disk_bus, r.nic_model) == ("virtio", "e1000")
    r = guest.decide("x", "ide", None, W10, virtio_tree=tree, installed=["viostor"])
    assert (r.disk_bus, r.nic_model, r.refusals) == ("virtio", "e1000", ())
    assert r.virtio_warnings == r.warnings and len(r.warnings) == 1
    assert "Windows 10 sets up a netkvm device through PnP in the running guest" in r.warnings[0]
    assert "pnputil /add-driver netkvm.inf /install" in r.warnings[0] and "NIC stays e1000" in r.warnings[0]
    # Windows 10 without a matching viostor folder: IDE kept, the warning names the folders looked for
    r = guest.decide("x", "virtio", None, W10, virtio_tree=tree, installed=[])
    assert (r.disk_bus, r.nic_model, r.refusals) == ("ide", "e1000", ())
    assert any("no viostor (w10/w11/amd64) in /srv/virtio-win.iso; disk stays on ide" in w
               for w in r.warnings)
    r = guest.decide("x", "ide", None, W2019, virtio_tree=tree, installed=[])
    assert any("no viostor (2k19/amd64)" in w for w in r.warnings)


def test_virtio_offline_per_family() -> None:
    assert [guest.virtio_switch_supported(f, "viostor") for f in (XP, VISTA, W7, W81, W10, LINUX)] == [
        True, True, True, True, True, False]
    assert [guest.virtio_switch_supported(f, "netkvm") for f in (XP, VISTA, W7, W81, W10, LINUX)] == [
        True, True, True, False, False, False]


@pytest.mark.parametrize(("f", "dirs"), [
    (XP, ("xp",)), (W2003, ("2k3",)), (VISTA, ("2k8",)), (W7, ("w7",)), (W2008R2, ("2k8R2",)),
    (W81, ("w8.1",)), (W10, ("w10", "w11")), (W2019, ("2k19",)),
])
def test_virtio_os_dirs(f: InspectFacts, dirs: tuple[str, ...]) -> None:
    assert guest.virtio_os_dirs(f) == dirs


def test_find_drivers_in_a_tree_listing(tmp_path: Path) -> None:
    tree = fakedisk.virtio_tree(tmp_path / "vw", [("viostor", "xp", "x86"), ("netkvm", "xp", "x86"),
                                                  ("viostor", "w7", "amd64"), ("viostor", "2k3", "amd64"),
                                                  ("viostor", "w10", "amd64"), ("netkvm", "w10", "amd64"),
                                                  ("viostor", "w8.1", "amd64"), ("viostor", "2k19", "amd64")])
    listing = virtio.list_folder(tree)
    assert "viostor/xp/x86/viostor.sys" in listing
    assert virtio.find_drivers(listing, XP) == {"viostor": "viostor/xp/x86/viostor.sys",
                                                "netkvm": "netkvm/xp/x86/netkvm.sys"}
    assert virtio.find_drivers(listing, W7) == {"viostor": "viostor/w7/amd64/viostor.sys"}
    assert virtio.find_drivers(listing, W2003) == {}  # 2003 here is x86: only an amd64 build in the tree
    # 6.2+: viostor only (netkvm cannot be installed offline there), each from its own folder
    assert virtio.find_drivers(listing, W10) == {"viostor": "viostor/w10/amd64/viostor.sys"}
    assert virtio.find_drivers(listing, W81) == {"viostor": "viostor/w8.1/amd64/viostor.sys"}
    assert virtio.find_drivers(listing, W2019) == {"viostor": "viostor/2k19/amd64/viostor.sys"}
    assert virtio.find_drivers(listing, dataclasses.replace(W10, arch="i386")) == {}
    # ISO listings (upper case, leading folders) match too
    iso = ["/VIRTIO/VIOSTOR/XP/X86/VIOSTOR.SYS", "/VIRTIO/VIOSTOR/XP/X86/VIOSTOR.INF"]
    assert virtio.find_drivers(iso, XP) == {"viostor": "/VIRTIO/VIOSTOR/XP/X86/VIOSTOR.SYS"}
    assert (tree / "viostor/xp/x86/viostor.sys").read_bytes()[:2] == b"MZ"


SCSI_ADAPTER = "{4D36E97B-E325-11CE-BFC1-08002BE10318}"


def _virtio_values(driver: str, f: dict[str, Any]) -> dict[tuple[str, str | None], object]:
    ops = plan(builtin.virtio_ops(driver, f), "ControlSet001")["SYSTEM"]
    return {(op.key.split("SYSTEM\\", 1)[1], op.name): op.value for op in ops if not op.is_key}


def test_virtio_registry_data_nt5_nt6() -> None:
    svc = "ControlSet001\\Services\\viostor"
    for f in (XP, W7):
        stor = _virtio_values("viostor", f)
        for dev in ("pci#ven_1af4&dev_1001", "pci#ven_1af4&dev_1042",
                    "pci#ven_1af4&dev_1001&subsys_00021af4&rev_00"):
            cdd = f"ControlSet001\\Control\\CriticalDeviceDatabase\\{dev}"
            assert stor[(cdd, "Service")] == "viostor" and stor[(cdd, "ClassGUID")] == SCSI_ADAPTER
        assert stor[(svc, "Start")] == 0 and stor[(svc, "Type")] == 1 and stor[(svc, "ErrorControl")] == 1
        assert stor[(svc, "Group")] == "SCSI miniport"
        assert stor[(svc, "ImagePath")] == r"system32\DRIVERS\viostor.sys"
        assert stor[(svc + "\\Parameters\\PnpInterface", "5")] == 1
        assert not any(k.startswith("DriverDatabase") for k, _ in stor)
        net = _virtio_values("netkvm", f)
        for dev in ("pci#ven_1af4&dev_1000", "pci#ven_1af4&dev_1041"):
            assert net[(f"ControlSet001\\Control\\CriticalDeviceDatabase\\{dev}", "Service")] == "netkvm"
        assert net[("ControlSet001\\Services\\netkvm", "ImagePath")] == r"system32\DRIVERS\netkvm.sys"


#: what the 6.2+ switch-over writes outside the service key (see virtio_viostor_nt62.reg for sources)
VIOSTOR_IDS = ("VEN_1AF4&DEV_1001&SUBSYS_00021AF4&REV_00", "VEN_1AF4&DEV_1001&REV_00",
               "VEN_1AF4&DEV_1042&SUBSYS_11001AF4&REV_01", "VEN_1AF4&DEV_1042&REV_01")
VIOSTOR_VERSION = bytes.fromhex("00ff090000000000" "7be9364d25e3ce11bfc108002be10318") + bytes(24)


def nt62_viostor_values(arch: str) -> dict[tuple[str, str], object]:
    pkg = f"DriverDatabase\\DriverPackages\\viostor.inf_{arch}_0000000000000000"
    out: dict[tuple[str, str], object] = {
        ("DriverDatabase\\DriverInfFiles\\viostor.inf", ""): [f"viostor.inf_{arch}_0000000000000000"],
        ("DriverDatabase\\DriverInfFiles\\viostor.inf", "Active"): f"viostor.inf_{arch}_0000000000000000",
        ("DriverDatabase\\DriverInfFiles\\viostor.inf", "Configurations"): ["scsi_inst"],
        (pkg, "Version"): VIOSTOR_VERSION,
        (pkg + "\\Configurations\\scsi_inst", "ConfigFlags"): 0,
        (pkg + "\\Configurations\\scsi_inst", "Service"): "viostor",
    }
    for dev in VIOSTOR_IDS:
        out[(f"DriverDatabase\\DeviceIds\\PCI\\{dev}", "viostor.inf")] = b"\x01\xff\x00\x00"
        out[(f"{pkg}\\Descriptors\\PCI\\{dev}", "Configuration")] = "scsi_inst"
    return out


def test_virtio_registry_data_nt62() -> None:
    for f, arch in ((W10, "amd64"), (dataclasses.replace(W81, arch="i386"), "x86"), (W2019, "amd64")):
        stor = _virtio_values("viostor", f)
        svc = {k: v for k, v in stor.items() if k[0].startswith("ControlSet001\\Services\\viostor")}
        assert svc == {k: v for k, v in _virtio_values("viostor", W7).items() if k in svc} and len(svc) == 6
        assert {k: v for k, v in stor.items() if k not in svc} == nt62_viostor_values(arch)
        assert not any("CriticalDeviceDatabase" in k for k, _ in stor)  # not read by 6.2+
        with pytest.raises(ValueError, match="netkvm cannot be installed offline"):
            builtin.virtio_ops("netkvm", f)


# ---------------------------------------------------------------------------------- fix sets

def _values(major: int | None, minor: int | None) -> dict[tuple[str, str | None], object]:
    ops = plan(builtin.builtin_ops("mergeide", major, minor), "ControlSet001")["SYSTEM"]
    return {(op.key.split("ControlSet001\\", 1)[-1], op.name): op.value for op in ops if not op.is_key}


def test_fix_set_nt5_xp_2003() -> None:
    for v in ((5, 1), (5, 2), (None, None)):
        vals = _values(*v)
        assert vals[("Services\\atapi", "Start")] == 0
        assert vals[("Services\\IntelIde", "Start")] == 0 and vals[("Services\\PCIIde", "Start")] == 0
        assert vals[("Control\\CriticalDeviceDatabase\\pci#ven_8086&dev_7010", "Service")] == "intelide"
        assert vals[("Control\\CriticalDeviceDatabase\\primary_ide_channel", "Service")] == "atapi"
        assert not any("msahci" in k or "storahci" in k for k, _ in vals)


def test_fix_set_nt6_vista_7() -> None:
    for v in ((6, 0), (6, 1)):
        vals = _values(*v)
        for svc in ("msahci", "intelide", "pciide", "atapi"):
            assert vals[(f"Services\\{svc}", "Start")] == 0
        assert vals[("Control\\CriticalDeviceDatabase\\pci#cc_010601", "Service")] == "msahci"
        assert vals[("Control\\CriticalDeviceDatabase\\pci#ven_8086&dev_7010", "Service")] == "intelide"
        assert not any("storahci" in k for k, _ in vals)


def test_fix_set_nt62_8_10() -> None:
    for v in ((6, 2), (6, 3), (10, 0)):
        vals = _values(*v)
        assert vals == {("Services\\storahci", "Start"): 0, ("Services\\storahci\\StartOverride", "0"): 0,
                        ("Services\\pciide", "Start"): 0, ("Services\\intelide", "Start"): 0,
                        ("Services\\atapi", "Start"): 0}


# ------------------------------------------------------------------------- user .reg control sets

MERGEIDE_CS001 = "\r\n".join([
    "Windows Registry Editor Version 5.00", "",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Control\CriticalDeviceDatabase\primary_ide_channel]",
    '"ClassGUID"="{4D36E96A-E325-11CE-BFC1-08002BE10318}"', '"Service"="atapi"', "",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\atapi]", '"Start"=dword:00000000', "",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\%(cset)s\Services\pciide]", '"Start"=dword:00000000', "",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\Select]", "",
]) + "\r\n"


def test_control_set_findings_and_remap() -> None:
    ops = parse_text(MERGEIDE_CS001, "mergeide.reg")
    findings = control_set_findings(ops, "ControlSet002")
    assert [(op.line, numbered) for op, _, numbered in findings] == [(3, True), (10, False)]
    assert "mergeide.reg:3:" in findings[0][1] and "guest boots from ControlSet002" in findings[0][1]
    assert "mergeide.reg:10:" in findings[1][1] and "'%(cset)s'" in findings[1][1]
    assert control_set_findings(ops, 1)[0][1].startswith("mergeide.reg:10:")  # live set: only the template
    keys = [op.key for op in remap_control_sets(ops, 2)]
    assert keys[0] == (r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Control\CriticalDeviceDatabase"
                       r"\primary_ide_channel")
    assert not any("ControlSet001" in k for k in keys)


def _image(tmp_path: Path, **kw: Any) -> ImageConfig:
    reg = tmp_path / "mergeide.reg"
    reg.write_bytes(b"\xff\xfe" + MERGEIDE_CS001.encode("utf-16-le"))
    return ImageConfig(id="w7", source=tmp_path / "w7.raw", registry=("mergeide", str(reg)), workdir=tmp_path,
                       **kw)


def test_user_reg_warnings_and_remap_in_collect_ops(tmp_path: Path) -> None:
    ops, warnings = collect_ops(MergeInput.from_config(_image(tmp_path), W7))
    assert any("names ControlSet001, but the guest boots from ControlSet002" in w for w in warnings)
    assert any("%(cset)s" in w for w in warnings)
    assert any(op.key.startswith(r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001") for op in ops)
    ops, warnings = collect_ops(MergeInput.from_config(_image(tmp_path, registry_remap_controlset=True), W7))
    assert any("ControlSet001 remapped to the live ControlSet002" in w for w in warnings)
    assert not any(op.key.startswith(r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001") for op in ops)
    xp_cs2 = dataclasses.replace(XP, current_control_set="ControlSet002")
    refusals, plan_w = plan_warnings(_image(tmp_path, disk_bus="sata"), xp_cs2)
    assert refusals == ["image 'w7': disk_bus 'sata': Windows XP has no AHCI driver; use ide, or virtio with "
                        "virtio.drivers"]
    assert any("ControlSet001" in w for w in plan_w)


def test_hive_alias_gets_a_hint() -> None:
    with pytest.raises(RegSyntaxError, match=r"SYSTEM_00 looks like .*write HKEY_LOCAL_MACHINE\\SYSTEM"):
        map_key(r"HKLM\SYSTEM_00\ControlSet001\Services\atapi", 1)
    with pytest.raises(RegSyntaxError, match=r"write HKEY_LOCAL_MACHINE\\SOFTWARE"):
        map_key(r"HKEY_LOCAL_MACHINE\OFFLINE_SOFTWARE\Microsoft", 1)


def test_virtio_config_is_part_of_readiness(tmp_path: Path) -> None:
    from pipeline.steps.registry_merge import readiness

    img = _image(tmp_path, virtio=VirtioConfig(drivers=tmp_path / "vw"))
    assert readiness(MergeInput.from_config(img, XP)).disk_bus == "virtio"
    assert readiness(MergeInput.from_config(img, XP), installed=[]).disk_bus == "ide"
