"""Benchmark of the registry-merge + convert steps on a >= 1 GiB VMDK full of random data.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.bench_convert [--random-mib 1024] [--format raw]

Made once under ``var/bench/`` (reused while its stamp matches): the fake XP disk with
``--random-mib`` MiB of random data written after its partition (unpartitioned space, so it still
inspects as Windows and registry-merge runs), converted to a monolithicSparse VMDK. Then, in ONE
run (``var/bench/run/``, wiped first):

1. time: the full migration through the CLI (its convert receipt gives one in-pipeline figure:
   ``duration_s`` of the whole step with verify, and ``convert_seconds`` of its qemu-img run), then
   ``--repeat`` rounds of: bare ``qemu-img convert`` of the VMDK to the same format, and our
   ``pipeline.steps.convert.convert_disk`` (the function the step runs) on the run's overlay with verify
   off and on. Page cache of the source/overlay dropped before each. Ratios use medians; the main
   one divides by bare + fsync of the output, since our step fsyncs before its atomic rename.
2. bytes written by the migration: allocated size of every file it left in the workdir and the
   output dir (overlay, final disk, receipts, domain XML, logs) ÷ allocated size of the source; and
   the kernel's count (rusage) of bytes written by the CLI process tree.
3. libguestfs appliance launches per image and their time, from the ``appliance launched`` log lines.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from pipeline.app import fakedisk
from pipeline.core.config import load_config
from pipeline.steps.convert import convert_disk

REPO = Path(__file__).resolve().parent.parent

BENCH = REPO / "var" / "bench"
IMAGE_ID = "bench"


def sh(argv: list[str], **kw: Any) -> float:
    """Run ``argv`` (checked); return its wall time in seconds."""
    t0 = time.monotonic()
    subprocess.run(argv, check=True, **kw)
    return time.monotonic() - t0


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def tree_allocated(*folders: Path) -> dict[str, int]:
    return {str(p): allocated(p) for d in folders if d.exists() for p in sorted(d.rglob("*")) if p.is_file()}


def drop_file(path: Path) -> None:
    """Write back and evict ``path`` from the page cache (best effort), so every run reads it cold-ish
    the same way; fsync also makes the writes of the previous run land before the next timing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_source(random_mib: int, force_tcg: bool) -> Path:
    """``var/bench/bench-<N>m.vmdk``: XP fake disk + random data, monolithicSparse (built once)."""
    BENCH.mkdir(parents=True, exist_ok=True)
    base = fakedisk.build(BENCH / "xp.raw", fakedisk.XP, force_tcg=force_tcg)
    vmdk = BENCH / f"bench-{random_mib}m.vmdk"
    stamp = vmdk.with_name(vmdk.name + ".json")
    want = {"base": asdict(fakedisk.XP), "random_mib": random_mib, "subformat": "monolithicSparse"}
    if vmdk.exists() and stamp.exists() and json.loads(stamp.read_text()) == want:
        return vmdk
    stamp.unlink(missing_ok=True)
    raw = BENCH / ".bench.raw.tmp"
    print(f"making {vmdk} ({random_mib} MiB of random data after the XP partition)", file=sys.stderr)
    shutil.copyfile(base, raw)
    with open(raw, "r+b") as fh:
        fh.seek(base.stat().st_size)
        for _ in range(random_mib // 4):
            fh.write(os.urandom(4 << 20))
    tmp = BENCH / ".bench.vmdk.tmp"
    sh(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicSparse",
        str(raw), str(tmp)])
    raw.unlink()
    os.replace(tmp, vmdk)
    stamp.write_text(json.dumps(want))
    return vmdk


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--random-mib", type=int, default=1024)
    p.add_argument("--format", default="raw", choices=("raw", "qcow2"))
    p.add_argument("--keep", action="store_true", help="keep var/bench/run afterwards")
    p.add_argument("--repeat", type=int, default=3, help="timed samples of bare and of convert_disk()")
    a = p.parse_args(argv)
    force_tcg = os.environ.get("GHO2KVM_FORCE_TCG") == "1"

    src = make_source(a.random_mib, force_tcg)
    run_dir = BENCH / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    work, images = run_dir / "work", run_dir / "images"
    config = run_dir / "config.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "defaults": {"workdir": str(work), "output_dir": str(images), "format": a.format,
                     "libvirt_uri": "test:///default"},
        "images": [{"id": IMAGE_ID, "source": str(src)}],
    }, indent=2))

    bare_out = run_dir / f"bare.{a.format}"
    bare_cmd = ["qemu-img", "convert", "-p", "-f", "vmdk", "-O", a.format, str(src), str(bare_out)]
    samples: dict[str, list[float]] = {"bare": [], "bare+fsync": [], "ours": [], "ours+verify": []}

    def bare() -> None:
        bare_out.unlink(missing_ok=True)
        drop_file(src)
        t0 = time.monotonic()
        sh(bare_cmd, stdout=subprocess.DEVNULL)
        samples["bare"].append(time.monotonic() - t0)
        drop_file(bare_out)  # fsync, as our step does before its rename
        samples["bare+fsync"].append(time.monotonic() - t0)
        bare_out.unlink()

    bare()  # warm-up (qemu-img binary, metadata), not counted
    for v in samples.values():
        v.clear()

    migrate_cmd = [sys.executable, "-m", "pipeline", "migrate", "--config", str(config)]
    drop_file(src)
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    t0 = time.monotonic()
    proc = subprocess.run(migrate_cmd, capture_output=True, text=True, cwd=str(REPO))
    migrate_wall = time.monotonic() - t0
    kernel_written = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - ru0) * 512
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1
    written = tree_allocated(work, images)  # before the direct runs below write more

    def receipt(step: str) -> dict[str, Any]:
        return json.loads((work / IMAGE_ID / f"{step}.json").read_text())

    conv, merge, insp = receipt("convert"), receipt("registry-merge"), receipt("inspect")
    overlay = Path(merge["result"]["overlay"])

    # our convert function alone (the code the step runs), interleaved with bare qemu-img
    base_image = replace(load_config(config).image(IMAGE_ID), output_dir=run_dir / "direct")

    def ours(verify: bool) -> None:
        drop_file(src)
        drop_file(overlay)
        t0 = time.monotonic()
        convert_disk(replace(base_image, verify=verify), overlay, "qcow2")
        samples["ours+verify" if verify else "ours"].append(time.monotonic() - t0)
        shutil.rmtree(run_dir / "direct")

    for _ in range(a.repeat):
        bare()
        ours(False)
        ours(True)
    med = {k: statistics.median(v) for k, v in samples.items()}

    launches = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if ev.get("event") == "appliance launched":
                launches.append((ev.get("task"), float(ev.get("seconds", 0))))

    src_alloc = allocated(src)
    total_written = sum(written.values())
    overlay_alloc = written.get(str(overlay), 0)
    final_alloc = written.get(str(images / f"{IMAGE_ID}.{a.format}"), 0)
    other = total_written - overlay_alloc - final_alloc
    step_s = conv["duration_s"]
    qi_s = conv["result"]["convert_seconds"]
    vf_s = conv["result"].get("verify_seconds", 0.0)

    mib = 2**20
    qv = conv["result"].get("qemu_img_version")
    vsize = insp["result"]["virtual_size"] / 2**30

    def runs(k: str) -> str:
        return "median of " + ", ".join(f"{t:.2f}" for t in samples[k])

    bare_s, synced_s = med["bare"], med["bare+fsync"]
    rows = [  # (measure, figure, how)
        ("source", f"{src_alloc / mib:.0f} MiB allocated",
         f"{src.name}, virtual {vsize:.2f} GiB, qemu-img {qv}"),
        ("bare qemu-img convert", f"{bare_s:.2f} s", runs("bare")),
        ("  + fsync of its output", f"{synced_s:.2f} s", runs("bare+fsync")),
        ("convert_disk() no verify", f"{med['ours']:.2f} s = {med['ours'] / synced_s:.2f}x",
         f"÷ bare+fsync ({med['ours'] / bare_s:.2f}x ÷ bare); {runs('ours')}"),
        ("convert_disk() verify", f"{med['ours+verify']:.2f} s = {med['ours+verify'] / synced_s:.2f}x",
         f"÷ bare+fsync ({med['ours+verify'] / bare_s:.2f}x ÷ bare); {runs('ours+verify')}"),
        ("in the run: convert step", f"{step_s:.2f} s = {step_s / synced_s:.2f}x",
         f"receipt duration_s (verify on): qemu-img convert {qi_s:.2f} s ({qi_s / bare_s:.2f}x bare)"
         f" + compare {vf_s:.2f} s + fsync, receipt"),
        ("bytes written / source", f"{total_written / src_alloc:.3f}",
         f"{total_written / mib:.1f} MiB = final {final_alloc / mib:.1f} + overlay {overlay_alloc / mib:.2f}"
         f" + other {other / mib:.2f} (receipts, xml, logs), allocated"),
        ("  kernel-counted / source", f"{kernel_written / src_alloc:.3f}",
         f"{kernel_written / mib:.1f} MiB: rusage ru_oublock of the CLI and the tools it waited for"
         " (guestfish --listen daemons not included)"),
        ("appliance launches", f"{len(launches)} / {sum(s for _, s in launches):.1f} s",
         ", ".join(f"{t} {s:.1f} s" for t, s in launches)),
        ("whole migration", f"{migrate_wall:.1f} s",
         f"inspect {insp['duration_s']:.1f} s, registry-merge {merge['duration_s']:.1f} s, "
         f"convert {step_s:.1f} s"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'measure':<{w0}}  {'figure':<{w1}}  how")
    for m, f, how in rows:
        print(f"{m:<{w0}}  {f:<{w1}}  {how}")
    print("\ncommands:")
    print("  bare:    " + shlex.join(bare_cmd))
    print("  ours:    GHO2KVM_FORCE_TCG=1 " + shlex.join(migrate_cmd))
    print(f"  direct:  pipeline.steps.convert.convert_disk(image(verify=False|True), {overlay}, 'qcow2')")
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
