# ruff: noqa: E501 - messages and case descriptions read better on one line
"""NTFS file-aware images whose two statements of one fact disagree are refused, never rebuilt wrong in
silence (docs/safety.md, docs/gho-format.md §11.5–11.7). Images from the test-only writer over real mkntfs volumes;
the seeded campaign is ``tests/support/fuzz_ntfs.py`` (a sample runs here)."""

from __future__ import annotations

import os
import random
import shutil
import struct
from pathlib import Path

import pytest

from pipeline.gho.errors import GhoError
from pipeline.gho.extract import extract
from pipeline.gho.ntfs import crosscheck
from tests.support import fuzz_ntfs as fz

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkntfs", "ntfs-3g", "fusermount")) or not os.path.exists("/dev/fuse"),
    reason="needs ntfs-3g, mkntfs and FUSE")


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, fz.Base]:
    return fz.build_bases(tmp_path_factory.mktemp("ntfsx"))


def _refused(tmp: Path, data: bytes, match: str) -> None:
    src = tmp / "IMG.GHO"
    src.write_bytes(data)
    with pytest.raises(GhoError, match=match):
        extract(src, tmp / "d.raw")
    assert not (tmp / "d.raw").exists()


def test_the_untouched_images_rebuild(bases: dict[str, fz.Base], tmp_path: Path) -> None:
    for name, b in bases.items():
        src = tmp_path / f"{name}.gho"
        src.write_bytes(b.image)
        res = extract(src, tmp_path / f"{name}.raw")
        assert len(res.partitions) == (2 if name == "two" else 1)


def _mutate_record(b: fz.Base, where: str, field: str) -> bytes:
    recs, _rs, _k = fz._records(b.vol)
    for _n, raw, fixed in recs:
        pos = fz._both(b.image, raw)
        if pos is None:
            continue
        for _t, apos, mp in fz._attrs(fixed):
            ln_b, off_b = fixed[mp] & 15, fixed[mp] >> 4
            off = {"lcn": mp + 1 + ln_b, "in-use": 0x16, "size": apos + 0x30}[field]
            if field == "lcn" and not off_b or not fz._safe(off):
                continue
            img = bytearray(b.image)
            at = pos[1] if where == "copy" else pos[0]
            img[at + off] ^= 1 if field == "in-use" else 0x10
            return bytes(img)
    raise AssertionError("no record to change")


@pytest.mark.parametrize("where", ["copy", "$MFT"])
@pytest.mark.parametrize("field", ["lcn", "in-use", "size"])
def test_a_record_copy_that_disagrees_with_the_mft_is_refused(bases: dict[str, fz.Base], tmp_path: Path,
                                                              where: str, field: str) -> None:
    _refused(tmp_path, _mutate_record(bases["one"], where, field), "the stored copy and the \\$MFT data differ")


def test_a_run_moved_into_free_space_is_refused_with_a_stored_bitmap(bases: dict[str, fz.Base],
                                                                    tmp_path: Path) -> None:
    rnd = random.Random(5)
    for _ in range(20):
        what, data = fz.make_case(rnd, "ntfs-free-space", bases)
        if "copy and $MFT" in what:
            break
    _refused(tmp_path, data, "marks free")


def test_the_chain_start_scan_stops_at_the_next_partition_header(bases: dict[str, fz.Base],
                                                                 tmp_path: Path) -> None:
    img = bytearray(bases["two"].image)
    boot = img.find(b"NTFS    ") - 3
    chk = img.find(b"\x0a", boot + 512)
    while img[chk + 9] != 0x0B:
        chk = img.find(b"\x0a", chk + 1)
    img[chk + 9] ^= 0xFF
    # the scan finds a later start inside partition 1 (refused by what then disagrees), or none before
    # partition 2's header; partition 2 is never taken for partition 1's chain
    _refused(tmp_path, bytes(img), "partition 1 .*(no block chain start|refused)")


@pytest.mark.parametrize("both", [False, True])
def test_total_sectors_that_disagree_are_refused(bases: dict[str, fz.Base], tmp_path: Path, both: bool) -> None:
    img = bytearray(bases["two"].image)
    boot = img.find(b"NTFS    ") - 3
    orig = bytes(img[boot:boot + 512])
    total = struct.unpack_from("<Q", img, boot + 0x28)[0]
    struct.pack_into("<Q", img, boot + 0x28, total * 2)
    if both:
        at = bytes(img).find(orig, boot + 512)
        struct.pack_into("<Q", img, at + 0x28, total * 2)
    _refused(tmp_path, bytes(img), "\\$Bitmap holds" if both else "total sectors is")


def test_first_clear_bit() -> None:
    assert crosscheck._first_clear(b"\xff\xff", 0, 16) is None
    assert crosscheck._first_clear(b"\xff\xfe", 0, 16) == 8
    assert crosscheck._first_clear(b"\xff\xff\xff\x7f", 3, 32) == 31
    assert crosscheck._first_clear(b"\xf0\xff", 4, 12) is None
    assert crosscheck._first_clear(b"\xf0\xff", 3, 12) == 3


def test_campaign_sample_refuses_every_case() -> None:
    per, fails, notes = fz.run(seed=7, n=12)
    assert sum(per.values()) == 12
    assert not fails, notes


@pytest.mark.fuzz
def test_campaign_long_run_refuses_every_case() -> None:
    per, fails, notes = fz.run(seed=26, n=int(os.environ.get("NTFS_FUZZ_CASES", "80")))
    assert not fails, notes
