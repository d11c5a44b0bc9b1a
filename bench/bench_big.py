"""Big images (issue 23): decode on every core, the limits it is measured against, the migration by step.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.bench_big [--skip-migration]

Sources (built once, cached: ``bench/big_source.py``): a 4 GiB fake XP disk holding ≈ 3.2 GiB of files
(1.1 GiB random, 2.1 GiB of real binaries and text from /usr) as an NTFS file-aware High ``.gho`` spanned
at 1 GiB, and the same disk as a monolithicSparse VMDK. In ONE run, page cache dropped before each timed
sample (``bench.common.drop_caches``):

1. the single-core rate of this machine's zlib on the image's own blocks (the first 512 MiB of the
   chain's payloads, read first, then decoded: output MB/s): the decode limit per core;
2. the write bandwidth of the output filesystem: ``dd if=/dev/zero bs=1M count=N conv=fsync`` of the
   byte count the reader writes;
3. ``pipeline.gho.extract`` (what ghost-convert runs) in a child, with 1 decode thread and with every
   CPU (``ghost.decode_threads`` default): MB/s of data written, peak RSS;
4. the whole migration of the ``.gho`` (``test:///default``, raw, verify on): wall time split by step
   (receipts' ``duration_s``), and which steps read the whole disk (receipts' ``bytes_read`` /
   ``bytes_written``);
5. ``convert_disk`` of the VMDK through an overlay, without and with verify (the copy path's verify).

Goals, as ratios of this run: all-threads rate ≥ 0.8 × min(CPUs × zlib rate, write bandwidth); 2 threads
≥ 1.7 × 1 thread; migration wall ≤ 1.3 × (ghost-convert + inspect + registry-merge).
``BENCH_QUICK=1`` skips this bench (it needs ≈ 8 GB of disk and ≈ 10 min).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.big_source import BIG, sources
from bench.common import REPO, drop_caches, emit, load_note, migrate, quick, row

RUN = BIG / "run"
CHILD = """
import json, resource, sys, time
from pipeline.gho import extract
t = time.monotonic()
r = extract(sys.argv[1], sys.argv[2], threads=int(sys.argv[3]) or None)
print(json.dumps({"seconds": time.monotonic() - t, "written": r.bytes_written,
                  "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


ZLIB_CHILD = """
import json, sys
from pathlib import Path
from bench.bench_big import zlib_rate
print(json.dumps(zlib_rate(Path(sys.argv[1]))))
"""


def zlib_rate_child(first: Path) -> tuple[float, int]:
    """:func:`zlib_rate` in a child (its sample of payloads must not inflate the extract children's peak
    RSS, which a forked child inherits)."""
    proc = subprocess.run([sys.executable, "-c", ZLIB_CHILD, str(first)], cwd=REPO, capture_output=True,
                          text=True, check=True)
    rate, n = json.loads(proc.stdout.strip().splitlines()[-1])
    return float(rate), int(n)


def zlib_rate(first: Path, sample: int = 512 << 20) -> tuple[float, int]:
    """(output MB/s, bytes) of one thread's ``zlib`` on the first ``sample`` bytes of the chain's payloads."""
    import zlib

    from pipeline.gho.image import Image
    from pipeline.gho.ntfs.chain import Chain

    with Image(first, threads=1) as img:
        sec = img.layout.sections[0]
        chain = Chain(img.walker, sec.ntfs, img.decoder(), None, "bench")
        payloads = []
        got = 0
        for _off, payload, _nxt in chain._frames():  # noqa: SLF001 - the reader's own block framing
            if payload is None or got >= sample:
                break
            payloads.append(payload)
            got += len(payload)
    out = 0
    t0 = time.perf_counter()
    for p in payloads:
        if p[:4] == b"\x01\x00\x00\x00":
            out += len(p) - 4  # stored block: no zlib work (counted as Ghost's reader would place it)
            continue
        out += len(zlib.decompress(p))
    return out / (time.perf_counter() - t0) / 1e6, out


def write_bw(n: int, where: Path) -> float:
    target = where / "dd.bin"
    t0 = time.monotonic()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={max(1, n >> 20)}", "conv=fsync"],
                   check=True, capture_output=True)
    s = time.monotonic() - t0
    target.unlink()
    return n / s / 1e6


def extract_child(first: Path, threads: int, gho: list[Path]) -> dict[str, Any]:
    out = RUN / "x.raw"
    out.unlink(missing_ok=True)
    drop_caches(*gho)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(first), str(out), str(threads)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    wall = time.monotonic() - t0
    doc: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["wall"] = wall
    doc["mbps"] = doc["written"] / wall / 1e6
    out.unlink()
    return doc


def migration(first: Path, gho: list[Path]) -> dict[str, Any]:
    work, images = RUN / "work", RUN / "images"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(images, ignore_errors=True)
    config = RUN / "config.yaml"
    config.write_text(json.dumps({
        "defaults": {"workdir": str(work), "output_dir": str(images), "format": "raw", "verify": True,
                     "libvirt_uri": "test:///default"},
        "images": [{"id": "big", "source": str(first)}]}, indent=2))
    drop_caches(*gho)
    proc, wall, argv = migrate(config)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"the big migration failed (exit {proc.returncode})")
    steps = {}
    for rec in sorted((work / "big").glob("*.json")):
        d = json.loads(rec.read_text())
        if isinstance(d, dict) and "duration_s" in d:
            steps[rec.stem] = {"s": d["duration_s"], "read": d.get("bytes_read", 0),
                               "written": d.get("bytes_written", 0)}
    disk = (images / "big.raw").stat().st_blocks * 512
    shutil.rmtree(images, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {"wall": wall, "steps": steps, "disk_allocated": disk, "argv": argv}


def convert_verify(vmdk: Path) -> dict[str, float]:
    """convert_disk of the VMDK through a small overlay, without and with verify (seconds)."""
    from pipeline.steps.convert import ConvertInput, convert_disk
    from pipeline.tools import qemu_img

    ov = RUN / "overlay.qcow2"
    ov.unlink(missing_ok=True)
    qemu_img.create_overlay(ov, vmdk, "vmdk", image_id="big", step="bench")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 100M 4M", str(ov)], check=True,
                   capture_output=True)
    out: dict[str, float] = {}
    for verify in (False, True):
        final = RUN / "final.raw"
        final.unlink(missing_ok=True)
        drop_caches(vmdk, ov)
        t0 = time.monotonic()
        res = convert_disk(ConvertInput(image_id="big", final_disk=final, format="raw", verify=verify, src=ov,
                                        src_format="qcow2", base=vmdk, base_format="vmdk"))
        out["verify" if verify else "plain"] = time.monotonic() - t0
        if verify:
            out["compare"] = res.verify_seconds or 0.0
        final.unlink()
    ov.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-migration", action="store_true")
    p.add_argument("--skip-convert", action="store_true")
    a = p.parse_args(argv)
    if quick():
        print("bench_big: skipped (BENCH_QUICK=1)")
        emit("big", [row("big-image bench", "skipped (BENCH_QUICK=1)")])
        return 0
    from pipeline.gho.pool import default_threads

    src = sources(os.environ.get("GHO2KVM_FORCE_TCG") == "1")
    gho = [Path(x) for x in src["gho"]]  # type: ignore[union-attr]
    first, vmdk = gho[0], Path(str(src["vmdk"]))
    RUN.mkdir(parents=True, exist_ok=True)
    cpus = default_threads()
    notes = [f"start: {load_note()}"]
    zr, zbytes = zlib_rate_child(first)
    one = extract_child(first, 1, gho)
    notes.append(f"after 1 thread: {load_note()}")
    every = extract_child(first, cpus, gho)
    notes.append(f"after {cpus} threads: {load_note()}")
    bw = write_bw(every["written"], RUN)
    limit = min(cpus * zr, bw)
    speedup = one["wall"] / every["wall"]
    cmd = "python -m bench.bench_big"
    data = f"{src['random_bytes'] / 2**30:.2f} GiB random + {src['real_bytes'] / 2**30:.2f} GiB from /usr"
    rows = [
        row("source", f"{first.name} + {len(gho) - 1} spans, {src['gho_bytes'] / 2**30:.2f} GiB of .gho; "
            f"{data} ({src['real_files']} files); {vmdk.name} {vmdk.stat().st_size / 2**30:.2f} GiB",
            "", None, cmd),
        row("single-core zlib on the image's own blocks", f"{zr:.0f} MB/s (output; {zbytes / 2**20:.0f} MiB)",
            "", None, cmd),
        row("output filesystem write bandwidth (dd + fsync, same bytes)", f"{bw:.0f} MB/s", "", None, cmd),
        row("ghost-convert (extract), 1 thread", f"{one['mbps']:.0f} MB/s of data ({one['wall']:.1f} s, "
            f"{one['written'] / 2**30:.2f} GiB), peak RSS {one['rss_mib']:.0f} MiB", "", None, cmd),
        row(f"ghost-convert (extract), {cpus} threads (default)",
            f"{every['mbps']:.0f} MB/s ({every['wall']:.1f} s), peak RSS {every['rss_mib']:.0f} MiB",
            "RSS < 300 MiB", every["rss_mib"] < 300, cmd),
        row(f"{cpus} threads ÷ min({cpus} × zlib, write bw)", f"{every['mbps'] / limit:.2f}× "
            f"(limit {limit:.0f} MB/s)", "≥ 0.8×", every["mbps"] / limit >= 0.8, cmd),
        row(f"{cpus} threads ÷ 1 thread", f"{speedup:.2f}×", "≥ 1.7× (2 CPUs)", speedup >= 1.7, cmd),
    ]
    figures: dict[str, Any] = {"zlib_mbps": zr, "write_mbps": bw, "one": one, "every": every, "cpus": cpus}
    if not a.skip_migration:
        m = migration(first, gho)
        notes.append(f"after the migration: {load_note()}")
        st = m["steps"]
        core = sum(st.get(k, {}).get("s", 0) for k in ("ghost-convert", "inspect", "registry-merge"))
        split = ", ".join(f"{k} {v['s']:.1f} s" for k, v in st.items())
        disk = m["disk_allocated"]
        whole = [f"{k} (read {v['read'] / 2**30:.2f} GiB, wrote {v['written'] / 2**30:.2f} GiB)"
                 for k, v in st.items() if max(v["read"], v["written"]) >= 0.5 * disk]
        rows += [
            row("migration of the .gho (raw, verify), wall", f"{m['wall']:.1f} s: {split}; outside steps "
                f"{m['wall'] - sum(v['s'] for v in st.values()):.1f} s", "", None, cmd),
            row("migration wall ÷ (ghost-convert + inspect + registry-merge)", f"{m['wall'] / core:.2f}×",
                "≤ 1.3×", m["wall"] / core <= 1.3, cmd),
            row("steps reading or writing the whole disk (receipts' byte counters)",
                "; ".join(whole) or "none", "each at most once", None, cmd),
        ]
        figures["migration"] = m
    if not a.skip_convert:
        c = convert_verify(vmdk)
        notes.append(f"after convert: {load_note()}")
        rows.append(row("VMDK copy path: convert_disk with verify ÷ without",
                        f"{c['verify'] / c['plain']:.2f}× ({c['plain']:.1f} s → {c['verify']:.1f} s; "
                        f"compare {c['compare']:.1f} s)", "", None, cmd))
        figures["convert"] = c
    notes.append(f"end: {load_note()}")
    w = max(len(r["measure"]) for r in rows)
    for r in rows:
        met = {True: "met", False: "MISSED", None: ""}[r["met"]]
        print(f"{r['measure']:<{w}}  {r['figure']}  {r['goal']} {met}")
    print("\n".join(notes))
    emit("big", rows, figures=figures, notes=notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
