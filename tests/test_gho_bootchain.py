"""Finishing a rebuilt disk's boot chain (issue 10 items 1, issue 11's MBR-limit class)."""

from __future__ import annotations

import os
import random
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline.core.errors import Gho2KvmError
from pipeline.gho import bootchain as bc
from pipeline.gho import extract
from pipeline.gho.disk import MBR_LIMIT, Placement, TableError, chs, table_sectors
from pipeline.gho.sparse import FileDisk
from tests.support import gho_writer as gw


def _fat_volume(tmp: Path, name: str, kib: int = 512) -> bytes:
    vol = tmp / f"{name}.img"
    subprocess.run(["mkfs.fat", "-C", "-n", name, str(vol), str(kib)], check=True, capture_output=True)
    return vol.read_bytes()


def test_chs_values() -> None:
    assert chs(0) == b"\x00\x01\x00"
    assert chs(63) == b"\x01\x01\x00"  # c0 h1 s1
    assert chs(16065) == b"\x00\x01\x01"  # c1 h0 s1
    assert chs(1023 * 16065 + 16064) == b"\xfe\xff\xff"  # the last CHS-addressable sector
    assert chs(1024 * 16065) == b"\xfe\xff\xff"  # beyond: the LBA marker
    assert chs(2 * 16 * 63 + 5, (16, 63)) == b"\x00\x06\x02"


@pytest.mark.parametrize(("place", "field"), [
    (Placement(MBR_LIMIT, 100, 0x0C), "start LBA"),
    (Placement(63, MBR_LIMIT, 0x0C), "size in sectors"),
    (Placement(MBR_LIMIT - 10, 11, 0x0C), "end LBA"),
    (Placement(MBR_LIMIT - 10, 20, 0x0C, logical=True, ebr=MBR_LIMIT - 73), "end LBA"),
])
def test_table_refuses_what_an_mbr_cannot_hold(place: Placement, field: str) -> None:
    places = [Placement(63, 1000, 0x0C), place] if place.logical else [place]
    with pytest.raises(TableError) as ei:
        table_sectors(places, 1)
    assert ei.value.field == field and ei.value.partition == len(places)
    table_sectors([Placement(MBR_LIMIT - 100, 100, 0x0C)], 1)  # ending exactly at 2^32 fits


def _sector_image(tmp: Path, parts: list[tuple[int, int, int]], vols: dict[int, bytes], code: bytes = b"",
                  active: int = 0) -> Path:
    n = max(s + c for _, s, c in parts)
    d = bytearray(n * 512)
    m = bytearray(gw.mbr(parts))
    m[446] = 0
    m[446 + 16 * active] = 0x80
    m[:len(code)] = code
    d[:512] = m
    for start, data in vols.items():
        d[start * 512:start * 512 + len(data)] = data
    img = tmp / "S.GHO"
    gw.write_sector_disk(img, bytes(d), parts, "high")
    return img


def test_active_partition_is_the_one_with_boot_code(tmp_path: Path) -> None:
    fat = _fat_volume(tmp_path, "SYSTEM")
    rnd = random.Random(3)
    junk = bytes(rnd.randrange(256) for _ in range(4096))  # no file system, no boot sector
    parts = [(0x83, 2048, 1024), (0x01, 3072, len(fat) // 512)]
    img = _sector_image(tmp_path, parts, {2048: junk, 3072: fat}, active=0)
    out = tmp_path / "d.raw"
    res = extract(img, out)
    m = out.read_bytes()[:512]
    assert [m[446 + 16 * k] for k in range(4)] == [0, 0x80, 0, 0]
    assert res.boot_chain["active_partition"] == 2 and res.boot_chain["mbr_code"] == "syslinux mbr.bin"
    assert res.boot_chain["hidden_sectors_fixed"] == [{"partition": 2, "was": 0, "now": 3072}]


def test_image_code_and_its_active_choice_are_kept(tmp_path: Path) -> None:
    a, b = _fat_volume(tmp_path, "ONE"), _fat_volume(tmp_path, "TWO")
    parts = [(0x01, 2048, len(a) // 512), (0x01, 4096, len(b) // 512)]
    code = b"\xfa\x31\xc0 own code"
    img = _sector_image(tmp_path, parts, {2048: a, 4096: b}, code=code, active=1)
    out = tmp_path / "d.raw"
    res = extract(img, out)
    m = out.read_bytes()[:512]
    assert m[:len(code)] == code and not any(m[len(code):440])
    assert [m[446 + 16 * k] for k in range(4)] == [0, 0x80, 0, 0]
    assert res.boot_chain["mbr_code"] == "image" and res.boot_chain["active_partition"] == 2


def test_missing_mbr_bin_is_one_clear_error_and_no_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    fat = _fat_volume(tmp_path, "SYS")
    img = _sector_image(tmp_path, [(0x01, 2048, len(fat) // 512)], {2048: fat})
    monkeypatch.setattr(bc, "MBR_BIN", tmp_path / "nowhere" / "mbr.bin")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(Gho2KvmError) as ei:
        extract(img, out_dir / "d.raw")
    msg = str(ei.value)
    assert "mbr.bin" in msg and "syslinux-common" in msg and "\n" not in msg
    assert list(out_dir.iterdir()) == []


def test_ntfs_boot_sector_and_its_backup_get_the_start(tmp_path: Path) -> None:
    """The NTFS rebuild calls the same function: primary and backup (last sector) boot sectors."""
    start, sectors = 2048, 4096
    boot = bytearray(512)
    boot[0:3] = b"\xeb\x52\x90"
    boot[3:11] = b"NTFS    "
    struct.pack_into("<HB", boot, 11, 512, 8)
    struct.pack_into("<HH", boot, 24, 63, 255)
    struct.pack_into("<I", boot, 28, 63)  # as imaged from another disk
    struct.pack_into("<Q", boot, 0x28, sectors - 1)
    boot[84:90] = b"\xfa\x33\xc0\x8e\xd0\xbc"
    boot[510:512] = b"\x55\xaa"
    disk = tmp_path / "n.raw"
    with open(disk, "wb") as f:
        f.truncate((start + sectors) * 512)
    fd = os.open(disk, os.O_RDWR)
    try:
        places = [Placement(start, sectors, 0x07)]
        for lba, data in table_sectors(places, 0x11223344):
            os.pwrite(fd, data, lba * 512)
        os.pwrite(fd, bytes(boot), start * 512)
        os.pwrite(fd, bytes(boot), (start + sectors - 1) * 512)
        res = bc.finish_boot_chain(FileDisk(fd, (start + sectors) * 512), places, bc.mbr_code(None))
    finally:
        os.close(fd)
    data = disk.read_bytes()
    for lba in (start, start + sectors - 1):
        assert struct.unpack_from("<I", data, lba * 512 + 28)[0] == start
    assert data[446] == 0x80 and data[:440] == bc.MBR_BIN.read_bytes()[:440]
    assert res == {"mbr_code": "syslinux mbr.bin", "active_partition": 1,
                   "hidden_sectors_fixed": [{"partition": 1, "was": 63, "now": start}]}
