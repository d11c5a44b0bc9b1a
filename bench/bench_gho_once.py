"""Benchmark of a ``.gho`` migration: decoded once, written once (issue 14, goal 2).

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.bench_gho_once [--data-mib 256] [--compression high]
        [--format raw qcow2]

Made once under ``var/bench/gho-once/`` (reused while its stamp matches): the fake XP disk grown by
``--data-mib`` MiB, its NTFS volume given a file of that many MiB of random data (ntfs-3g mount), and
written as an NTFS file-aware ``.gho`` by the test writer (``tests/support/gho_ntfs_writer.py``). Then, in
ONE run, for each output ``--format`` (raw and qcow2 by default):

1. the reference: the native decode alone (``pipeline.gho.extract`` to a raw file in a child process,
   output fsynced by its atomic rename) and a bare ``qemu-img convert -O <format>`` of its output
   (``-S 4k`` for raw) + fsync: what the copy path costs in data (decode + one full copy);
2. the migration through the CLI (that format, verify on, ``test:///default``): bytes its process tree wrote
   (the kernel's count of dirtied blocks, ``RUSAGE_CHILDREN``) ÷ allocated bytes of the final disk, and
   the time of its data steps (ghost-convert + convert receipts) ÷ the reference. The whole wall time is
   shown too: it also holds inspect and registry-merge (one appliance launch each), which the reference
   has none of.
Page cache of the source dropped before each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from bench.common import emit, row
from pipeline.app import fakedisk

REPO = Path(__file__).resolve().parent.parent

BENCH = REPO / "var" / "bench" / "gho-once"
IMAGE_ID = "ghoonce"


def written() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock * 512


def drop_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_source(data_mib: int, compression: str, force_tcg: bool) -> Path:
    from tests.support.gho_checks import carve, mbr_partitions
    from tests.support.gho_ntfs_writer import Part, mounted, write_ntfs_image

    BENCH.mkdir(parents=True, exist_ok=True)
    src = BENCH / f"XP{data_mib}{compression[0].upper()}.GHO"
    stamp = src.with_name(src.name + ".json")
    spec = replace(fakedisk.XP, size_mib=64 + data_mib + data_mib // 8)
    want = {"spec": asdict(spec), "data_mib": data_mib, "compression": compression}
    if src.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return src
    stamp.unlink(missing_ok=True)
    print(f"making {src} ({data_mib} MiB of random data in the XP volume)", file=sys.stderr, flush=True)
    raw = fakedisk.build(BENCH / f"xp-{spec.size_mib}m.raw", spec, force_tcg=force_tcg)
    ((_t, start, count),) = mbr_partitions(raw)
    vol = carve(raw, start * 512, count * 512, BENCH / "vol.img")
    with mounted(vol, BENCH / "vol.mnt", plain=True) as m, open(m / "data.bin", "wb") as f:
        for _ in range(data_mib):
            f.write(os.urandom(1 << 20))
    tmp = BENCH / "tmp.gho"
    write_ntfs_image(tmp, [Part("ntfs", vol)], compression)
    vol.unlink()
    os.replace(tmp, src)
    stamp.write_text(json.dumps(want))
    return src


DECODE = """
import sys, time
from pipeline.gho import extract
t = time.monotonic()
extract(sys.argv[1], sys.argv[2])
print(time.monotonic() - t)
"""


def measure(src: Path, fmt: str, run_dir: Path, force_tcg: bool) -> tuple[list[tuple[str, str, str]],
                                                                          dict[str, Any]]:
    """Steps 1 and 2 above for one output format: (table rows, figures)."""
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    # 1. the reference: decode alone + one bare copy of its output
    drop_file(src)
    decoded, bare = run_dir / "decoded.raw", run_dir / f"bare.{fmt}"
    t0 = time.monotonic()
    decode_s = float(subprocess.run([sys.executable, "-c", DECODE, str(src), str(decoded)], cwd=REPO,
                                    check=True, capture_output=True, text=True).stdout.strip())
    decode_wall = time.monotonic() - t0
    drop_file(decoded)
    t0 = time.monotonic()
    sparse = ["-S", "4k"] if fmt == "raw" else []
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", fmt, *sparse, str(decoded), str(bare)],
                   check=True)
    drop_file(bare)  # fsync: our steps fsync before their atomic renames
    bare_s = time.monotonic() - t0
    alloc_decoded = decoded.stat().st_blocks * 512
    decoded.unlink()
    bare.unlink()

    # 2. the migration
    work, images = run_dir / "work", run_dir / "images"
    config = run_dir / "config.yaml"
    config.write_text(json.dumps({
        "defaults": {"workdir": str(work), "output_dir": str(images), "format": fmt, "verify": True,
                     "libvirt_uri": "test:///default", "ghost": {"backend": "native"}},
        "images": [{"id": IMAGE_ID, "source": str(src)}]}, indent=2))
    drop_file(src)
    env = {**os.environ, "GHO2KVM_FORCE_TCG": "1" if force_tcg else os.environ.get("GHO2KVM_FORCE_TCG", "")}
    w0 = written()
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "migrate", "--config", str(config)], cwd=REPO,
                          env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    tree_written = written() - w0
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the {fmt} migration failed (exit {proc.returncode})")

    def rec(step: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((work / IMAGE_ID / f"{step}.json").read_text())
        return data

    final = images / f"{IMAGE_ID}.{fmt}"
    alloc = final.stat().st_blocks * 512
    gc, conv = rec("ghost-convert"), rec("convert")
    steps = {s: rec(s)["duration_s"] for s in ("ghost-convert", "inspect", "registry-merge", "convert")}
    data_s = steps["ghost-convert"] + steps["convert"]
    ref = decode_wall + bare_s
    adopted = conv["result"].get("adopted")
    rows = [
        (f"[{fmt}] source", f"{src.name}: {src.stat().st_size / 2**20:.0f} MiB; final disk {final.name} "
                            f"{alloc / 2**20:.1f} MiB allocated", ""),
        (f"[{fmt}] adopted (final disk = ghost-convert's file)", "yes" if adopted else "NO (copy path)", ""),
        (f"[{fmt}] bytes written by the migration ÷ allocated of the final disk",
         f"{tree_written / alloc:.3f}", "≤ 1.05"),
        (f"[{fmt}]   of which: ghost-convert's disk / convert (commit) / rest",
         f"{gc['bytes_written'] / 2**20:.1f} / {conv['bytes_written'] / 2**20:.1f} / "
         f"{(tree_written - gc['bytes_written'] - conv['bytes_written']) / 2**20:.1f} MiB", ""),
        (f"[{fmt}] reference: native decode alone + bare qemu-img convert + fsync",
         f"{decode_wall:.2f} + {bare_s:.2f} = {ref:.2f} s (decode {decode_s:.2f} s in-process; "
         f"its output {alloc_decoded / 2**20:.1f} MiB allocated)", ""),
        (f"[{fmt}] ghost-convert + convert steps (receipts) ÷ reference",
         f"{steps['ghost-convert']:.2f} + {steps['convert']:.2f} = {data_s:.2f} s → {data_s / ref:.2f}×",
         "≤ 1.1×"),
        (f"[{fmt}] whole migration wall time (incl. inspect + registry-merge: "
         f"{steps['inspect']:.1f} + {steps['registry-merge']:.1f} s of appliance work)",
         f"{wall:.1f} s → {wall / ref:.2f}× the reference; without those two steps "
         f"{(wall - steps['inspect'] - steps['registry-merge']) / ref:.2f}×", ""),
    ]
    figures = {"format": fmt, "bytes_ratio": round(tree_written / alloc, 4),
               "data_time_ratio": round(data_s / ref, 3), "wall_s": round(wall, 1),
               "reference_s": round(ref, 2),
               "steps_s": steps, "tree_written": tree_written, "final_allocated": alloc,
               "adopted": bool(adopted)}
    return rows, figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-mib", type=int, default=256)
    p.add_argument("--compression", default="high", choices=("none", "fast", "high"))
    p.add_argument("--format", nargs="+", default=["raw", "qcow2"], choices=("raw", "qcow2"))
    p.add_argument("--keep", action="store_true", help="keep var/bench/gho-once/run-<format> afterwards")
    a = p.parse_args(argv)
    force_tcg = os.environ.get("GHO2KVM_FORCE_TCG") == "1"
    src = make_source(a.data_mib, a.compression, force_tcg)
    rows: list[tuple[str, str, str]] = []
    figures = []
    for fmt in a.format:
        r, f = measure(src, fmt, BENCH / f"run-{fmt}", force_tcg)
        rows += r
        figures.append(f)
        if not a.keep:
            shutil.rmtree(BENCH / f"run-{fmt}", ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"{name:<{width}}  {value}{'   goal ' + goal if goal else ''}")
    print(json.dumps(figures))
    command = f"python -m bench.bench_gho_once --data-mib {a.data_mib}"
    out = []
    for f in figures:
        fmt = f["format"]
        note = "" if f["adopted"] else " (not adopted)"
        out.append(row(f"{fmt} .gho migration: bytes written ÷ final disk allocated",
                       f"{f['bytes_ratio']:.3f}{note}", "≤ 1.05", f["bytes_ratio"] <= 1.05, command))
        out.append(row(f"{fmt} .gho: ghost-convert + convert ÷ (decode + bare qemu-img convert + fsync)",
                       f"{f['data_time_ratio']:.2f}×", "≤ 1.1×", f["data_time_ratio"] <= 1.1, command))
    emit("gho_once", out, figures=figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
