"""File-aware FAT12/16/32 images with subdirectories and long names, made by the test writer from
volumes built with mkfs.fat + mtools; the rebuilt disk must list and read back identically."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

import pytest

from pipeline.gho import extract, read_info
from tests.support import gho_writer as gw
from tests.support.gho_checks import carve, fsck, mbr_partitions, mcopy

ENV = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
T0 = 1_000_000_000  # 2001-09-09


def _m(*argv: str) -> str:
    r = subprocess.run(list(argv), capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, (argv, r.stderr)
    return r.stdout


def _volume(tmp: Path, name: str, mkfs: list[str], kib: int, label: str) -> Path:
    vol = tmp / f"{name}.img"
    _m("mkfs.fat", "-C", "-n", label, "-i", "0badcafe", "-h", "63", *mkfs, str(vol), str(kib))
    src = tmp / f"{name}-src"
    (src / "Docs" / "Sub Dir With A Long Name").mkdir(parents=True)
    files = {
        "README.TXT": b"plain 8.3 name\r\n",
        "A long file name.text": b"long names survive\r\n" * 7,
        "Docs/big.bin": bytes((k * 2654435761 >> 13) & 0xFF for k in range(100_003)),
        "Docs/zeros.dat": bytes(70_000),
        "Docs/empty.txt": b"",
        "Docs/Sub Dir With A Long Name/Mixed Case.Txt": b"deep\r\n",
        "Docs/Sub Dir With A Long Name/\u00e9t\u00e9.txt": b"unicode name",
    }
    for k in range(40):  # enough slots to need several directory clusters
        files[f"Docs/many/file number {k:02d} with a long name.txt"] = f"{k}\r\n".encode()
    (src / "Docs" / "many").mkdir()
    for rel, data in files.items():
        p = src / rel
        p.write_bytes(data)
        os.utime(p, (T0 + len(rel) * 3600, T0 + len(rel) * 3600))
    _m("mcopy", "-s", "-m", "-i", str(vol), *[str(p) for p in sorted(src.iterdir())], "::/")
    _m("mattrib", "-i", str(vol), "+h", "+r", "::/README.TXT")
    _m("mattrib", "-i", str(vol), "+s", "::/Docs/zeros.dat")
    return vol


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("fat-src")
    return {
        "fat12": _volume(tmp, "fat12", ["-F", "12"], 2048, "VOL12"),
        "fat16": _volume(tmp, "fat16", ["-F", "16"], 20480, "VOL16"),
        "fat32": _volume(tmp, "fat32", ["-F", "32", "-s", "1"], 40960, "VOL32"),
    }


def _tree(vol: Path, offset: int = 0) -> dict[str, str]:
    """path -> listing line (size, date, time) + attributes + sha256, via mtools."""
    spec = f"{vol}@@{offset}"
    listing = _m("mdir", "-/", "-a", "-i", spec, "::/")
    attrs = _m("mattrib", "-/", "-i", spec, "::/")
    out = {"listing": listing, "attrs": attrs}
    for line in _m("mdir", "-/", "-b", "-i", spec, "::/").splitlines():
        if not line.endswith("/"):
            out[line] = hashlib.sha256(mcopy(vol, offset, line[2:])).hexdigest()
    return out


CASES = {
    "fat12-none": (["fat12"], "none", None),
    "fat32-fast": (["fat32"], "fast", None),
    "fat16+fat12-high-password": (["fat16", "fat12"], "high", "Secret"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rebuild_matches_source(tmp_path: Path, volumes: dict[str, Path], case: str) -> None:
    names, comp, pw = CASES[case]
    img = tmp_path / "FILEAWARE.GHO"
    gw.write_fat_image(img, [(volumes[n].read_bytes(), 63) for n in names], comp, password=pw)
    info = read_info(img, password=pw, list_files=True)
    assert [p.fs for p in info.partitions] == [n.upper() for n in names]
    assert info.warnings == []
    assert info.files is not None
    paths = {f["path"] for f in info.files}
    assert "/Docs/Sub Dir With A Long Name/\u00e9t\u00e9.txt" in paths
    assert "/Docs/many/file number 39 with a long name.txt" in paths
    out = tmp_path / "disk.raw"
    res = extract(img, out, password=pw)
    parts = mbr_partitions(out)
    assert len(parts) == len(names)
    for name, part, (ptype, start, count) in zip(names, res.partitions, parts, strict=True):
        assert (part.start_lba, part.sectors) == (start, count)
        assert ptype == {"fat12": 0x01, "fat16": 0x0E, "fat32": 0x0C}[name]
        vol = carve(out, start * 512, count * 512, tmp_path / f"{name}.img")
        r = fsck(vol)
        assert r.returncode == 0 and "differences" not in r.stdout, r.stdout + r.stderr
        # same names, sizes, dates, attributes and bytes as the source; placement preserved,
        # so even the free-space figure matches
        assert _tree(out, start * 512) == _tree(volumes[name])
    sizes = {f["path"]: f["size"] for f in res.files if f["partition"] == 1}
    assert sizes["/Docs/big.bin"] == 100_003 and sizes["/Docs/empty.txt"] == 0
    verified = [f for f in res.files if f["type"] == "file" and f["size"]]
    assert verified and all(f["checksum_verified"] for f in verified if f["data_records"] == 1)
