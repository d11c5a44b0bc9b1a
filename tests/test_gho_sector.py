"""Sector-mode images, spans and error handling, with images made by the test writer."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

import pytest

from pipeline.gho import GhoError, extract, read_info
from pipeline.gho.bootchain import MBR_BIN
from tests.support import gho_writer as gw
from tests.support.gho_checks import FIXTURES, mbr_partitions

P1 = (0x01, 2048, 2048)  # FAT12 volume, 1 MiB
P2 = (0x83, 4096, 301)  # odd size: the last block of its chain is short
IMAGE_CODE = b"\xfa\x33\xc0IMAGE'S OWN MBR CODE" + bytes(400)  # the disk's own MBR code (kept)


def _fat12_volume(tmp: Path) -> bytes:
    vol = tmp / "p1.img"
    # hidden sectors = its start: the rebuild leaves a correct boot chain as it is
    subprocess.run(["mkfs.fat", "-C", "-n", "SECTOR", "-i", "12345678", "-h", str(P1[1]), str(vol), "1024"],
                   check=True, capture_output=True)
    (tmp / "hello.txt").write_bytes(b"hello from a sector image\r\n" * 40)
    subprocess.run(["mcopy", "-i", str(vol), str(tmp / "hello.txt"), "::HELLO.TXT"], check=True)
    return vol.read_bytes()


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    tmp = tmp_path_factory.mktemp("sector-src")
    rnd = random.Random(7)
    d = bytearray(4397 * 512)
    d[0:512] = gw.mbr([P1, P2])
    d[0:len(IMAGE_CODE)] = IMAGE_CODE
    d[512:1024] = bytes(rnd.randrange(256) for _ in range(512))  # something in track 0 after the MBR
    d[2048 * 512:4096 * 512] = _fat12_volume(tmp)
    p2 = bytearray(rnd.randrange(256) for _ in range(301 * 512))
    p2[40000:90000] = bytes(50000)
    p2[100000:101000] = b"ABCD" * 250
    d[4096 * 512:] = p2
    return bytes(d)


CASES = [
    ("none", None, False), ("fast", None, False), ("high", None, False),
    ("none", None, True), ("none", "secret", True), ("none", "secret", False),
    ("high", "secret", False), ("fast", "Secret9", False),
]


@pytest.mark.parametrize(("comp", "pw", "raw_none"), CASES,
                         ids=[f"{c}-{'pw' if p else 'nopw'}-{'raw' if r else 'framed'}" for c, p, r in CASES])
def test_sector_image_round_trip(tmp_path: Path, disk: bytes, comp: str, pw: str | None,
                                 raw_none: bool) -> None:
    img = tmp_path / "SECTOR.GHO"
    gw.write_sector_disk(img, disk, [P1, P2], comp, password=pw, raw_none=raw_none)
    info = read_info(img, password=pw)
    assert info.image_type == "sector" and info.compression == comp and info.password == (pw is not None)
    assert info.track0_bytes == 2048 * 512
    assert [(m["type"], m["start_lba"], m["sectors"]) for m in info.mbr_partitions] == [P1, P2]
    assert [(p.kind, p.fs, p.size) for p in info.partitions] == [("sector", "FAT12", 1 << 20),
                                                                  ("sector", None, 301 * 512)]
    assert info.partitions[0].label == "SECTOR"
    seen: list[tuple[int, int]] = []
    out = tmp_path / "disk.raw"
    res = extract(img, out, password=pw, progress=lambda a, b: seen.append((a, b)))
    assert out.read_bytes() == disk
    assert res.disk_size == len(disk)
    assert [(p.start_lba, p.sectors, p.partition_type) for p in res.partitions] == [
        (2048, 2048, 0x01), (4096, 301, 0x83)]
    assert seen and seen[-1][0] == seen[-1][1] == img.stat().st_size
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


def test_sector_output_is_sparse(tmp_path: Path) -> None:
    d = bytearray(64 << 20)
    d[0:512] = gw.mbr([(0x83, 2048, (64 << 20) // 512 - 2048)])
    d[(5 << 20):(5 << 20) + 4] = b"DATA"
    img = tmp_path / "BIG.GHO"
    gw.write_sector_disk(img, bytes(d), [(0x83, 2048, (64 << 20) // 512 - 2048)], "high")
    out = tmp_path / "big.raw"
    extract(img, out)
    assert out.stat().st_size == 64 << 20
    assert out.stat().st_blocks * 512 <= 1 << 20
    with open(out, "rb") as f:
        f.seek(5 << 20)
        assert f.read(4) == b"DATA"


def test_partition_only_image_gets_a_synthetic_mbr(tmp_path: Path, disk: bytes) -> None:
    img = tmp_path / "PART.GHO"
    w = gw.ImageWriter(img, "fast")
    w.sector_partition(gw.blocks_of(disk[2048 * 512:4096 * 512]))
    w.close()
    out = tmp_path / "p.raw"
    res = extract(img, out)
    got = [(p.start_lba, p.sectors, p.partition_type, p.fs) for p in res.partitions]
    assert got == [(2048, 2048, 0x01, "FAT12")]  # placed at its boot sector's hidden sectors
    data = out.read_bytes()
    assert data[510:512] == b"\x55\xaa" and data[446 + 4] == 0x01 and data[446] == 0x80
    assert data[:440] == MBR_BIN.read_bytes()[:440]  # no MBR in the image: standard code
    assert data[2048 * 512:4096 * 512] == disk[2048 * 512:4096 * 512]
    assert res.boot_chain == {"mbr_code": "syslinux mbr.bin", "active_partition": 1,
                              "hidden_sectors_fixed": []}


# -- spans ---------------------------------------------------------------------------------------
@pytest.fixture()
def spanned(tmp_path: Path, disk: bytes) -> list[Path]:
    img = tmp_path / "SECTOR.GHO"
    gw.write_sector_disk(img, disk, [P1, P2], "high")
    return gw.split_spans(img, 20000)


def test_spanned_image_reads_across_files(tmp_path: Path, disk: bytes, spanned: list[Path]) -> None:
    assert len(spanned) >= 4
    info = read_info(spanned[0])
    assert info.spans == [p.name for p in spanned[1:]]
    out = tmp_path / "disk.raw"
    extract(spanned[0], out)
    assert out.read_bytes() == disk
    # picking a continuation file resolves back to the first file
    assert read_info(spanned[2]).path == str(spanned[0])


def test_missing_middle_span(tmp_path: Path, spanned: list[Path]) -> None:
    spanned[2].unlink()
    with pytest.raises(GhoError) as ei:
        extract(spanned[0], tmp_path / "x.raw")
    assert str(ei.value).startswith(
        "SECTOR.GHO: missing span SECTO002.GHS (found SECTO003.GHS after the gap)")
    assert not (tmp_path / "x.raw").exists()


def test_missing_last_span(tmp_path: Path, spanned: list[Path]) -> None:
    last = spanned[-1]
    last.unlink()
    with pytest.raises(GhoError, match=rf"^SECTOR.GHO: missing span {last.name}: stream ends at offset \d+"):
        read_info(spanned[0])


def test_foreign_span_file_is_not_spliced(tmp_path: Path, spanned: list[Path]) -> None:
    data = bytearray(spanned[1].read_bytes())
    data[4] ^= 0xFF  # another image's id
    spanned[1].write_bytes(bytes(data))
    with pytest.raises(GhoError, match="missing span SECTO001.GHS"):
        read_info(spanned[0])


# -- errors ----------------------------------------------------------------------------------------
def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".raw") or ".tmp-" in p.name)


def test_bad_magic(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gho"
    bad.write_bytes(b"MZ" + bytes(1000))
    with pytest.raises(GhoError) as ei:
        extract(bad, tmp_path / "o.raw")
    assert str(ei.value) == "bad.gho: not a Ghost image: bad magic 4d5a at offset 0, expected feef"
    assert _leftovers(tmp_path) == []


def test_empty_file(tmp_path: Path) -> None:
    bad = tmp_path / "empty.gho"
    bad.write_bytes(b"")
    msg = "empty.gho: not a Ghost image: file is 0 bytes, expected a 512-byte header"
    with pytest.raises(GhoError, match=msg):
        read_info(bad)


@pytest.mark.parametrize("cut", [300, 5000, 0x2400 + 5, 0x268E + 1000, 0x4A713 - 3, 313387 - 10])
def test_truncated_fixture(tmp_path: Path, cut: int) -> None:
    img = tmp_path / "cut.gho"
    img.write_bytes((FIXTURES / "11_high.gho").read_bytes()[:cut])
    with pytest.raises(GhoError) as ei:
        extract(img, tmp_path / "o.raw")
    msg = str(ei.value)
    assert msg.startswith("cut.gho: ") and "\n" not in msg
    if cut < 512:
        assert "expected a 512-byte header" in msg
    else:
        assert f"truncated at offset {cut} while reading" in msg
    assert _leftovers(tmp_path) == []


def test_truncated_sector_image(tmp_path: Path, disk: bytes) -> None:
    img = tmp_path / "T.GHO"
    gw.write_sector_disk(img, disk, [P1, P2], "fast")
    size = img.stat().st_size
    os.truncate(img, size - 5000)
    msg = rf"^T.GHO: truncated at offset {size - 5000} while reading the trailer"
    with pytest.raises(GhoError, match=msg):
        extract(img, tmp_path / "o.raw")
    assert _leftovers(tmp_path) == []


def test_corrupt_zlib_block(tmp_path: Path) -> None:
    data = bytearray((FIXTURES / "11_high.gho").read_bytes())
    rec = 0x7586  # IO.SYS's second data record (§14.3)
    data[rec + 10 + 100: rec + 10 + 140] = bytes(40)
    img = tmp_path / "z.gho"
    img.write_bytes(bytes(data))
    with pytest.raises(GhoError) as ei:
        extract(img, tmp_path / "o.raw")
    assert str(ei.value).startswith(f"z.gho: corrupt zlib block at offset {rec} (data record of /IO.SYS): ")
    assert _leftovers(tmp_path) == []  # the temporary output was removed


def test_corrupt_sector_block_removes_temp_output(tmp_path: Path, disk: bytes) -> None:
    img = tmp_path / "C.GHO"
    gw.write_sector_disk(img, disk, [P1, P2], "high")
    data = bytearray(img.read_bytes())
    pos = len(data) - 2500  # inside the last partition's chain
    data[pos:pos + 200] = bytes(range(200))
    img.write_bytes(bytes(data))
    out = tmp_path / "o.raw"
    out.write_bytes(b"previous")
    with pytest.raises(GhoError, match=r"^C.GHO: corrupt zlib block at offset \d+ \(partition 2\)"):
        extract(img, out, force=True)  # replacing it is asked for; the failure must still keep it
    assert out.read_bytes() == b"previous"  # atomic: the old output is untouched
    assert _leftovers(tmp_path) == ["o.raw"]


def test_ntfs_section_without_a_chain_refused(tmp_path: Path) -> None:
    img = tmp_path / "NTFS.GHO"
    w = gw.ImageWriter(img, "high", image_type=0)
    w.raw(gw.with_subtype(w.header, 0x04))
    w.raw(b"GHPR" + bytes(600))
    w.close()
    for call in (lambda: read_info(img), lambda: extract(img, tmp_path / "o.raw")):
        with pytest.raises(GhoError) as ei:
            call()
        assert "NTFS.GHO: partition 1 (NTFS, header at offset 2560): NTFS section, layout not understood" \
            in str(ei.value)
    assert _leftovers(tmp_path) == []


def test_unknown_compression(tmp_path: Path) -> None:
    head = bytearray(gw.file_header("high", 1))
    head[3] = 0x01
    img = tmp_path / "old.gho"
    img.write_bytes(bytes(head) + bytes(2048))
    with pytest.raises(GhoError, match="old.gho: unsupported compression byte 0x01 at offset 3"):
        read_info(img)


def test_logical_partition_in_extended_gets_an_ebr(tmp_path: Path, disk: bytes) -> None:
    vol = tmp_path / "logical.img"
    subprocess.run(["mkfs.fat", "-C", "-n", "LOGICAL", "-h", "63", str(vol), "512"], check=True,
                   capture_output=True)
    logical = vol.read_bytes()
    n = len(logical) // 512
    track0 = bytearray(disk[:2048 * 512])
    track0[0:512] = gw.mbr([P1, (0x0F, 4096, 63 + n)])
    img = tmp_path / "EXT.GHO"
    w = gw.ImageWriter(img, "high")
    w.track0(bytes(track0))
    w.sector_partition(gw.blocks_of(disk[2048 * 512:4096 * 512]))
    w.sector_partition(gw.blocks_of(logical))
    w.close()
    out = tmp_path / "ext.raw"
    res = extract(img, out)
    assert [(p.start_lba, p.logical, p.fs) for p in res.partitions] == [(2048, False, "FAT12"),
                                                                         (4096 + 63, True, "FAT12")]
    assert mbr_partitions(out) == [(0x01, 2048, 2048), (0x01, 4096 + 63, n)]
    data = out.read_bytes()
    assert data[440:512] == track0[440:512]  # the original table is kept (P1 active, as in the image)
    assert data[:440] == MBR_BIN.read_bytes()[:440]  # its code area was empty: standard MBR code
    got = data[(4096 + 63) * 512:]
    assert int.from_bytes(got[28:32], "little") == 4096 + 63  # absolute, as DOS/Windows boot code reads
    assert got[:28] + got[32:] == logical[:28] + logical[32:]
    assert res.boot_chain["hidden_sectors_fixed"] == [{"partition": 2, "was": 63, "now": 4096 + 63}]


# Unframed uncompressed data ("raw none", §8.4) stores no length: each partition must end where its own
# data ends, whatever it holds, at any position, with or without a password, a track 0 or a thread pool.
RAW_PARTS = [(0x83, 63, 70), (0x06, 200, 2048), (0x83, 2300, 301)]  # odd sizes; none is the last by luck


def _raw_disk(tmp: Path) -> bytes:
    rnd = random.Random(11)
    d = bytearray(2601 * 512)
    d[0:512] = gw.mbr(RAW_PARTS)
    for _t, start, count in RAW_PARTS:
        d[start * 512:(start + count) * 512] = rnd.randbytes(count * 512)  # no file system: no boot sector
    vol = tmp / "small.img"  # partition 2: a FAT volume smaller than its partition (boot sector ≠ entry)
    subprocess.run(["mkfs.fat", "-C", "-n", "SMALL", "-h", "200", str(vol), "512"], check=True,
                   capture_output=True)
    d[200 * 512:200 * 512 + vol.stat().st_size] = vol.read_bytes()
    return bytes(d)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("pw", [None, "secret"])
def test_raw_none_every_partition_bit_exact(tmp_path: Path, pw: str | None, threads: int) -> None:
    disk = _raw_disk(tmp_path)
    img = tmp_path / "RAW.GHO"
    gw.write_sector_disk(img, disk, RAW_PARTS, "none", password=pw, raw_none=True)
    info = read_info(img, password=pw)
    assert [p.size for p in info.partitions] == [c * 512 for _t, _s, c in RAW_PARTS]
    out = tmp_path / "disk.raw"
    res = extract(img, out, password=pw, threads=threads)
    assert [(p.start_lba, p.sectors) for p in res.partitions] == [(s, c) for _t, s, c in RAW_PARTS]
    got = out.read_bytes()
    for _t, start, count in RAW_PARTS:
        assert got[start * 512:(start + count) * 512] == disk[start * 512:(start + count) * 512]


@pytest.mark.parametrize("pw", [None, "secret"])
def test_raw_none_partitions_without_track0(tmp_path: Path, pw: str | None) -> None:
    """No partition table and no boot sector: the first end-of-run + partition header ends each volume."""
    rnd = random.Random(12)
    vols = [rnd.randbytes(512 * n) for n in (70, 129, 301)]
    img = tmp_path / "PART.GHO"
    w = gw.ImageWriter(img, "none", password=pw)
    for v in vols:
        w.sector_partition(gw.blocks_of(v), raw_none=True)
    w.close()
    assert len(read_info(img).partitions) == 3  # without the password too: same layout
    assert [p.size for p in read_info(img, password=pw).partitions] == [len(v) for v in vols]
    out = tmp_path / "p.raw"
    res = extract(img, out, password=pw, threads=3)
    got = out.read_bytes()
    assert [got[p.start_lba * 512:(p.start_lba + p.sectors) * 512] for p in res.partitions] == vols


def test_raw_none_without_a_known_end_is_refused(tmp_path: Path) -> None:
    """Data that ends inside a sector, no table, no boot sector: refused in one line, nothing written."""
    img = tmp_path / "ODD.GHO"
    w = gw.ImageWriter(img, "none")
    w.sector_partition([random.Random(13).randbytes(70 * 512 + 100)], raw_none=True)
    w.close()
    out = tmp_path / "o.raw"
    with pytest.raises(GhoError) as ei:
        extract(img, out)
    msg = str(ei.value)
    assert msg.startswith("ODD.GHO: partition 1: cannot tell where the uncompressed sector data"), msg
    assert "\n" not in msg
    assert _leftovers(tmp_path) == []
