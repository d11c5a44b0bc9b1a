"""The .vmx and .ovf readers: what a VMware VM description gives, and what is refused (no appliance)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from pipeline.core.config import load_config
from pipeline.core.errors import InputError
from pipeline.steps.vm_source import resolve_config
from pipeline.vmware import ovf
from pipeline.vmware.vmx import parse_vmx, read_vmsd_names, read_vmx

ESX = """.encoding = "UTF-8"
config.version = "8"
virtualHW.version = "13"
displayName = "FS01 |22file server|22"
annotation = "Dept. file server|0Aowner: IT |7C ops"
guestOS = "winnetenterprise"
memSize = "4096"
numvcpus = "4"
cpuid.coresPerSocket = "2"
firmware = "efi"
scsi0.present = "TRUE"
scsi0.virtualDev = "lsisas1068"
scsi0:0.present = "TRUE"
scsi0:0.fileName = "FS01.vmdk"
scsi0:1.present = "TRUE"
scsi0:1.fileName = "FS01_1.vmdk"
scsi0:1.mode = "independent-persistent"
scsi1.present = "TRUE"
scsi1:0.present = "TRUE"
scsi1:0.fileName = "/vmfs/volumes/ds2/FS01/FS01_2.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "atapi-cdrom"
ide1:0.fileName = "/dev/cdrom"
floppy0.present = "FALSE"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "vmxnet3"
ethernet0.addressType = "vpx"
ethernet0.generatedAddress = "00:50:56:9a:12:34"
ethernet1.present = "TRUE"
ethernet1.virtualDev = "e1000"
ethernet1.addressType = "static"
ethernet1.address = "00:50:56:3F:00:01"
ethernet1.generatedAddress = "00:0c:29:00:00:99"
ethernet2.present = "FALSE"
ethernet2.address = "00:50:56:00:00:02"
"""

WORKSTATION_1252 = (
    '#!/usr/bin/vmware\r\n.encoding = "windows-1252"\r\nconfig.version = "8"\r\nvirtualHW.version = "4"\r\n'
    'displayName = "Büro XP – Müller"\r\nguestOS = "winxppro"\r\nmemsize = "512"\r\n'
    'ide0:0.present = "TRUE"\r\nide0:0.fileName = "Windows XP Professional.vmdk"\r\n'
    'ide0:1.present = "TRUE"\r\nide0:1.fileName = "Daten.vmdk"\r\n'
    'sound.present = "TRUE"\r\nusb.present = "TRUE"\r\nfloppy0.present = "TRUE"\r\n'
    'ethernet0.present = "TRUE"\r\nethernet0.connectionType = "nat"\r\n'
    'ethernet0.addressType = "generated"\r\n'
    'ethernet0.generatedAddress = "00:0c:29:ab:cd:ef"\r\n'
).encode("cp1252")


def vmx(text: str | bytes, tmp_path: Path, name: str = "VM.vmx"):
    p = tmp_path / name
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    return read_vmx(p)


def test_esx_vmx_facts(tmp_path: Path) -> None:
    v = vmx(ESX, tmp_path)
    assert [d.slot for d in v.disks] == ["scsi0:0", "scsi0:1", "scsi1:0"]
    assert [d.path for d in v.disks] == [tmp_path / "FS01.vmdk", tmp_path / "FS01_1.vmdk",
                                          Path("/vmfs/volumes/ds2/FS01/FS01_2.vmdk")]
    assert v.disks[1].mode == "independent-persistent" and v.disks[0].mode == "persistent"
    assert v.disks[0].controller_model == "lsisas1068"
    assert (v.memory_mib, v.vcpus, v.cores_per_socket, v.firmware) == (4096, 4, 2, "efi")
    assert v.display_name == 'FS01 "file server"'
    assert v.annotation == "Dept. file server\nowner: IT | ops"
    assert v.guest_os == "winnetenterprise" and v.hw_version == 13
    assert [(n.index, n.model, n.mac, n.address_type) for n in v.nics] == [
        (0, "vmxnet3", "00:50:56:9a:12:34", "vpx"), (1, "e1000", "00:50:56:3f:00:01", "static")]
    assert v.boot_disk == v.disks[0]
    assert any("CD-ROM" in i and "ide1:0" in i for i in v.info)


def test_workstation_windows_1252(tmp_path: Path) -> None:
    v = vmx(WORKSTATION_1252, tmp_path)
    assert v.display_name == "Büro XP – Müller" and v.encoding == "cp1252"
    assert [d.file_name for d in v.disks] == ["Windows XP Professional.vmdk", "Daten.vmdk"]
    assert v.nics[0].mac == "00:0c:29:ab:cd:ef" and v.nics[0].model is None
    assert sorted(i.split(":")[0] for i in v.info) == ["floppy0", "sound", "usb"]
    assert v.firmware is None and v.vcpus is None


def test_no_encoding_line_not_utf8_is_read_as_windows_1252(tmp_path: Path) -> None:
    v = vmx('displayName = "Café"\n'.encode("cp1252"), tmp_path)
    assert v.display_name == "Café"


def test_keys_are_case_insensitive_and_order_is_controller_order(tmp_path: Path) -> None:
    lines = ['SCSI0.Present = "TRUE"']
    # 24 disks over four controller kinds, written in a shuffled order
    slots = [f"nvme0:{u}" for u in range(3)] + [f"sata0:{u}" for u in range(8)] + \
        [f"scsi0:{u}" for u in (0, 1, 2, 3, 4, 5, 6, 8, 9, 10)] + ["ide0:0", "ide1:1", "sata1:0"]
    for s in reversed(slots):
        lines += [f'{s.upper()}.PRESENT = "true"', f'{s}.FileName = "{s.replace(":", "_")}.vmdk"']
    lines.append('bios.hddOrder = "scsi0:2,ide0:0"')
    v = vmx("\n".join(lines) + "\n", tmp_path)
    got = [d.slot for d in v.disks]
    assert len(got) == 24
    assert got[:2] == ["ide0:0", "ide1:1"] and got[2:10] == [f"sata0:{u}" for u in range(8)]
    assert got[10] == "sata1:0" and got[11] == "scsi0:0" and got[-3:] == ["nvme0:0", "nvme0:1", "nvme0:2"]
    assert v.boot_disk is not None and v.boot_disk.slot == "scsi0:2"


def test_absent_or_not_present_devices_are_not_disks(tmp_path: Path) -> None:
    v = vmx('scsi0:0.present = "FALSE"\nscsi0:0.fileName = "a.vmdk"\nscsi0:1.fileName = "b.vmdk"\n'
            'sata0.present = "FALSE"\nsata0:0.present = "TRUE"\nsata0:0.fileName = "c.vmdk"\n'
            'ide0:0.present = "TRUE"\nide0:0.fileName = "d.vmdk"\n', tmp_path)
    assert [d.file_name for d in v.disks] == ["d.vmdk"]
    assert any("sata0:0" in i and "controller" in i for i in v.info)


@pytest.mark.parametrize("text, want", [
    ('scsi0:0.present = "TRUE"\nscsi0:0.fileName = "a.vmdk"\nSCSI0:00.FILENAME = "b.vmdk"\n',
     ":3: device slot scsi0:0 has filename twice (also on line 2)"),
    ('memsize = "lots"\n', ":1: memsize is 'lots'; expected a whole number"),
    ('numvcpus = "2"\ncpuid.coresPerSocket = "4"\n', ":2: cpuid.coresPerSocket 4 is more than numvcpus 2"),
    ('a = "1"\nthis is not a vmx line\n', ':2: expected key = "value"'),
    ('.encoding = "klingon-8"\n', ":1: .encoding 'klingon-8' is not a known character set"),
    ('.encoding = "UTF-8"\nx = "\xff"\n'.encode("latin-1"), ":2: not valid UTF-8 text"),
    ("KDMV\x01\x00\x00\x00", ":1: not a .vmx file (binary data at byte 4"),
    ('ethernet0.present = "TRUE"\nethernet0.address = "00:50:56:zz:00:01"\n', ":2: ethernet0.address is"),
    ('scsi0:7.present = "TRUE"\nscsi0:7.fileName = "a.vmdk"\n', ":1: device slot scsi0:7 does not exist"),
    ('ide2:0.present = "TRUE"\nide2:0.fileName = "a.vmdk"\n', ":1: device slot ide2:0 does not exist"),
    ('sata0:0.present = "TRUE"\nsata0:0.deviceType = "rawDisk"\nsata0:0.fileName = "p.vmdk"\n',
     ":2: sata0:0 is a physical device (rawdisk)"),
    ('firmware = "coreboot"\n', ":1: firmware is 'coreboot'"),
    ('scsi0:0.present = "TRUE"\n', ":1: disk scsi0:0 is present but has no fileName"),
])
def test_bad_vmx_is_one_line_naming_file_and_line(tmp_path: Path, text: str | bytes, want: str) -> None:
    with pytest.raises(InputError) as e:
        vmx(text, tmp_path)
    msg = e.value.one_line()
    assert "\n" not in msg and msg.startswith(str(tmp_path / "VM.vmx")), msg
    assert want in msg, msg


def test_huge_and_non_regular_vmx_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="too large"):
        vmx(b'a = "b"\n' * 200_000, tmp_path)
    (tmp_path / "dir.vmx").mkdir()
    with pytest.raises(InputError, match="directory"):
        read_vmx(tmp_path / "dir.vmx")
    assert parse_vmx(b"", tmp_path / "empty.vmx").disks == ()


def test_vmsd_names_snapshots_by_the_disk_they_froze(tmp_path: Path) -> None:
    (tmp_path / "VM.vmsd").write_text(
        '.encoding = "UTF-8"\nsnapshot.numSnapshots = "1"\nsnapshot0.uid = "1"\n'
        'snapshot0.displayName = "before SP3"\nsnapshot0.disk0.fileName = "XP.vmdk"\n'
        'snapshot0.disk0.node = "ide0:0"\n')
    assert read_vmsd_names(tmp_path / "VM.vmsd") == {"xp.vmdk": "before SP3"}
    assert read_vmsd_names(tmp_path / "missing.vmsd") == {}


# -- source: VM.vmx in a config (no appliance: the config resolved, `gho2kvm plan`) --------------------
def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", *map(str, args)], check=True)


def run_cli(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "GHO2KVM_PROGRESS": "0"})


XP_VMX = """.encoding = "UTF-8"
displayName = "XP Office PC"
annotation = "reception desk"
guestOS = "winxppro"
memsize = "768"
numvcpus = "2"
ide0:0.present = "TRUE"
ide0:0.fileName = "XP Office PC.vmdk"
ide1:0.present = "TRUE"
ide1:0.deviceType = "cdrom-raw"
ide1:0.fileName = "auto detect"
sound.present = "TRUE"
ethernet0.present = "TRUE"
ethernet0.virtualDev = "e1000"
ethernet0.addressType = "generated"
ethernet0.generatedAddress = "00:0c:29:5e:aa:01"
"""


def vm_config(tmp_path: Path, vmx_text: str = XP_VMX, disks: tuple[str, ...] = ("XP Office PC.vmdk",),
              **keys: object) -> Path:
    vm = tmp_path / "XP Office PC"
    vm.mkdir(exist_ok=True)
    for d in disks:
        qemu_img("-f", "vmdk", vm / d, "16M")
    (vm / "XP Office PC.vmx").write_text(vmx_text)
    cfg = tmp_path / "migrate.yaml"
    image = {"id": "xp", "source": "XP Office PC/XP Office PC.vmx", **keys}
    cfg.write_text(yaml.safe_dump({"defaults": {"workdir": str(tmp_path / "work"),
                                                "output_dir": str(tmp_path / "out")}, "images": [image]}))
    return cfg


def test_vmx_source_gives_disk_and_settings_config_wins(tmp_path: Path) -> None:
    cfg = resolve_config(load_config(vm_config(tmp_path, vcpus=1, title="Reception")))
    (img,) = cfg.images
    assert img.source == tmp_path / "XP Office PC" / "XP Office PC.vmdk"
    assert img.vm == tmp_path / "XP Office PC" / "XP Office PC.vmx"
    assert (img.memory_mib, img.vcpus, img.title, img.description) == (768, 1, "Reception", "reception desk")
    assert img.mac == "00:0c:29:5e:aa:01" and img.nic_model == "e1000"
    origins = {k: o for k, _, o in img.origins}
    assert origins["memory_mib"] == "vmx" and origins["vcpus"] == "config (the VM says 2)"
    assert origins["title"].startswith("config") and origins["mac"].startswith("vmx")


def test_plan_shows_where_each_value_came_from_and_writes_nothing(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path, memory_mib=1024)
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 0, r.stderr
    assert "image xp: from VMware VM" in r.stdout
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.startswith("  ")}
    assert "(config (the VM says 768))" in lines["memory_mib"]
    assert "2  (vmx)" in lines["vcpus"] and "00:0c:29:5e:aa:01  (vmx: ethernet0 (generated))" in lines["mac"]
    assert "XP Office PC.vmdk  (vmx ide0:0)" in lines["source"]
    ignored = [ln for ln in r.stdout.splitlines() if ln.startswith("  ignored")]
    assert any("ide1:0: CD-ROM" in ln for ln in ignored) and any("sound" in ln for ln in ignored)
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("case, want", [
    ("missing", "XP Office PC.vmx:8: disk ide0:0 'XP Office PC.vmdk': No such file or directory"),
    ("directory", "XP Office PC.vmx:8: disk ide0:0 'XP Office PC.vmdk' is a directory, not a disk file"),
    ("outside", "lies outside the VM's folder"),
    ("snapshot", "is the delta disk of snapshot 'before SP3' (parent XP Office PC.vmdk); consolidate the "
                 "snapshots in VMware first"),
    ("two disks", "the VM has 2 disks (ide0:0 XP Office PC.vmdk, ide0:1 data.vmdk)"),
    ("no disks", "the .vmx names no disk"),
    ("binary", "not a .vmx file (binary data"),
    ("dup slot", ":9: device slot ide0:0 has filename twice (also on line 8)"),
])
def test_bad_vm_source_is_one_line_exit_2_nothing_written(tmp_path: Path, case: str, want: str) -> None:
    vm = tmp_path / "XP Office PC"
    vmx_text, disks = XP_VMX, ("XP Office PC.vmdk",)
    if case == "missing":
        disks = ()
    elif case == "directory":
        disks = ()
        (vm / "XP Office PC.vmdk").mkdir(parents=True)
    elif case == "outside":
        vmx_text = XP_VMX.replace('"XP Office PC.vmdk"', '"../elsewhere.vmdk"')
        qemu_img("-f", "vmdk", tmp_path / "elsewhere.vmdk", "16M")
    elif case == "snapshot":
        vmx_text = XP_VMX.replace('"XP Office PC.vmdk"', '"XP Office PC-000001.vmdk"')
        vm.mkdir()
        (vm / "XP.vmsd").write_text('snapshot0.displayName = "before SP3"\n'
                                    'snapshot0.disk0.fileName = "XP Office PC.vmdk"\n')
        qemu_img("-f", "vmdk", vm / "XP Office PC.vmdk", "16M")
        qemu_img("-f", "vmdk", "-b", "XP Office PC.vmdk", "-F", "vmdk", vm / "XP Office PC-000001.vmdk")
    elif case == "two disks":
        vmx_text = XP_VMX + 'ide0:1.present = "TRUE"\nide0:1.fileName = "data.vmdk"\n'
        disks = ("XP Office PC.vmdk", "data.vmdk")
    elif case == "no disks":
        vmx_text = XP_VMX.replace("ide0:0.present", "ide0:0.absent")
    elif case == "binary":
        vmx_text = XP_VMX + "\x00\x01\x02"
    elif case == "dup slot":
        vmx_text = XP_VMX.replace('ide0:0.fileName = "XP Office PC.vmdk"\n',
                                  'ide0:0.fileName = "XP Office PC.vmdk"\nIDE0:0.FILENAME = "other.vmdk"\n')
    cfg = vm_config(tmp_path, vmx_text, disks)
    for args in (("plan",), ("migrate",)):
        r = run_cli(*args, "--config", cfg)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and want in err and "Traceback" not in err, err
        assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()


# -- .ovf / .ova -------------------------------------------------------------------------------------
def ovf_xml(disks: list[tuple[str, str, str, int]], *, nvme: bool = False, extra: str = "",
            refs: str | None = None) -> str:
    """An OVF 1.x envelope as ovftool writes it; ``disks``: (file, controller instance id, unit, GiB)."""
    files = refs if refs is not None else "".join(
        f'<File ovf:href="{f}" ovf:id="file{i}" ovf:size="{{size{i}}}"/>'
        for i, (f, _, _, _) in enumerate(disks))
    dsec = "".join(f'<Disk ovf:capacity="{gib}" ovf:capacityAllocationUnits="byte * 2^30" '
                   f'ovf:diskId="vmdisk{i}" ovf:fileRef="file{i}" ovf:format="http://www.vmware.com/interfaces/specifications/'
                   f'vmdk.html#streamOptimized"/>' for i, (_, _, _, gib) in enumerate(disks))
    items = "".join(f'<Item><rasd:AddressOnParent>{u}</rasd:AddressOnParent><rasd:ElementName>Hard disk {i}'
                    f'</rasd:ElementName><rasd:HostResource>ovf:/disk/vmdisk{i}</rasd:HostResource>'
                    f'<rasd:InstanceID>{10 + i}</rasd:InstanceID><rasd:Parent>{c}</rasd:Parent>'
                    f'<rasd:ResourceType>17</rasd:ResourceType></Item>'
                    for i, (_, c, u, _) in enumerate(disks))
    return f'''<?xml version="1.0" encoding="UTF-8"?>
<Envelope vmw:buildId="build-1" xmlns="http://schemas.dmtf.org/ovf/envelope/1"
 xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1" xmlns:vmw="http://www.vmware.com/schema/ovf"
 xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData">
  <References>{files}</References>
  <DiskSection><Info>Virtual disk information</Info>{dsec}</DiskSection>
  <VirtualSystem ovf:id="W2K3 SQL">
    <Info>A virtual machine</Info><Name>W2K3 SQL</Name>
    <AnnotationSection><Info>note</Info><Annotation>SQL 2000 server</Annotation></AnnotationSection>
    <VirtualHardwareSection>
      <Info>Virtual hardware requirements</Info>
      <Item><rasd:AllocationUnits>hertz * 10^6</rasd:AllocationUnits><rasd:InstanceID>1</rasd:InstanceID>
        <rasd:ResourceType>3</rasd:ResourceType><rasd:VirtualQuantity>4</rasd:VirtualQuantity>
        <vmw:CoresPerSocket ovf:required="false">2</vmw:CoresPerSocket></Item>
      <Item><rasd:AllocationUnits>byte * 2^20</rasd:AllocationUnits><rasd:InstanceID>2</rasd:InstanceID>
        <rasd:ResourceType>4</rasd:ResourceType><rasd:VirtualQuantity>3072</rasd:VirtualQuantity></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>3</rasd:InstanceID>
        <rasd:ResourceSubType>lsilogic</rasd:ResourceSubType><rasd:ResourceType>6</rasd:ResourceType></Item>
      <Item><rasd:Address>1</rasd:Address><rasd:InstanceID>4</rasd:InstanceID>
        <rasd:ResourceType>5</rasd:ResourceType></Item>
      <Item><rasd:Address>0</rasd:Address><rasd:InstanceID>5</rasd:InstanceID>
        <rasd:ResourceSubType>{"vmware.nvme.controller" if nvme else "vmware.sata.ahci"}
        </rasd:ResourceSubType>
        <rasd:ResourceType>20</rasd:ResourceType></Item>
      <Item ovf:required="false"><rasd:AddressOnParent>0</rasd:AddressOnParent>
        <rasd:ElementName>CD/DVD drive 1</rasd:ElementName><rasd:InstanceID>6</rasd:InstanceID>
        <rasd:Parent>4</rasd:Parent>
        <rasd:ResourceType>15</rasd:ResourceType></Item>
      <Item><rasd:Address>00:50:56:ab:00:01</rasd:Address>
        <rasd:ElementName>Network adapter 1</rasd:ElementName>
        <rasd:InstanceID>7</rasd:InstanceID><rasd:ResourceSubType>E1000</rasd:ResourceSubType>
        <rasd:ResourceType>10</rasd:ResourceType></Item>
      {items}{extra}
      <vmw:Config ovf:required="false" vmw:key="firmware" vmw:value="efi"/>
    </VirtualHardwareSection>
  </VirtualSystem>
</Envelope>'''


def make_ova(tmp_path: Path, disks: dict[str, bytes], ovf_text: str, *, manifest: str | None = "SHA256",
             tamper: str | None = None, members: list[tarfile.TarInfo] | None = None) -> Path:
    sizes = {f"size{i}": len(d) for i, d in enumerate(disks.values())}
    ovf_bytes = ovf_text.format(**sizes).encode() if sizes else ovf_text.encode()
    files = {"vm.ovf": ovf_bytes, **disks}
    if manifest:
        h = {"SHA1": hashlib.sha1, "SHA256": hashlib.sha256}[manifest]
        files["vm.mf"] = "".join(f"{manifest}({n})= {h(b).hexdigest()}\n" for n, b in files.items()).encode()
    if tamper:
        files[tamper] = files[tamper][:-1] + bytes([files[tamper][-1] ^ 1])
    out = tmp_path / "vm.ova"
    with tarfile.open(out, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n, b in files.items():
            ti = tarfile.TarInfo(n)
            ti.size = len(b)
            tar.addfile(ti, io.BytesIO(b))
        for ti in members or []:
            tar.addfile(ti, io.BytesIO(b"x" * ti.size) if ti.isreg() else None)
    return out


def test_ova_read_in_place_manifest_checked(tmp_path: Path) -> None:
    disks = {"sql-disk1.vmdk": b"KDMV" + b"\1" * 3000, "sql-disk2.vmdk": b"KDMV" + b"\2" * 700,
             "sql-disk3.vmdk": b"KDMV" + b"\3" * 10}
    text = ovf_xml([("sql-disk1.vmdk", "3", 0, 40), ("sql-disk2.vmdk", "5", 1, 100),
                    ("sql-disk3.vmdk", "5", 0, 2)])
    ova = ovf.read_ova(make_ova(tmp_path, disks, text))
    o = ova.ovf
    assert [(d.file.href, d.bus, d.controller, d.unit, d.capacity) for d in o.disks] == [
        ("sql-disk3.vmdk", "sata", 0, 0, 2 << 30), ("sql-disk2.vmdk", "sata", 0, 1, 100 << 30),
        ("sql-disk1.vmdk", "scsi", 0, 0, 40 << 30)]
    assert all(d.stream_optimized for d in o.disks)
    assert (o.name, o.annotation, o.memory_mib, o.vcpus, o.cores_per_socket, o.firmware) == (
        "W2K3 SQL", "SQL 2000 server", 3072, 4, 2, "efi")
    assert o.nics == (ovf.OvfNic("e1000", "00:50:56:ab:00:01"),)
    assert any("CD/DVD" in i for i in o.info)
    m = ova.members["sql-disk2.vmdk"]  # read in place: the member's bytes at its offset in the tar
    with open(ova.path, "rb") as f:
        f.seek(m.offset)
        assert f.read(m.size) == disks["sql-disk2.vmdk"]
    assert ova.manifest is not None and set(ova.manifest) == {"vm.ovf", *disks}
    nvme_text = ovf_xml([("a.vmdk", "5", 3, 1)], nvme=True).format(size0=1)
    nvme = ovf.parse_ovf(nvme_text.encode(), tmp_path / "x.ovf")
    assert [(d.bus, d.unit) for d in nvme.disks] == [("nvme", 3)]


def test_ova_sha1_manifest_and_without_manifest(tmp_path: Path) -> None:
    disks = {"d.vmdk": b"KDMV" + b"\0" * 100}
    text = ovf_xml([("d.vmdk", "3", 0, 1)])
    assert ovf.read_ova(make_ova(tmp_path, disks, text, manifest="SHA1")).manifest is not None
    assert ovf.read_ova(make_ova(tmp_path, disks, text, manifest=None)).manifest is None


def _member(name: str, kind: bytes = tarfile.REGTYPE, size: int = 3, link: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.linkname = kind, size if kind == tarfile.REGTYPE else 0, link
    return ti


@pytest.mark.parametrize("case, want", [
    ("bad checksum", "member 'd.vmdk' fails its SHA256 check"),
    ("bad descriptor checksum", "member 'vm.ovf' fails its SHA256 check"),
    ("dotdot", "member '../evil' is not a plain file name"),
    ("absolute", "member '/etc/cron.d/x' is not a plain file name"),
    ("nested", "member 'sub/x.vmdk' is not a plain file name"),
    ("symlink", "member 'link.vmdk' is a link"),
    ("hardlink", "member 'hard.vmdk' is a link"),
    ("device", "member 'zero' is a device or FIFO"),
    ("fifo", "member 'pipe' is a device or FIFO"),
    ("folder", "member 'dir' is a folder"),
    ("duplicate", "member 'D.VMDK' appears twice"),
    ("not in manifest", "member 'd.vmdk' is not in the manifest"),
    ("missing disk", "the OVF references 'gone.vmdk', which the OVA does not hold"),
    ("size mismatch", "member 'd.vmdk' is 104 bytes, the OVF says 5"),
])
def test_hostile_or_damaged_ova_is_one_line(tmp_path: Path, case: str, want: str) -> None:
    disks = {"d.vmdk": b"KDMV" + b"\0" * 100}
    text = ovf_xml([("d.vmdk", "3", 0, 1)])
    kw: dict = {}
    extra = {"dotdot": _member("../evil"), "absolute": _member("/etc/cron.d/x"),
             "nested": _member("sub/x.vmdk"),
             "symlink": _member("link.vmdk", tarfile.SYMTYPE, link="/etc/shadow"),
             "hardlink": _member("hard.vmdk", tarfile.LNKTYPE, link="d.vmdk"),
             "device": _member("zero", tarfile.CHRTYPE), "fifo": _member("pipe", tarfile.FIFOTYPE),
             "folder": _member("dir", tarfile.DIRTYPE), "duplicate": _member("D.VMDK")}
    if case in extra:
        kw["members"] = [extra[case]]
    elif case == "bad checksum":
        kw["tamper"] = "d.vmdk"
    elif case == "bad descriptor checksum":
        kw["tamper"] = "vm.ovf"
    elif case == "missing disk":
        text = text.replace('ovf:href="d.vmdk"', 'ovf:href="gone.vmdk"')
    elif case == "size mismatch":
        text = text.replace('ovf:size="{size0}"', 'ovf:size="5"')
    path = make_ova(tmp_path, disks, text, **kw)
    if case == "not in manifest":
        path = make_ova(tmp_path, disks, text, manifest=None)  # rebuilt, the manifest naming only the .ovf
        with tarfile.open(path, "a") as tar:
            mf = f"SHA256(vm.ovf)= {hashlib.sha256(text.format(size0=104).encode()).hexdigest()}\n".encode()
            ti = tarfile.TarInfo("vm.mf")
            ti.size = len(mf)
            tar.addfile(ti, io.BytesIO(mf))
    with pytest.raises(InputError) as e:
        ovf.read_ova(path)
    msg = e.value.one_line()
    assert want in msg and msg.startswith(str(path)) and "\n" not in msg, msg


@pytest.mark.parametrize("text, want", [
    ('<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa">]><Envelope/>', "DTD or entity declaration"),
    ("<Envelope><References>", "not an OVF descriptor (XML:"),
    ("<html/>", "the root element is 'html'"),
    ('<Envelope xmlns:ovf="o"><References><File ovf:id="f" ovf:href="../../etc/passwd"/></References>'
     "</Envelope>", "href '../../etc/passwd' is not a plain file name"),
    ('<Envelope xmlns:ovf="o"><References><File ovf:id="f" ovf:href="a"/><File ovf:id="g" ovf:href="A"/>'
     "</References></Envelope>", "References names file 'g' twice"),
    ('<Envelope xmlns:ovf="o"><References/><DiskSection><Disk ovf:diskId="d" ovf:fileRef="nope"/>'
     "</DiskSection></Envelope>", "Disk 'd' fileRef 'nope' names no References/File"),
    ("<Envelope/>", "OVF holds 0 virtual systems"),
    (ovf_xml([]).replace("00:50:56:ab:00:01", "01:00:5e:00:00:01"),
     "NIC Network adapter 1 Address is '01:00:5e:00:00:01'; expected a unicast MAC"),
])
def test_bad_ovf_is_one_line(tmp_path: Path, text: str, want: str) -> None:
    with pytest.raises(InputError) as e:
        ovf.parse_ovf(text.encode(), tmp_path / "x.ovf")
    assert want in e.value.one_line(), e.value.one_line()


def test_two_disks_on_one_slot_refused(tmp_path: Path) -> None:
    text = ovf_xml([("a.vmdk", "3", 0, 1), ("b.vmdk", "3", 0, 1)]).format(size0=1, size1=1)
    with pytest.raises(InputError, match="two disks on scsi0:0"):
        ovf.parse_ovf(text.encode(), tmp_path / "x.ovf")


def test_unpacked_ovf_folder_checked_against_its_manifest(tmp_path: Path) -> None:
    d = b"KDMV" + b"\0" * 50
    text = ovf_xml([("d.vmdk", "3", 0, 1)]).format(size0=len(d)).encode()
    (tmp_path / "vm.ovf").write_bytes(text)
    (tmp_path / "d.vmdk").write_bytes(d)
    (tmp_path / "vm.mf").write_text(f"SHA1(vm.ovf)= {hashlib.sha1(text).hexdigest()}\n"
                                    f"SHA1(d.vmdk)= {hashlib.sha1(d).hexdigest()}\n")
    assert [x.file.href for x in ovf.verify_ovf_folder(tmp_path / "vm.ovf").disks] == ["d.vmdk"]
    (tmp_path / "d.vmdk").write_bytes(d + b"!")
    with pytest.raises(InputError, match="'d.vmdk' fails its SHA1 check"):
        ovf.verify_ovf_folder(tmp_path / "vm.ovf")
    (tmp_path / "vm.mf").write_text("MD5(d.vmdk)= 00\n")
    with pytest.raises(InputError, match=r"vm.mf:1: expected SHA1\(file\)="):
        ovf.verify_ovf_folder(tmp_path / "vm.ovf")


def ovf_folder(tmp_path: Path, disks: list[str]) -> Path:
    app = tmp_path / "appliance"
    app.mkdir()
    for d in disks:
        qemu_img("-f", "vmdk", "-o", "subformat=streamOptimized", app / d, "16M")
    sizes = {f"size{i}": (app / d).stat().st_size for i, d in enumerate(disks)}
    text = ovf_xml([(d, "3", i, 1) for i, d in enumerate(disks)]).format(**sizes).encode()
    (app / "sql.ovf").write_bytes(text)
    (app / "sql.mf").write_text(f"SHA256(sql.ovf)= {hashlib.sha256(text).hexdigest()}\n" + "".join(
        f"SHA256({d})= {hashlib.sha256((app / d).read_bytes()).hexdigest()}\n" for d in disks))
    cfg = tmp_path / "migrate.yaml"
    cfg.write_text(yaml.safe_dump({"defaults": {"workdir": str(tmp_path / "work"),
                                                "output_dir": str(tmp_path / "out")},
                                   "images": [{"id": "sql", "source": "appliance/sql.ovf"}]}))
    return cfg


def test_unpacked_ovf_source_gives_disk_and_settings(tmp_path: Path) -> None:
    (img,) = resolve_config(load_config(ovf_folder(tmp_path, ["sql-disk1.vmdk"]))).images
    assert img.source == tmp_path / "appliance" / "sql-disk1.vmdk"
    assert (img.memory_mib, img.vcpus, img.title, img.mac, img.nic_model) == (
        3072, 4, "W2K3 SQL", "00:50:56:ab:00:01", "e1000")
    assert ("firmware", "uefi") in [(k, v) for k, v, _ in img.origins]


def test_ovf_source_with_a_damaged_disk_is_refused_before_use(tmp_path: Path) -> None:
    cfg = ovf_folder(tmp_path, ["sql-disk1.vmdk"])
    disk = tmp_path / "appliance" / "sql-disk1.vmdk"
    data = bytearray(disk.read_bytes())
    data[-1] ^= 1
    disk.write_bytes(bytes(data))
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 2, r.stderr
    assert "'sql-disk1.vmdk' fails its SHA256 check against sql.mf" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "two").mkdir()
    two = ovf_folder(tmp_path / "two", ["a.vmdk", "b.vmdk"])
    r = run_cli("plan", "--config", two)
    assert r.returncode == 2 and "the VM has 2 disks (scsi0:0 a.vmdk, scsi0:1 b.vmdk)" in r.stderr, r.stderr


# -- end to end: an XP VM's .vmx migrated on test:///default (one appliance run) -----------------------
@pytest.mark.guestfs
def test_xp_vmx_migration_domain_and_receipts(tmp_path: Path, xp_vmdk) -> None:
    from tests.support.fx_disks import private_copy

    vm = tmp_path / "XP Office PC"
    disk = private_copy(xp_vmdk("monolithicSparse"), vm)
    (vm / "XP Office PC.vmx").write_text(XP_VMX.replace('"XP Office PC.vmdk"', f'"{disk.name}"'))
    cfg = tmp_path / "migrate.yaml"
    cfg.write_text(yaml.safe_dump({"defaults": {"workdir": str(tmp_path / "work"),
                                                "output_dir": str(tmp_path / "out")},
                                   "images": [{"id": "xp", "source": "XP Office PC/XP Office PC.vmx",
                                               "vcpus": 1}]}))
    before = {p: p.stat().st_mtime_ns for p in vm.iterdir()}
    r = run_cli("migrate", "--config", cfg, timeout=1200)
    assert r.returncode == 0, r.stderr
    assert {p: p.stat().st_mtime_ns for p in vm.iterdir()} == before  # the VM's folder is never written
    work = tmp_path / "work" / "xp"
    xml = (work / "domain.xml").read_text()
    assert "<memory unit='MiB'>768</memory>" in xml or '<memory unit="MiB">768</memory>' in xml, xml
    assert "00:0c:29:5e:aa:01" in xml and "<title>XP Office PC</title>" in xml, xml
    assert "reception desk" in xml and ">1</vcpu>" in xml, xml  # vcpus: the config's 1, not the VM's 2
    assert str(tmp_path / "out" / "xp.raw") in xml
    inspect = json.loads((work / "inspect.json").read_text())
    assert inspect["result"]["source"] == str(disk), inspect["result"]["source"]
    assert (tmp_path / "out" / "xp.raw").stat().st_size > 0
    keep = os.environ.get("GHO2KVM_KEEP_E2E")  # for the docs/closing note: a copy of what was made
    if keep:
        shutil.copytree(work, Path(keep), dirs_exist_ok=True)


def test_mutated_descriptors_give_facts_or_one_line(tmp_path: Path) -> None:
    """Seeded byte mutations of a .vmx and an .ovf: every outcome is facts or one InputError line."""
    import random

    rnd = random.Random(22)
    seeds = [(ESX.encode(), parse_vmx),
             (ovf_xml([("a.vmdk", "3", 0, 1), ("b.vmdk", "5", 2, 1)]).format(size0=1, size1=2).encode(),
              ovf.parse_ovf)]
    for data, parse in seeds:
        for _ in range(400):
            b = bytearray(data)
            for _ in range(rnd.randint(1, 8)):
                i = rnd.randrange(len(b))
                op = rnd.random()
                if op < 0.5:
                    b[i] = rnd.randrange(256)
                elif op < 0.8:
                    del b[i:i + rnd.randint(1, 40)]
                else:
                    b[i:i] = rnd.choice([b'"', b"|", b"\n", b"<", b">", b"&", b"0", b":", b"=", b"\xff"])
            try:
                parse(bytes(b), tmp_path / "x")
            except InputError as e:
                assert "\n" not in e.one_line()


def test_vm_values_pass_the_configs_own_rules(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path, XP_VMX.replace('memsize = "768"', 'memsize = "9000000"'))
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 2 and "the VM's memory_mib 9000000 is not usable" in r.stderr, r.stderr
    with pytest.raises(InputError, match="XML: unknown encoding"):
        ovf.parse_ovf(b'<?xml version="1.0" encoding="klingon"?><Envelope/>', tmp_path / "x.ovf")


def test_a_list_of_disks_is_refused_for_now(tmp_path: Path) -> None:
    cfg = tmp_path / "m.yaml"
    cfg.write_text("images:\n  - id: srv\n    source: [c.vmdk, d.vmdk]\n")
    r = run_cli("validate", "--config", cfg)
    assert r.returncode == 2, r.stderr
    assert "m.yaml:3: image 'srv': field 'source': a list of 2 disks" in r.stderr, r.stderr


def test_a_changed_vmx_is_read_again_by_a_long_running_worker(tmp_path: Path) -> None:
    from pipeline.tasks.base import get_config

    cfg = vm_config(tmp_path)
    assert get_config(str(cfg)).images[0].memory_mib == 768
    vmx_path = tmp_path / "XP Office PC" / "XP Office PC.vmx"
    vmx_path.write_text(XP_VMX.replace('memsize = "768"', 'memsize = "1024"'))
    os.utime(vmx_path, ns=(vmx_path.stat().st_atime_ns, vmx_path.stat().st_mtime_ns + 10**9))
    assert get_config(str(cfg)).images[0].memory_mib == 1024
