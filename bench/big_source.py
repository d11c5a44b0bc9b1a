"""The big-image sources of ``bench/bench_big.py``, built once and cached under ``var/bench/big/``.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.big_source      # build (or reuse) and print the paths

A 4 GiB fake XP disk (``pipeline.app.fakedisk``, one appliance launch) whose NTFS volume is given, through
an ntfs-3g mount, ``RANDOM_MIB`` MiB of incompressible files and ``REAL_MIB`` MiB of real binaries and text
copied from ``/usr`` (sorted walk, so the same machine gives the same set); then

* ``XPBIG.GHO`` + ``XPBIG001.GHS``…: the volume as an NTFS file-aware High (zlib) image written by the test
  writer (``tests/support/gho_ntfs_writer.py``), split into 1 GiB pieces (streamed, never in memory);
* ``xpbig.vmdk``: the same disk (the volume written back) as a monolithicSparse VMDK.

A stamp (``sources.json``) marks the set complete; anything missing or a different recipe rebuilds it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from bench.common import BENCH

BIG = BENCH / "big"
DISK_MIB = 4096
RANDOM_MIB = 1152
REAL_MIB = 2176
SPAN = 1 << 30
RECIPE = 2
USR = ("/usr/lib", "/usr/share", "/usr/bin")


def _fill(mnt: Path) -> dict[str, int]:
    """Random files (64 MiB each, seeded) and copies of /usr files up to REAL_MIB; returns counts."""
    rnd = random.Random(23)
    data = mnt / "data"
    data.mkdir(exist_ok=True)
    left = RANDOM_MIB
    k = 0
    while left > 0:
        n = min(64, left)
        with open(data / f"random{k:03d}.bin", "wb") as f:
            for _ in range(n):
                f.write(rnd.randbytes(1 << 20))
        left -= n
        k += 1
    real = mnt / "Program Files" / "usr"
    budget = REAL_MIB << 20
    copied = files = 0
    for top in USR:
        for root, dirs, names in os.walk(top):
            dirs.sort()
            for name in sorted(names):
                src = Path(root) / name
                if copied >= budget:
                    break
                try:
                    if src.is_symlink() or not src.is_file():
                        continue
                    size = src.stat().st_size
                    if size == 0 or size > 64 << 20:
                        continue
                    dest = real / src.relative_to("/usr")
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dest)
                except OSError:
                    continue
                copied += size
                files += 1
            if copied >= budget:
                break
    return {"random_files": k, "random_bytes": RANDOM_MIB << 20, "real_files": files, "real_bytes": copied}


def _split(image: Path, span: int) -> list[Path]:
    """Cut NAME.GHO into NAME.GHO + NAMEnnn.GHS of ``span`` bytes each (a 512-byte header on each
    continuation, as Ghost writes them), streaming."""
    with open(image, "rb") as f:
        head = f.read(512)
    image_id = struct.unpack_from("<I", head, 4)[0]
    size = image.stat().st_size
    out = [image]
    pos, n = span, 1
    body = span - 512
    with open(image, "rb") as f:
        while pos < size:
            h = bytearray(head)
            h[2] = 0x09
            struct.pack_into("<I", h, 4, (image_id + n) & 0xFFFFFFFF)
            p = image.with_name(f"{image.stem[:5]}{n:03d}.GHS")
            with open(p, "wb") as o:
                o.write(bytes(h))
                f.seek(pos)
                left = min(body, size - pos)
                while left:
                    chunk = f.read(min(left, 8 << 20))
                    o.write(chunk)
                    left -= len(chunk)
            out.append(p)
            pos += body
            n += 1
    os.truncate(image, span)
    return out


def sources(force_tcg: bool = True) -> dict[str, object]:
    """Build (or reuse) the sources; returns the stamp: paths and content counts."""
    from pipeline.app import fakedisk
    from tests.support.gho_checks import carve, mbr_partitions
    from tests.support.gho_ntfs_writer import Part, mounted, write_ntfs_image

    stamp = BIG / "sources.json"
    want = {"recipe": RECIPE, "disk_mib": DISK_MIB, "random_mib": RANDOM_MIB, "real_mib": REAL_MIB,
            "span": SPAN}
    if stamp.exists():
        have = json.loads(stamp.read_text())
        paths = [*have.get("gho", []), have.get("vmdk", "")]
        if {k: have.get(k) for k in want} == want and all(Path(p).exists() for p in paths):
            return have
    shutil.rmtree(BIG, ignore_errors=True)
    BIG.mkdir(parents=True)
    print(f"making the big-image sources in {BIG} (≈ 10 min once)", file=sys.stderr, flush=True)
    spec = replace(fakedisk.XP, size_mib=DISK_MIB)
    raw = fakedisk.build(BIG / "xpbig.raw", spec, force_tcg=force_tcg)
    ((_t, start, count),) = mbr_partitions(raw)
    vol = carve(raw, start * 512, count * 512, BIG / "vol.img")
    with mounted(vol, BIG / "vol.mnt", plain=True) as m:
        counts = _fill(m)
    tmp = BIG / "XPBIG.GHO"
    write_ntfs_image(tmp, [Part("ntfs", vol)], "high")
    gho = _split(tmp, SPAN)
    # the same content as a VMDK: the filled volume back into the disk, then qemu-img convert
    fi, fo = os.open(vol, os.O_RDONLY), os.open(raw, os.O_WRONLY)
    try:
        pos, end = 0, count * 512
        while pos < end:
            try:
                d = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError:
                break
            h = os.lseek(fi, d, os.SEEK_HOLE)
            while d < h:
                n = min(8 << 20, h - d)
                os.pwrite(fo, os.pread(fi, n, d), start * 512 + d)
                d += n
            pos = h
    finally:
        os.close(fi)
        os.close(fo)
    vol.unlink()
    vmdk = BIG / "xpbig.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
                    str(raw), str(vmdk)], check=True)
    raw.unlink()
    doc = {**want, **counts, "gho": [str(p) for p in gho], "vmdk": str(vmdk),
           "gho_bytes": sum(p.stat().st_size for p in gho)}
    stamp.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


if __name__ == "__main__":
    print(json.dumps(sources(os.environ.get("GHO2KVM_FORCE_TCG") == "1"), indent=2))
