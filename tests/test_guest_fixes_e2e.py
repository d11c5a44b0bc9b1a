"""The guest fixes end to end through the CLI on two phony guests (2 inspect launches, shared by
registry-merge, + 1 read-back; the disks are built once under ``var/testdisks``):

* ``w7vm``: the issue's Windows 7 SP1 VMware VM (ControlSet002; two static interfaces on vmxnet3,
  VMware Tools, vmci, pvscsi) with ``vmware_tools: disable`` and ``network_restore: static``;
* ``w10uefi``: a UEFI Windows 10 on DHCP with VMware Tools, defaults (keep), on ``test:///default``.

Both must migrate (exit 0): ``inspect.json`` carries the network and tools, ``registry-merge.json``
each change and the first-boot file, ``plan`` and ``report`` show the network, the final W7 disk
holds the script and the values, and the UEFI domain uses firmware autoselection.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.app import fakedisk
from pipeline.guest import fixes
from pipeline.tools import guestfs
from tests.support import guest_hives as gh
from tests.support.fx_disks import build_disk
from tests.support.fx_pipeline import make_config, receipt, run_cli

pytestmark = [pytest.mark.guestfs, pytest.mark.usefixtures("force_tcg_env")]

W7VM = dataclasses.replace(fakedisk.WIN7, hostname="W7VMWARE", system_reg_extra=gh.win7_vmware())
W10UEFI = dataclasses.replace(fakedisk.WIN10, hostname="W10UEFI", partition_table="gpt", uefi=True,
                              size_mib=128, system_reg_extra=gh.win10_dhcp())


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, force_tcg_env: None) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("guest-fixes")
    w7 = build_disk("w7-vmware.raw", W7VM)
    w10 = build_disk("w10-uefi-dhcp.raw", W10UEFI)
    cfg = make_config(root, [
        {"id": "w7vm", "source": w7, "vmware_tools": "disable", "network_restore": "static"},
        {"id": "w10uefi", "source": w10},
    ], defaults={"verify": False})
    out: dict[str, Any] = {"root": root, "migrate": run_cli("migrate", "--config", str(cfg))}
    out["plan"] = run_cli("plan", "--config", str(cfg))
    out["report"] = run_cli("report", "--config", str(cfg))
    script = ["run", "mount-ro /dev/sda1 /", f"download /WINDOWS/gho2kvm/firstboot.cmd {root}/firstboot.cmd",
              f"download /WINDOWS/system32/config/system {root}/w7-system"]
    r = subprocess.run(["guestfish", "--ro", "--format=raw", "-a", str(root / "images" / "w7vm.raw")],
                       input="\n".join(script) + "\n", capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, **guestfs.force_tcg_env(True)))
    out["readback"] = r
    yield out


def _values(hive_path: Path, key: str) -> dict[str, object]:
    from pipeline.registry import regfile
    from pipeline.tools import hivex

    text = hivex.export(hive_path, key, max_depth=1, missing_ok=True, step="registry-merge")
    return {op.name: op.value for op in regfile.parse_text(text or "") if not op.is_key} if text else {}


def test_both_migrate_uefi_included(done: dict[str, Any]) -> None:
    proc = done["migrate"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    root = done["root"]
    dom = ET.parse(root / "work" / "w10uefi" / "domain.xml").getroot()
    assert dom.find("os").get("firmware") == "efi" and dom.find("os/loader") is None
    assert receipt(root, "w10uefi", "define")["result"]["action"] in ("created", "updated", "unchanged")


def test_inspect_json_carries_network_and_tools(done: dict[str, Any]) -> None:
    facts = receipt(done["root"], "w7vm", "inspect")
    net = facts["result"]["network"]
    lan = next(i for i in net if i["adapter"] == "Local Area Connection")
    assert (lan["addresses"], lan["gateways"], lan["dns_servers"], lan["driver"]) == (
        ["10.3.58.5", "10.3.58.6"], ["10.3.58.1"], ["10.3.58.4", "10.3.58.8"], "vmxnet3ndis6")
    tools = {t["name"]: t["start"] for t in facts["result"]["hypervisor_tools"]}
    assert tools["VMTools"] == 2 and tools["vmci"] == 0
    assert any(w.startswith("the guest used static 10.3.58.5/24") for w in facts["warnings"])
    w10 = receipt(done["root"], "w10uefi", "inspect")["result"]
    assert w10["firmware"] == "uefi" and [i["dhcp"] for i in w10["network"]] == [True]


def test_receipts_list_each_change(done: dict[str, Any]) -> None:
    w7 = receipt(done["root"], "w7vm", "registry-merge")["result"]
    changes = {(c["fix"], c["key"].rsplit("\\", 1)[1], c["was"], c["now"]) for c in w7["guest_changes"]}
    assert ("autoreboot", "CrashControl", "1", "0") in changes
    assert ("vmware-tools", "VMTools", "2", "4") in changes and ("vmware-tools", "vmci", "0", "4") in changes
    assert not any(c[1] in ("pvscsi", "vmrawdsk") for c in changes)
    assert ("network-restore", "gho2kvm-firstboot", "absent", "auto-start service") in changes
    [written] = w7["guest_files"]
    assert written["path"].endswith("/gho2kvm/firstboot.cmd")
    w10 = receipt(done["root"], "w10uefi", "registry-merge")["result"]
    assert [c["fix"] for c in w10["guest_changes"]] == ["autoreboot"]  # keep: VMware Tools left alone


def test_final_disk_holds_script_and_values(done: dict[str, Any]) -> None:
    r = done["readback"]
    assert r.returncode == 0, r.stderr
    root = done["root"]
    facts = receipt(root, "w7vm", "inspect")["result"]
    from pipeline.model.guest import NetInterface

    ifaces = [NetInterface.from_dict(i) for i in facts["network"]]
    want = fixes.firstboot_script(fixes.restore_candidate(ifaces)[0], [i.guid for i in ifaces], 6, 1, "w7vm")
    assert (root / "firstboot.cmd").read_bytes() == want.encode("ascii")
    hive = root / "w7-system"
    assert _values(hive, "\\ControlSet002\\Control\\CrashControl")["AutoReboot"] == 0
    assert _values(hive, "\\ControlSet002\\Control\\CrashControl")["CrashDumpEnabled"] == 7
    assert _values(hive, "\\ControlSet002\\Services\\VMTools")["Start"] == 4
    assert _values(hive, "\\ControlSet002\\Services\\pvscsi")["Start"] == 0
    assert _values(hive, "\\ControlSet002\\Services\\gho2kvm-firstboot")["Start"] == 2


def test_plan_and_report_show_the_old_network(done: dict[str, Any]) -> None:
    plan = done["plan"]
    assert plan.returncode == 0, plan.stderr
    assert "image 'w7vm': network: static 10.3.58.5/24, 10.3.58.6/24 gateway 10.3.58.1" in plan.stdout
    assert ("image 'w10uefi': network: DHCP (last lease 10.20.0.15) on 'Ethernet0' (vmxnet3ndis6)"
            in plan.stdout)
    assert "warning: other hypervisors' tools are installed: VMware Tools: VMTools (Start=2)" in plan.stdout
    report = (done["root"] / "work" / "report.md").read_text()
    assert "network: static 10.3.58.5/24" in report
    assert "changed: CurrentControlSet\\\\Services\\\\VMTools\\\\Start: 2 → 4" in report or \
        "changed: CurrentControlSet\\Services\\VMTools\\Start: 2 → 4" in report
