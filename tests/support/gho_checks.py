"""Helpers for the GHO tests: carve a partition out of a sparse disk, fsck.fat, mtools."""

from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gho"


def carve(disk: Path, offset: int, size: int, dest: Path) -> Path:
    """Copy ``size`` bytes at ``offset`` of a sparse ``disk`` into a sparse ``dest`` (data extents only)."""
    fi = os.open(disk, os.O_RDONLY)
    fo = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        pos, end = offset, offset + size
        while pos < end:
            try:
                d = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError:
                break
            if d >= end:
                break
            h = min(os.lseek(fi, d, os.SEEK_HOLE), end)
            while d < h:
                n = min(1 << 20, h - d)
                os.pwrite(fo, os.pread(fi, n, d), d - offset)
                d += n
            pos = h
        os.ftruncate(fo, size)
    finally:
        os.close(fi)
        os.close(fo)
    return dest


def mbr_partitions(disk: Path) -> list[tuple[int, int, int]]:
    """(type, start LBA, sectors) of every partition, following the EBR chain."""
    with open(disk, "rb") as f:
        m = f.read(512)
        assert m[510:512] == b"\x55\xaa"
        out = []
        ext = None
        for k in range(4):
            t = m[446 + 16 * k + 4]
            s, c = struct.unpack_from("<II", m, 446 + 16 * k + 8)
            if t in (0x05, 0x0F):
                ext = s
            elif t:
                out.append((t, s, c))
        ebr = ext
        while ebr is not None:
            f.seek(ebr * 512)
            e = f.read(512)
            assert e[510:512] == b"\x55\xaa"
            t = e[446 + 4]
            s, c = struct.unpack_from("<II", e, 446 + 8)
            out.append((t, ebr + s, c))
            t2 = e[462 + 4]
            s2 = struct.unpack_from("<I", e, 462 + 8)[0]
            ebr = ext + s2 if t2 in (0x05, 0x0F) else None
    return out


def fsck(volume: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fsck.fat", "-n", str(volume)], capture_output=True, text=True, timeout=60)


def mcopy(disk: Path, offset: int, name: str) -> bytes:
    r = subprocess.run(["mcopy", "-n", "-i", f"{disk}@@{offset}", f"::{name}", "-"], capture_output=True,
                       timeout=60, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def mdir_names(disk: Path, offset: int, path: str = "/") -> str:
    r = subprocess.run(["mdir", "-a", "-i", f"{disk}@@{offset}", f"::{path}"], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "MTOOLS_SKIP_CHECK": "1"})
    assert r.returncode == 0, r.stderr
    return r.stdout


def extract_raw_and_qcow2(gho: Path, tmp: Path, password: str | None = None) -> tuple[Path, Path, dict, dict]:
    """``gho`` rebuilt twice, as ``tmp/disk.raw`` and as ``tmp/disk.qcow2`` (written through qemu-nbd, as
    ghost-convert writes a qcow2 output); the two disks must be identical for ``qemu-img compare`` and
    the qcow2 clean for ``qemu-img check``. Returns both paths and both results (``output`` left out)."""
    from pipeline.gho.extract import extract
    from pipeline.tools import nbd

    raw, qcow = tmp / "disk.raw", tmp / "disk.qcow2"
    a = extract(gho, raw, password=password).to_dict()
    b = extract(gho, qcow, password=password,
                open_disk=lambda p, n: nbd.create_qcow2(p, n, image_id="eq", step="test")).to_dict()
    r = subprocess.run(["qemu-img", "info", "--output=json", str(qcow)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert raw.stat().st_size == a["disk_size"] == b["disk_size"]
    assert (info["format"], info["virtual-size"]) == ("qcow2", a["disk_size"]), info
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(qcow)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (a.pop("output"), b.pop("output")) == (str(raw), str(qcow))
    return raw, qcow, a, b
