"""Benchmark of the registry-merge + convert steps on a >= 1 GiB VMDK full of random data.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.bench_convert [--random-mib 1024] [--format raw]
        [--repeat 5] [--no-migration]

Made once under ``var/bench/`` (reused while its stamp matches): the fake XP disk with
``--random-mib`` MiB of random data written after its partition (unpartitioned space, so it still
inspects as Windows and registry-merge runs), converted to a monolithicSparse VMDK. Then, in ONE
run (``var/bench/run/``, wiped first):

1. time: the full migration through the CLI (its convert receipt gives one in-pipeline figure:
   ``duration_s`` of the whole step with verify, and ``convert_seconds`` of its qemu-img run), then
   ``--repeat`` rounds (default 5, 2 with ``BENCH_QUICK=1``), each in a rotated order, of: bare
   ``qemu-img convert`` of the VMDK to the same format, the same on the run's overlay, and our
   ``pipeline.steps.convert.convert_disk`` (the function the step runs, given what the task gives it:
   the overlay and the disk under it — it copies the disk, then commits the overlay into the copy) with
   verify off and on. Page cache dropped before each (``drop_caches`` as root). Ratios use medians and
   divide by bare + fsync of the output, since our step fsyncs before its atomic rename; convert_disk's
   own time is split into qemu-img (convert + commit), fsync + rename (``sync_seconds``) and the rest
   (our code).
   ``--no-migration`` (the default with ``BENCH_QUICK=1``) skips the migration and rows 2-3 and makes
   the overlay with ``qemu-img create`` + 4 MiB of ``qemu-io`` writes in 16 places (hive-sized edits).
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

from bench.common import drop_caches, emit, fsync_file, load_note, quick, row
from pipeline.app import fakedisk
from pipeline.core.choices import DiskFormat, values
from pipeline.core.config import load_config
from pipeline.core.settings import resolve
from pipeline.steps.convert import ConvertInput, convert_disk

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


def drop_file(*paths: Path) -> str:
    """Write back everything and empty the page cache (``drop_caches`` as root; else fsync + fadvise of
    ``paths``), so every sample reads cold the same way and finds no dirty pages of the one before."""
    return drop_caches(*paths)


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
    p.add_argument("--format", default="raw", choices=values(DiskFormat))
    p.add_argument("--keep", action="store_true", help="keep var/bench/run afterwards")
    p.add_argument("--no-migration", dest="migrate", action="store_false", default=not quick(),
                   help="only the convert samples, on an overlay made by qemu-img create + qemu-io "
                   "(the default with BENCH_QUICK=1)")
    p.add_argument("--repeat", type=int, default=2 if quick() else 5,
                   help="interleaved rounds of bare / bare on the overlay / convert_disk() / with verify")
    a = p.parse_args(argv)
    force_tcg = resolve().force_tcg  # GHO2KVM_FORCE_TCG, read the pipeline's way

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
    samples: dict[str, list[float]] = {k: [] for k in (
        "bare", "bare+fsync", "overlay", "overlay+fsync", "ours", "ours+verify")}
    parts: dict[str, list[float]] = {"qemu-img": [], "fsync+rename": [], "rest": []}

    def bare(argv: list[str], key: str) -> None:
        bare_out.unlink(missing_ok=True)
        drop_file(Path(argv[-2]))
        t0 = time.monotonic()
        sh(argv, stdout=subprocess.DEVNULL)
        samples[key].append(time.monotonic() - t0)
        fsync_file(bare_out)  # as our step does before its rename
        samples[key + "+fsync"].append(time.monotonic() - t0)
        bare_out.unlink()

    cache_mode = drop_file(src)
    bare(bare_cmd, "bare")  # warm-up (qemu-img binary, metadata), not counted
    for v in samples.values():
        v.clear()

    migrate_cmd = [sys.executable, "-m", "pipeline", "migrate", "--config", str(config)]
    if not a.migrate:
        return direct_only(a, src, run_dir, config, samples, parts, bare, bare_cmd)
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

    med, pmed, overlay_cmd = sample(a, src, overlay, run_dir, base_image, samples, parts, bare, bare_cmd)

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
    vf_s = conv["result"].get("verify_seconds") or 0.0

    mib = 2**20
    qv = conv["result"].get("qemu_img_version")
    vsize = insp["result"]["virtual_size"] / 2**30

    def runs(k: str) -> str:
        return "median of " + ", ".join(f"{t:.2f}" for t in samples[k])

    bare_s, synced_s = med["bare"], med["bare+fsync"]
    ov_synced = med["overlay+fsync"]
    ratio, ratio_ov = med["ours"] / synced_s, med["ours"] / ov_synced
    rows = [  # (measure, figure, how)
        ("source", f"{src_alloc / mib:.0f} MiB allocated",
         f"{src.name}, virtual {vsize:.2f} GiB, qemu-img {qv}; cache: {cache_mode}, {a.repeat} rounds"),
        ("bare qemu-img convert", f"{bare_s:.2f} s", runs("bare")),
        ("  + fsync of its output", f"{synced_s:.2f} s", runs("bare+fsync")),
        ("bare on our overlay + fsync", f"{ov_synced:.2f} s = {ov_synced / synced_s:.2f}x",
         f"same input as our step (qcow2 overlay over the VMDK); {runs('overlay+fsync')}"),
        ("convert_disk() no verify", f"{med['ours']:.2f} s = {ratio:.2f}x",
         f"÷ bare+fsync ({ratio_ov:.2f}x ÷ bare on the overlay + fsync); {runs('ours')}"),
        ("  of which", f"qemu-img {pmed['qemu-img']:.2f} s",
         f"fsync+rename {pmed['fsync+rename']:.2f} s, rest (mkdir, temps, version, log) {pmed['rest']:.3f} s"
         " (medians)"),
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
    direct = f"pipeline.steps.convert.convert_disk(image, {overlay.name}, 'qcow2')"
    out_rows = [
        *convert_rows(a, med, pmed, ratio, ratio_ov, bare_cmd, overlay_cmd, direct),
        row("bytes written by the migration ÷ source", f"{total_written / src_alloc:.3f}", "≤ 1.05",
            total_written / src_alloc <= 1.05, "allocated size of every file left by the migration"),
        row("appliance launches, 1 GiB XP VMDK", f"{len(launches)} ({sum(s for _, s in launches):.0f} s)",
            "≤ 1", len(launches) <= 1, "JSON log"),
    ]
    emit("convert", out_rows, samples=samples, parts=parts)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'measure':<{w0}}  {'figure':<{w1}}  how")
    for m, f, how in rows:
        print(f"{m:<{w0}}  {f:<{w1}}  {how}")
    print(f"({load_note()})")
    print("\ncommands:")
    print("  bare:    " + shlex.join(bare_cmd) + "   (and on the overlay: " + shlex.join(overlay_cmd) + ")")
    print("  ours:    GHO2KVM_FORCE_TCG=1 " + shlex.join(migrate_cmd))
    print(f"  direct:  pipeline.steps.convert.convert_disk(image(verify=False|True), {overlay}, 'qcow2')")
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def sample(a: argparse.Namespace, src: Path, overlay: Path, run_dir: Path, base_image: Any,
           samples: dict[str, list[float]], parts: dict[str, list[float]], bare: Any,
           bare_cmd: list[str]) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """``--repeat`` rotated rounds of: bare on the VMDK, bare on the overlay, convert_disk(), with verify."""
    bare_out = Path(bare_cmd[-1])
    overlay_cmd = ["qemu-img", "convert", "-p", "-f", "qcow2", "-O", a.format, str(overlay), str(bare_out)]

    def ours(verify: bool) -> None:
        drop_file(src, overlay)
        t0 = time.monotonic()
        # as the convert task builds it: the overlay and the disk under it
        r = convert_disk(ConvertInput(image_id=IMAGE_ID, final_disk=base_image.final_disk,
                                      format=base_image.format, verify=verify, src=overlay,
                                      src_format="qcow2", base=src, base_format="vmdk"))
        took = time.monotonic() - t0
        samples["ours+verify" if verify else "ours"].append(took)
        if not verify:
            conv = (r.convert_seconds or 0.0) + (r.commit_seconds or 0.0)
            sync = r.sync_seconds or 0.0
            parts["qemu-img"].append(conv)
            parts["fsync+rename"].append(sync)
            parts["rest"].append(took - conv - sync)
        shutil.rmtree(run_dir / "direct")

    # interleaved: each round runs the four in a rotated order (no variant always first after a drop)
    variants = [lambda: bare(bare_cmd, "bare"), lambda: bare(overlay_cmd, "overlay"),
                lambda: ours(False), lambda: ours(True)]
    for i in range(a.repeat):
        for k in range(len(variants)):
            variants[(i + k) % len(variants)]()
    med = {k: statistics.median(v) for k, v in samples.items()}
    pmed = {k: statistics.median(v) for k, v in parts.items()}

    return med, pmed, overlay_cmd


def direct_only(a: argparse.Namespace, src: Path, run_dir: Path, config: Path,
                samples: dict[str, list[float]], parts: dict[str, list[float]], bare: Any,
                bare_cmd: list[str]) -> int:
    """The convert samples alone (no migration): the overlay is ``qemu-img create`` over the VMDK + edits."""
    from pipeline.tools import qemu_img

    overlay = run_dir / "overlay.qcow2"
    qemu_img.create_overlay(overlay, src, "vmdk", image_id=IMAGE_ID, step="bench")
    # edits like registry-merge's (hives are a few MiB, scattered): 4 MiB in 16 places
    for k in range(16):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a {k * 61 + 3}M 256k", str(overlay)],
                       check=True, capture_output=True)
    base_image = replace(load_config(config).image(IMAGE_ID), output_dir=run_dir / "direct")
    med, pmed, overlay_cmd = sample(a, src, overlay, run_dir, base_image, samples, parts, bare, bare_cmd)
    synced_s, ov_synced = med["bare+fsync"], med["overlay+fsync"]
    ratio, ratio_ov = med["ours"] / synced_s, med["ours"] / ov_synced
    direct = f"pipeline.steps.convert.convert_disk(image, {overlay.name}, 'qcow2')"
    rows = convert_rows(a, med, pmed, ratio, ratio_ov, bare_cmd, overlay_cmd, direct)
    for r in rows:
        print(f"{r['measure']:<52} {r['figure']}")
    print(f"({load_note()}; no migration run: --no-migration / BENCH_QUICK)")
    emit("convert", rows, samples=samples, parts=parts)
    if not a.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return 0


def convert_rows(a: argparse.Namespace, med: dict[str, float], pmed: dict[str, float], ratio: float,
                 ratio_ov: float, bare_cmd: list[str], overlay_cmd: list[str],
                 direct: str) -> list[dict[str, Any]]:
    synced_s, ov_synced = med["bare+fsync"], med["overlay+fsync"]
    return [
        row("convert_disk() ÷ bare qemu-img convert + fsync", f"{ratio:.2f}×  ({med['ours']:.2f} s ÷ "
            f"{synced_s:.2f} s, median of {a.repeat}, {a.random_mib} MiB random VMDK → {a.format})", "≤ 1.05",
            ratio <= 1.05, f"{shlex.join(bare_cmd)}; sync  vs  {direct}"),
        row("convert_disk() ÷ bare on the same overlay + fsync", f"{ratio_ov:.2f}×  ({ov_synced:.2f} s bare)",
            "≤ 1.05", ratio_ov <= 1.05, shlex.join(overlay_cmd) + "; sync"),
        row("  convert_disk() parts (medians)", f"qemu-img {pmed['qemu-img']:.2f} s + fsync/rename "
            f"{pmed['fsync+rename']:.2f} s + ours {pmed['rest']:.3f} s", command="receipt timings"),
        row("convert_disk() with verify ÷ bare + fsync", f"{med['ours+verify'] / synced_s:.2f}×",
            command=direct),
    ]


if __name__ == "__main__":
    sys.exit(main())
