"""End to end on phony guests of each version: fix sets, user .reg remap, virtio switch-over, refusals.

Appliance launches are few (each ≈ 20-40 s under TCG); everything runs once in :func:`runs`:

* Windows 10 (NT 10.0): inspect (1 launch): version from CurrentMajorVersionNumber, storahci.sys and
  its service; registry-merge (1): the 6.2+ set, with a virtio tree that has no w10 folder: IDE kept,
  with a warning.
* Windows 10 through the CLI (inspect + registry-merge: 2) with a virtio folder that has w10/amd64
  viostor and netkvm: viostor.sys copied, its service and DriverDatabase entries written (read back
  from the final disk with hivexget), netkvm not (NIC warning); domain.xml has a virtio disk and
  validates with virt-xml-validate.
* Windows 7 (ControlSet002): registry-merge (1) with ``mergeide`` + a MergeIDE-style file naming
  ControlSet001, ``registry_remap_controlset: true``, ``disk_bus: sata`` and a virtio folder with
  w7/amd64 drivers: viostor.sys/netkvm.sys copied, keys in ControlSet002.
* Windows Server 2003 through the CLI (inspect + registry-merge: 2) with a virtio-win ISO: domain.xml
  gets virtio disk and NIC and an empty CD-ROM; then ``disk_bus: sata``: ``plan`` and ``migrate`` refuse.
* One read-only guestfish session (1) reads the hives and driver files back from the results.

The phony disks are built once (3 launches) and cached under ``var/testdisks``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.app import fakedisk
from pipeline.core.config import ImageConfig, VirtioConfig
from pipeline.model.inspect import InspectFacts
from pipeline.steps.inspect import guest_facts
from pipeline.steps.registry_merge import MergeInput, collect_ops, registry_merge
from pipeline.tools.guestfs import force_tcg_env
from pipeline.tools.run import run
from tests.support.fx_pipeline import make_config, receipt, run_cli
from tests.test_guest import nt62_viostor_values

pytestmark = [pytest.mark.guestfs, pytest.mark.usefixtures("force_tcg_env")]

MERGEIDE_CS001 = "\r\n".join([
    "Windows Registry Editor Version 5.00", "",
    "; as in most MergeIDE copies: the control set written out",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Control\CriticalDeviceDatabase\pci#ven_8086&dev_7010]",
    '"ClassGUID"="{4D36E96A-E325-11CE-BFC1-08002BE10318}"', '"Service"="intelide"', "",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services\Gho2kvmMergeIde]", '"Start"=dword:00000000', "",
]) + "\r\n"


@dataclass
class Runs:
    root: Path
    w10_facts: dict[str, Any] = field(default_factory=dict)
    w10: dict[str, Any] = field(default_factory=dict)
    w10_tree: Path | None = None
    w10_cli: subprocess.CompletedProcess[str] | None = None
    w10_xml: str = ""
    w7: dict[str, Any] = field(default_factory=dict)
    w7_warnings_without_remap: list[str] = field(default_factory=list)
    w2003: subprocess.CompletedProcess[str] | None = None
    w2003_xml: str = ""
    refused_plan: subprocess.CompletedProcess[str] | None = None
    refused_migrate: subprocess.CompletedProcess[str] | None = None
    back: dict[str, str] = field(default_factory=dict)


def _facts(spec: fakedisk.DiskSpec, **extra: Any) -> dict[str, Any]:
    """What inspect finds on a phony disk (saves an appliance launch where inspect is tested elsewhere)."""
    major, _, minor = spec.version.partition(".")
    present = set(fakedisk.driver_files(spec))
    return {"os": "windows", "root": "/dev/sda1", "systemroot": "/WINDOWS", "product_name": spec.product,
            "major_version": int(major), "minor_version": int(minor), "arch": spec.arch,
            "current_control_set": f"ControlSet{spec.control_set:03d}",
            "drivers_present": {f: f in present for f in
                                ("atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys", "msahci.sys",
                                 "storahci.sys", "viostor.sys", "netkvm.sys")}, **extra}


def _read_back(root: Path, drives: list[tuple[str, Path]], script: list[str]) -> dict[str, str]:
    argv = ["guestfish", "--ro"]
    for fmt, path in drives:
        argv += [f"--format={fmt}", "-a", str(path)]
    env = dict(os.environ, **force_tcg_env(True))
    r = subprocess.run(argv, input="\n".join(["run", *script]) + "\n", capture_output=True, text=True,
                       env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    return {"stdout": r.stdout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, w2003_raw: Path, win7_raw: Path, win10_raw: Path) -> Runs:
    root = tmp_path_factory.mktemp("guest-e2e")
    r = Runs(root=root)
    tree = fakedisk.virtio_tree(root / "virtio-win", [
        ("viostor", "w7", "amd64"), ("netkvm", "w7", "amd64"), ("viostor", "w8.1", "amd64"),
        ("viostor", "2k3", "x86"), ("netkvm", "2k3", "x86"), ("viostor", "xp", "x86")])
    iso = fakedisk.iso_of(tree, root / "virtio-win.iso")
    r.w10_tree = fakedisk.virtio_tree(root / "virtio-win-10", [
        ("viostor", "w10", "amd64"), ("netkvm", "w10", "amd64"), ("viostor", "w10", "x86"),
        ("viostor", "w8.1", "amd64")])

    # Windows 10: real inspection, then the 6.2+ set; the tree has no w10 folder: IDE kept
    r.w10_facts = guest_facts(win10_raw, "raw", "w10", force_tcg=True)
    w10 = ImageConfig(id="w10", source=win10_raw, workdir=root / "work", virtio=VirtioConfig(drivers=tree))
    r.w10 = registry_merge(MergeInput.from_config(w10, InspectFacts.from_dict(r.w10_facts), win10_raw, "raw",
                                                  force_tcg=True)).to_dict()

    # Windows 10 through the CLI with w10 drivers in a folder: virtio disk (DriverDatabase), NIC e1000
    (root / "cli10").mkdir()
    cfg10 = make_config(root / "cli10", [{"id": "w10", "source": win10_raw, "format": "qcow2",
                                          "virtio": {"drivers": str(r.w10_tree)}, "verify": False}])
    r.w10_cli = run_cli("migrate", "--config", str(cfg10))
    xml10 = root / "cli10" / "work" / "w10" / "domain.xml"
    r.w10_xml = xml10.read_text() if xml10.exists() else ""

    # Windows 7 on ControlSet002: MergeIDE-style file naming ControlSet001, remapped; virtio folder
    reg = root / "mergeide-cs001.reg"
    reg.write_bytes(b"\xff\xfe" + MERGEIDE_CS001.encode("utf-16-le"))
    w7 = ImageConfig(id="w7", source=win7_raw, workdir=root / "work", disk_bus="sata",
                     registry=("mergeide", str(reg)), registry_remap_controlset=True,
                     virtio=VirtioConfig(drivers=tree))
    w7_facts = InspectFacts.from_dict(_facts(fakedisk.WIN7))
    r.w7_warnings_without_remap = collect_ops(
        MergeInput.from_config(replace(w7, registry_remap_controlset=False), w7_facts))[1]
    r.w7 = registry_merge(MergeInput.from_config(w7, w7_facts, win7_raw, "raw", force_tcg=True)).to_dict()

    # Windows Server 2003 through the CLI, virtio-win ISO, empty CD-ROM
    (root / "cli").mkdir()
    cfg = make_config(root / "cli", [{"id": "srv2003", "source": w2003_raw, "format": "qcow2", "cdrom": True,
                                      "virtio": {"drivers": str(iso)}, "verify": False}])
    r.w2003 = run_cli("migrate", "--config", str(cfg))
    xml_path = root / "cli" / "work" / "srv2003" / "domain.xml"
    r.w2003_xml = xml_path.read_text() if xml_path.exists() else ""
    refused_cfg = make_config(root / "cli", [{"id": "srv2003", "source": w2003_raw, "format": "qcow2",
                                              "cdrom": True, "disk_bus": "sata", "verify": False}])
    r.refused_plan = run_cli("plan", "--config", str(refused_cfg))
    r.refused_migrate = run_cli("migrate", "--config", str(refused_cfg))

    # read back: /dev/sda = w10 overlay, /dev/sdb = w7 overlay, /dev/sdc = final 2003 disk,
    # /dev/sdd = final Windows 10 disk of the CLI run
    out = root / "back"
    out.mkdir()
    script = []
    for name, part in (("w10", "/dev/sda1"), ("w7", "/dev/sdb1"), ("w2003", "/dev/sdc1"),
                       ("w10cli", "/dev/sdd1")):
        script += [f"mount-ro {part} /", f"download /WINDOWS/system32/config/system {out}/{name}-system",
                   f"echo {name}:", "-checksum sha256 /WINDOWS/system32/drivers/viostor.sys",
                   "-checksum sha256 /WINDOWS/system32/drivers/netkvm.sys",
                   "is-file /WINDOWS/system32/drivers/viostor.sys",
                   "is-file /WINDOWS/system32/drivers/netkvm.sys", "umount-all"]
    r.back = _read_back(root, [("qcow2", Path(r.w10["overlay"])), ("qcow2", Path(r.w7["overlay"])),
                               ("qcow2", root / "cli" / "images" / "srv2003.qcow2"),
                               ("qcow2", root / "cli10" / "images" / "w10.qcow2")], script)
    return r


def hivexget(hive: Path, key: str, value: str) -> str | None:
    p = subprocess.run(["hivexget", str(hive), key, value], capture_output=True, text=True)
    return p.stdout.strip() if p.returncode == 0 else None


def hivex_values(hive: Path, key: str) -> dict[str, object] | None:
    """Every value of ``key`` as hivexget lists it (regedit-like lines), decoded by type: REG_SZ
    ``"..."`` and REG_EXPAND_SZ ``str(2):"..."`` to str, ``dword:`` to int, ``hex(7):`` (REG_MULTI_SZ)
    to a list of str, ``hex(3):`` (REG_BINARY) to bytes. None: no such key."""
    p = subprocess.run(["hivexget", str(hive), key], capture_output=True, text=True)
    if p.returncode != 0:
        return None
    out: dict[str, object] = {}
    for line in p.stdout.splitlines():
        name, _, rhs = line.partition("=")
        name = name.strip('"')
        name = "" if name == "@" else name
        if rhs.startswith(('"', 'str(2):"')):
            out[name] = rhs.split('"', 1)[1][:-1].replace('\\\\', '\\').replace('\\"', '"')
        elif rhs.startswith("dword:"):
            out[name] = int(rhs[6:], 16)
        elif rhs.startswith(("hex(7):", "hex(3):")):
            data = bytes.fromhex(rhs[7:].replace(",", ""))
            multi = data.decode("utf-16-le").rstrip("\0").split("\0")
            out[name] = data if rhs.startswith("hex(3)") else multi
        else:
            out[name] = ("unparsed", rhs)
    return out


def _sums(runs: Runs, name: str) -> list[str]:
    """The read-back output of disk ``name``: sha256 of the driver files that exist, then the
    is-file answers for viostor.sys and netkvm.sys."""
    sections: dict[str, list[str]] = {}
    current: list[str] = []
    for line in runs.back["stdout"].splitlines():
        if line.endswith(":") and " " not in line:
            current = sections.setdefault(line[:-1], [])
        elif line.strip():
            current.append(line.strip())
    return sections[name]


def test_w10_inspected_version_drivers_services(runs: Runs) -> None:
    f = runs.w10_facts
    assert (f["major_version"], f["minor_version"]) == (10, 0)
    assert f["drivers_present"]["storahci.sys"] is True and f["drivers_present"]["msahci.sys"] is False
    assert f["services"]["storahci"] == 3 and f["services"]["viostor"] is None


def test_w10_gets_the_nt62_set(runs: Runs) -> None:
    assert runs.w10["registry_variant"] == "nt62"
    hive = runs.root / "back" / "w10-system"
    # disk_bus ide: the AHCI driver is not needed to boot and keeps the guest's own values
    assert hivexget(hive, r"\ControlSet001\Services\storahci", "Start") == "3"
    assert hivexget(hive, r"\ControlSet001\Services\storahci\StartOverride", "0") == "3"
    for svc in ("intelide", "atapi"):  # the IDE boot drivers; pciide is not needed on PIIX3: kept
        assert hivexget(hive, rf"\ControlSet001\Services\{svc}", "Start") == "0"
    assert hivexget(hive, r"\ControlSet001\Services\pciide", "Start") == "3"
    # no CriticalDeviceDatabase entries (8 and later do not read it)
    cdd = r"\ControlSet001\Control\CriticalDeviceDatabase"
    assert hivexget(hive, cdd + r"\pci#ven_8086&dev_7010", "Service") is None


def test_w10_without_a_matching_driver_folder_keeps_ide(runs: Runs) -> None:
    assert runs.w10["virtio"]["installed"] == {}
    tree = runs.root / "virtio-win"
    assert (f"image 'w10': virtio.drivers: no viostor (w10/w11/amd64) in {tree}; disk stays on ide"
            in runs.w10["warnings"])
    hive = runs.root / "back" / "w10-system"
    assert hivexget(hive, r"\ControlSet001\Services\viostor", "Start") is None
    assert hivex_values(hive, r"\DriverDatabase\DriverInfFiles\viostor.inf") is None
    assert _sums(runs, "w10") == ["false", "false"]  # no viostor.sys, no netkvm.sys


def test_w10_cli_switches_to_virtio_through_driverdatabase(runs: Runs, tmp_path: Path) -> None:
    assert runs.w10_cli is not None
    assert runs.w10_cli.returncode == 0, runs.w10_cli.stderr[-3000:]
    merged = receipt(runs.root / "cli10", "w10", "registry-merge")["result"]
    installed = merged["virtio"]["installed"]
    assert set(installed) == {"viostor"}  # netkvm is in the tree but cannot be set up offline
    assert installed["viostor"]["from"] == "viostor/w10/amd64/viostor.sys"
    assert installed["viostor"]["to"].lower() == "/windows/system32/drivers/viostor.sys"
    assert _sums(runs, "w10cli") == [installed["viostor"]["sha256"], "true", "false"]
    assert runs.w10_tree is not None
    assert installed["viostor"]["sha256"] == hashlib.sha256(
        (runs.w10_tree / "viostor/w10/amd64/viostor.sys").read_bytes()).hexdigest()
    nic_warning = [w for w in merged["warnings"] if "netkvm" in w]
    assert len(nic_warning) == 1 and "pnputil /add-driver netkvm.inf /install" in nic_warning[0]
    assert "NIC stays e1000" in nic_warning[0]
    # the service and every DriverDatabase value, read back from the final disk's SYSTEM hive
    hive = runs.root / "back" / "w10cli-system"
    assert hivex_values(hive, r"\ControlSet001\Services\viostor") == {
        "Type": 1, "Start": 0, "ErrorControl": 1, "Group": "SCSI miniport",
        "ImagePath": r"system32\DRIVERS\viostor.sys"}
    assert hivex_values(hive, r"\ControlSet001\Services\viostor\Parameters\PnpInterface") == {"5": 1}
    expected: dict[str, dict[str, object]] = {}
    for (key, name), value in nt62_viostor_values("amd64").items():
        expected.setdefault(key, {})[name] = value
    for key, values in expected.items():
        assert hivex_values(hive, "\\" + key) == values, key
    assert hivexget(hive, r"\ControlSet001\Services\netkvm", "Start") is None
    assert hivexget(hive, r"\ControlSet001\Control\CriticalDeviceDatabase\pci#ven_1af4&dev_1001",
                    "Service") is None
    # the domain: virtio disk, the inbox e1000 NIC; valid for libvirt's schema
    dom = ET.fromstring(runs.w10_xml)
    assert dom.find("devices/disk[@device='disk']/target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert dom.find("devices/interface/model").get("type") == "e1000"  # type: ignore[union-attr]
    xml = tmp_path / "w10.xml"
    xml.write_text(runs.w10_xml)
    run(["virt-xml-validate", str(xml), "domain"], step="test-validate", timeout=60)


def test_w7_set_and_remap_land_in_controlset002(runs: Runs) -> None:
    hive = runs.root / "back" / "w7-system"
    assert runs.w7["registry_variant"] == "nt6"
    # disk_bus sata (virtio when viostor is installed, sata its fall-back): the AHCI driver is forced,
    # the IDE ones keep the guest's own Start
    assert hivexget(hive, r"\ControlSet002\Services\msahci", "Start") == "0"
    assert hivexget(hive, r"\ControlSet002\Services\intelide", "Start") == "3"
    cdd = r"\ControlSet002\Control\CriticalDeviceDatabase"
    assert hivexget(hive, cdd + r"\pci#cc_010601", "Service") == "msahci"
    assert hivexget(hive, r"\ControlSet002\Services\Gho2kvmMergeIde", "Start") == "0"
    assert hivexget(hive, r"\ControlSet001\Services\Gho2kvmMergeIde", "Start") is None
    assert hivexget(hive, r"\ControlSet001\Services\msahci", "Start") == "3"  # the other set untouched
    assert any("ControlSet001 remapped to the live ControlSet002" in w for w in runs.w7["warnings"])
    assert any("names ControlSet001, but the guest boots from ControlSet002" in w
               for w in runs.w7_warnings_without_remap)


def test_w7_virtio_drivers_copied_and_registered(runs: Runs) -> None:
    installed = runs.w7["virtio"]["installed"]
    assert set(installed) == {"viostor", "netkvm"}
    assert installed["viostor"]["from"] == "viostor/w7/amd64/viostor.sys"
    hive = runs.root / "back" / "w7-system"
    assert hivexget(hive, r"\ControlSet002\Services\viostor", "Start") == "0"
    assert hivexget(hive, r"\ControlSet002\Control\CriticalDeviceDatabase\pci#ven_1af4&dev_1001",
                    "Service") == "viostor"
    assert hivexget(hive, r"\ControlSet002\Control\CriticalDeviceDatabase\pci#ven_1af4&dev_1041",
                    "Service") == "netkvm"
    sums = runs.back["stdout"].split()
    assert installed["viostor"]["sha256"] in sums and installed["netkvm"]["sha256"] in sums


def test_w2003_cli_switches_to_virtio_from_the_iso(runs: Runs) -> None:
    assert runs.w2003 is not None
    assert runs.w2003.returncode == 0, runs.w2003.stderr[-3000:]
    merged = receipt(runs.root / "cli", "srv2003", "registry-merge")["result"]
    assert set(merged["virtio"]["installed"]) == {"viostor", "netkvm"}
    assert merged["registry_variant"] == "nt5"
    dom = ET.fromstring(runs.w2003_xml)
    assert dom.find("devices/disk[@device='disk']/target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    assert dom.find("devices/interface/model").get("type") == "virtio"  # type: ignore[union-attr]
    cd = dom.find("devices/disk[@device='cdrom']")
    assert cd is not None and cd.find("source") is None
    assert dom.find("features/hyperv") is None  # none for 5.x
    assert dom.findtext("memory") == "512"  # default for 5.x
    hive = runs.root / "back" / "w2003-system"
    assert hivexget(hive, r"\ControlSet001\Services\viostor", "Start") == "0"
    assert hivexget(hive, r"\ControlSet001\Services\PCIIde", "Start") == "0"


def test_sata_on_2003_is_refused_at_plan_and_migrate(runs: Runs) -> None:
    line = ("image 'srv2003': disk_bus 'sata': Windows Server 2003 has no AHCI driver; use ide, or virtio "
            "with virtio.drivers")
    p = runs.refused_plan
    assert p is not None
    assert p.returncode == 2 and f"REFUSED: {line}" in p.stdout, p.stdout
    m = runs.refused_migrate
    assert m is not None and m.returncode == 2  # refused: bad input (docs/safety.md)
    assert line in m.stdout + m.stderr
    assert "Traceback" not in m.stderr
    # the first step that runs again after the change stops, before anything is written
    err = receipt(runs.root / "cli", "srv2003", "registry-merge.error")
    assert line in err["error"]
