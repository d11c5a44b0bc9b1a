"""Parallel decode (issue 23): every kind of image gives the same disk, the same result and the same error
with one decode thread and with several; the look-ahead is bounded."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from pipeline.gho import GhoError, extract
from pipeline.gho.pool import BATCH, PER_THREAD, ordered_map
from tests.support import gho_writer as gw
from tests.support.gho_checks import FIXTURES
from tests.support.gho_ntfs_writer import NtfsOptions, Part, make_volume, write_ntfs_image

HAS_NTFS = all(shutil.which(t) for t in ("mkntfs", "ntfs-3g", "fusermount")) and os.path.exists("/dev/fuse")
PW = "Par4llel"
MANY = 3  # more threads than this machine's cores: workers really overlap and finish out of order


def _sha(p: Path) -> str:
    """Digest of the data extents of a sparse disk (offsets and bytes): equal digests = equal files."""
    h = hashlib.sha256(str(p.stat().st_size).encode())
    fd = os.open(p, os.O_RDONLY)
    try:
        pos = 0
        while True:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            e = os.lseek(fd, d, os.SEEK_HOLE)
            h.update(f"@{d}".encode())
            while d < e:
                chunk = os.pread(fd, min(1 << 20, e - d), d)
                h.update(chunk)
                d += len(chunk)
            pos = e
    finally:
        os.close(fd)
    return h.hexdigest()


def _both(src: Path, tmp: Path, password: str | None = None) -> tuple[str, str, dict, dict]:
    one, many = tmp / "one.raw", tmp / "many.raw"
    r1 = extract(src, one, password=password, threads=1)
    rn = extract(src, many, password=password, threads=MANY)
    return _sha(one), _sha(many), r1.to_dict() | {"output": ""}, rn.to_dict() | {"output": ""}


def _sector_disk() -> tuple[bytes, list[tuple[int, int, int]]]:
    rnd = random.Random(23)
    parts = [(0x83, 2048, 3072), (0x83, 6000, 1501)]
    d = bytearray(7501 * 512)
    d[0:512] = gw.mbr(parts)
    for _t, start, count in parts:
        body = bytearray(rnd.randbytes(count * 512))
        body[100_000:300_000] = bytes(200_000)  # zero blocks: holes
        body[400_000:410_000] = b"text " * 2000  # compressible
        d[start * 512:(start + count) * 512] = body
    return bytes(d), parts


SECTOR = [("none", None, False), ("fast", None, False), ("high", None, False), ("none", None, True),
          ("none", PW, True), ("none", PW, False), ("high", PW, False), ("fast", PW, False)]


@pytest.mark.parametrize(("comp", "pw", "raw_none"), SECTOR,
                         ids=[f"{c}-{'pw' if p else 'nopw'}-{'raw' if r else 'framed'}"
                              for c, p, r in SECTOR])
def test_sector_images_same_with_any_thread_count(tmp_path: Path, comp: str, pw: str | None,
                                                  raw_none: bool) -> None:
    disk, parts = _sector_disk()
    img = tmp_path / "SECTOR.GHO"
    gw.write_sector_disk(img, disk, parts, comp, password=pw, raw_none=raw_none)
    one, many, r1, rn = _both(img, tmp_path, pw)
    assert one == many and r1 == rn
    out = (tmp_path / "many.raw").read_bytes()
    # every volume as imaged, bit for bit (the MBR gets boot code)
    assert [(p["start_lba"], p["sectors"]) for p in r1["partitions"]] == [(s, c) for _t, s, c in parts]
    for _t, start, count in parts:
        assert out[start * 512:(start + count) * 512] == disk[start * 512:(start + count) * 512]


def test_sector_spans_same_with_any_thread_count(tmp_path: Path) -> None:
    disk, parts = _sector_disk()
    img = tmp_path / "SPAN.GHO"
    gw.write_sector_disk(img, disk, parts, "high")
    assert len(gw.split_spans(img, 400_001)) > 3
    one, many, r1, rn = _both(img, tmp_path)
    assert one == many and r1 == rn


@pytest.mark.parametrize("name", ["75_none.gho", "11_high.gho", "11_high_pw.gho"])
def test_real_fixtures_same_with_any_thread_count(tmp_path: Path, name: str) -> None:
    one, many, r1, rn = _both(FIXTURES / name, tmp_path, "password" if "pw" in name else None)
    assert one == many and r1 == rn
    assert r1["files_total"] > 0


@pytest.mark.parametrize(("comp", "pw"), [("fast", None), ("high", PW), ("none", PW)])
def test_fat_images_same_with_any_thread_count(tmp_path: Path, comp: str, pw: str | None) -> None:
    vol = tmp_path / "fat16.img"
    subprocess.run(["mkfs.fat", "-C", "-F", "16", "-n", "PARFAT", "-h", "63", str(vol), str(24 * 1024)],
                   check=True, capture_output=True)
    rnd = random.Random(5)
    for k in range(6):
        f = tmp_path / f"f{k}.bin"
        f.write_bytes(rnd.randbytes(70_000 + 33_000 * k) + b"text\r\n" * 3000)
        subprocess.run(["mcopy", "-i", str(vol), str(f), f"::F{k}.BIN"], check=True, capture_output=True)
    img = tmp_path / "FAT.GHO"
    gw.write_fat_image(img, [(vol.read_bytes(), 63)], comp, password=pw)
    one, many, r1, rn = _both(img, tmp_path, pw)
    assert one == many and r1 == rn
    assert r1["files_total"] == 6


def _fill(m: Path) -> None:
    rnd = random.Random(9)
    (m / "big.bin").write_bytes(rnd.randbytes(3 << 20))
    (m / "text").mkdir()
    for k in range(20):
        (m / "text" / f"t{k}.txt").write_text(f"line {k}\n" * (500 * k + 1))


@pytest.fixture(scope="module")
def ntfs_vol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_NTFS:
        pytest.skip("needs ntfs-3g, mkntfs and FUSE")
    return make_volume(tmp_path_factory.mktemp("parvol") / "vol.img", 16, fill=_fill, label="PARALLEL")


NTFS = {
    "high": ("high", NtfsOptions(), None),
    "fast": ("fast", NtfsOptions(), None),
    "none-framed": ("none", NtfsOptions(), None),
    "none-raw": ("none", NtfsOptions(framed=False), None),
    "high-cut-inside-packets": ("high", NtfsOptions(cut=[1000, 70000 // 3, 32768]), None),
    "high-stored-blocks": ("high", NtfsOptions(stored_every=3), None),
    "password-a-high": ("high", NtfsOptions(cipher="a"), PW),
    "password-b-none-raw": ("none", NtfsOptions(framed=False, cipher="b"), PW),
}


@pytest.mark.parametrize("case", sorted(NTFS))
def test_ntfs_images_same_with_any_thread_count(case: str, ntfs_vol: Path, tmp_path: Path) -> None:
    comp, opts, pw = NTFS[case]
    img = tmp_path / "NTFS.GHO"
    write_ntfs_image(img, [Part("ntfs", ntfs_vol, opts)], comp, password=pw)
    if case == "high":
        assert len(gw.split_spans(img, 1_000_003)) > 1
    one, many, r1, rn = _both(img, tmp_path, pw)
    assert one == many and r1 == rn
    assert r1["partitions"][0]["files"] >= 21


def _errors(src: Path, tmp: Path) -> tuple[str, str]:
    msgs = []
    for n in (1, MANY):
        with pytest.raises(GhoError) as ei:
            extract(src, tmp / f"o{n}.raw", threads=n)
        msgs.append(str(ei.value))
        assert not list(tmp.glob(f"*o{n}.raw*"))  # no output, no temp left
    return msgs[0], msgs[1]


def test_ntfs_corrupt_block_same_error_with_any_thread_count(ntfs_vol: Path, tmp_path: Path) -> None:
    img = tmp_path / "BAD.GHO"
    write_ntfs_image(img, [Part("ntfs", ntfs_vol)], "high")
    data = bytearray(img.read_bytes())
    at = len(data) * 2 // 3  # inside the data of big.bin
    data[at:at + 64] = bytes(64)
    img.write_bytes(bytes(data))
    one, many = _errors(img, tmp_path)
    assert one == many
    assert "(NTFS), offset" in one and "packet stream byte" in one, one


def test_sector_truncated_chain_same_error_with_any_thread_count(tmp_path: Path) -> None:
    disk, parts = _sector_disk()
    img = tmp_path / "CUT.GHO"
    gw.write_sector_disk(img, disk, parts, "high")
    data = bytearray(img.read_bytes())
    at = len(data) // 2
    data[at:at + 200] = bytes(200)  # a block's zlib stream broken in the middle of the disk
    img.write_bytes(bytes(data))
    one, many = _errors(img, tmp_path)
    assert one == many and one.startswith("CUT.GHO: "), one


def test_look_ahead_is_bounded_and_results_keep_their_order() -> None:
    taken = 0
    lock = threading.Lock()

    def items():
        nonlocal taken
        for k in range(1000):
            with lock:
                taken += 1
            yield k

    def slow_first(k: int) -> int:
        if k % 7 == 0:
            threading.Event().wait(0.002)  # some jobs finish after later ones
        return k * k

    out = []
    for k, v in enumerate(ordered_map(slow_first, items(), 2)):
        out.append(v)
        assert taken <= k + 1 + PER_THREAD * BATCH * 2  # never more than the in-flight bound read ahead
    assert out == [k * k for k in range(1000)]


def test_an_item_error_comes_after_the_results_before_it() -> None:
    def items():
        yield from range(5)
        raise GhoError("X.GHO: truncated at offset 5")

    got = []
    with pytest.raises(GhoError, match="offset 5"):
        for v in ordered_map(lambda k: k, items(), 3):
            got.append(v)
    assert got == [0, 1, 2, 3, 4]
