"""Benchmark: ``gho2kvm scan`` over a shelf of 1,000 files.

    .venv/bin/python -m bench.bench_scan [--files 1000] [--rounds 3] [--goal 5.0]

Set-up (once, kept under ``var/bench/scan/shelf/``): a mixed shelf — Ghost images (the three fixtures
and small sector images split into ``.GHS`` spans), VMware folders (a ``.vmx``, a flat and a split sparse
disk), monolithicSparse VMDKs, qcow2, VHD, raw disks with a partition table — padded to ``--files``
files with text/log files a shelf also holds. Each round, with the page cache dropped first
(``bench.common.drop_caches``): the peer, ``find SHELF -type f -exec head -c 1024 {} +`` (reading
every file's first KiB, the least any content-based scan does), then ``python -m pipeline scan SHELF``
(wall time, interpreter start-up included). Reported: the best wall time of each and the ratio.
Exit 1 if the best scan time misses the goal (seconds).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import BENCH, drop_caches, emit, quick, row
from tests.support import gho_writer as gw

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "gho"
SHELF = BENCH / "scan" / "shelf"


def build(files: int) -> int:
    """The shelf with ``files`` files (rebuilt when the count differs); returns the image count."""
    stamp = SHELF / ".files"
    if stamp.exists() and stamp.read_text() == str(files):
        return int((SHELF / ".images").read_text())
    shutil.rmtree(SHELF, ignore_errors=True)
    SHELF.mkdir(parents=True)
    disk = bytearray(1024 * 1024)
    disk[:512] = gw.mbr([(0x07, 63, 2000)])
    n_images = 0
    templates = SHELF / ".t"
    templates.mkdir()
    for kind, args in (("vmdk", ["-f", "vmdk"]), ("qcow2", ["-f", "qcow2"]), ("vhd", ["-f", "vpc"])):
        subprocess.run(["qemu-img", "create", "-q", *args, str(templates / f"t.{kind}"), "64M"], check=True)
    gw.write_sector_disk(templates / "T.GHO", bytes(disk), [(0x07, 63, 2000)], "high")
    count = 0
    k = 0
    while count < files * 0.6:
        folder = SHELF / f"dept{k % 10}"
        folder.mkdir(exist_ok=True)
        pick = k % 8
        if pick < 3:
            src = sorted(FIXTURES.glob("*.gho"))[pick]
            shutil.copy(src, folder / f"pc{k:04d}.gho")
            count += 1
        elif pick == 3:
            first = folder / f"S{k:04d}.GHO"
            shutil.copy(templates / "T.GHO", first)
            count += len(gw.split_spans(first, 3000))
        elif pick == 4:
            vm = folder / f"vm{k:04d}"
            vm.mkdir()
            subprocess.run(["qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat",
                            str(vm / "disk.vmdk"), "16M"], check=True)
            (vm / f"vm{k:04d}.vmx").write_text(f'displayName = "vm {k}"\nmemsize = "512"\n'
                                               'ide0:0.present = "TRUE"\nide0:0.fileName = "disk.vmdk"\n')
            (vm / "vmware.log").write_text("log\n" * 100)
            count += 4
        elif pick == 5:
            (folder / f"srv{k:04d}.img").write_bytes(bytes(disk))
            count += 1
        else:
            kind = ("vmdk", "qcow2", "vhd")[k % 3]
            shutil.copy(templates / f"t.{kind}", folder / f"d{k:04d}.{kind}")
            count += 1
        n_images += 1
        k += 1
    while count < files:
        (SHELF / f"dept{count % 10}" / f"readme{count:04d}.txt").write_text("inventory notes\n" * 20)
        count += 1
    shutil.rmtree(templates)
    (SHELF / ".images").write_text(str(n_images))
    stamp.write_text(str(files))
    return n_images


def all_files() -> list[Path]:
    return [p for p in SHELF.rglob("*") if p.is_file()]


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    drop_caches(*all_files())
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
    return time.monotonic() - t0, proc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2 if quick() else 3)
    ap.add_argument("--goal", type=float, default=5.0, help="seconds for the whole scan")
    a = ap.parse_args(argv)
    images = build(a.files)
    files = len(all_files()) - 2  # the two stamp files
    peer = ["sh", "-c", f"find '{SHELF}' -type f -exec head -c 1024 {{}} + >/dev/null"]
    ours = [sys.executable, "-m", "pipeline", "scan", str(SHELF)]
    t_peer, t_scan = [], []
    found = 0
    for _ in range(a.rounds):
        t, _p = timed(peer)
        t_peer.append(t)
        t, proc = timed(ours)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        t_scan.append(t)
        found = proc.stdout.count("\n  - id: ")
    best, best_peer = min(t_scan), min(t_peer)
    ok = best <= a.goal
    cmd = f"python -m bench.bench_scan --files {a.files}"
    print(f"shelf: {files} files, {images} images built, {found} entries found; "
          f"{os.getloadavg()[0]:.1f} load")
    print(f"gho2kvm scan: best {best:.2f} s of {a.rounds} ({', '.join(f'{t:.2f}' for t in t_scan)})")
    print(f"find + head -c 1024: best {best_peer:.2f} s; ratio {best / best_peer:.2f}x")
    emit("scan", [
        row(f"scan of a {files}-file shelf ({found} images), cold cache, interpreter start-up included",
            f"{best:.2f} s", f"≤ {a.goal:g} s", ok, cmd),
        row("… ÷ find + head -c 1024 of every file (same run)", f"{best / best_peer:.2f}×", "", None, cmd),
    ])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
