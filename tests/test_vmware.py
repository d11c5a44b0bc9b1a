"""The .vmx and .ovf readers: what a VMware VM description gives, and what is refused (no appliance)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.core.errors import InputError
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
