"""Benchmark: a full ``gho2kvm migrate`` re-run with nothing to do, over 20 migrated images.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python -m bench.bench_noop [--images 20] [--runs 3] [--goal 2.0]

Set-up (once; kept under ``var/bench/noop/`` and reused while ``gho2kvm plan`` says it is up to date):
one small non-Windows raw disk (32 MiB, built by ``pipeline.app.fakedisk``) is the source of all 20
images, each with its own id and image folder. Non-Windows because then the only appliance launch
per image is inspect's (registry-merge records a skip), ≈ 30-45 s each under TCG; the set-up
migration runs with ``--workers 2``. A Windows disk would add registry-merge's launch to each image
and change nothing in what is measured: the no-op re-run reads receipts and ``stat``s, whatever the
guest.

Measured, ``--runs`` times (best reported): wall time of ``python -m pipeline migrate`` minus the
interpreter's own start-up (``python -c pass``), against the goal (≤ 2 s); the run's own
"migration finished" seconds (scheduling + completeness checks + summary). Asserted every run: exit
0, no "step started" and no "appliance launched" log line, and no call at all of qemu-img, guestfish,
hivexregedit, virsh or qemu-system-* (a PATH shim that records every call, then runs the real tool).
Exit 1 if an assertion fails or the best time misses the goal.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml

from pipeline.app import fakedisk
from tests.support.fx_pipeline import json_events as events
from tests.support.fx_pipeline import path_shim

REPO = Path(__file__).resolve().parent.parent

BENCH = REPO / "var" / "bench" / "noop"
TOOLS = ("qemu-img", "guestfish", "hivexregedit", "virsh", "qemu-system-x86_64", "qemu-system-i386")
SPEC = fakedisk.DiskSpec(windows=False, hostname="", size_mib=32)


def write_config(n: int, source: Path) -> Path:
    doc = {
        "defaults": {"workdir": str(BENCH / "work"), "output_dir": str(BENCH / "images"), "format": "raw",
                     "libvirt_uri": "test:///default", "memory_mib": 256},
        "images": [{"id": f"noop-{i:02d}", "source": str(source)} for i in range(1, n + 1)],
    }
    path = BENCH / "config.yaml"
    text = yaml.safe_dump(doc, sort_keys=False)
    if not path.exists() or path.read_text() != text:  # unchanged config → unchanged mtime
        path.write_text(text)
    return path




def cli(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], float]:
    full = dict(os.environ, GHO2KVM_FORCE_TCG="1", **(env or {}))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=full,
                          cwd=str(REPO))
    return proc, time.perf_counter() - t0


def interpreter_startup() -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    quick = os.environ.get("BENCH_QUICK", "") not in ("", "0")
    ap.add_argument("--images", type=int, default=5 if quick else 20)
    ap.add_argument("--runs", type=int, default=1 if quick else 3)
    ap.add_argument("--goal", type=float, default=2.0, help="seconds after interpreter start-up")
    args = ap.parse_args()

    BENCH.mkdir(parents=True, exist_ok=True)
    source = fakedisk.build(BENCH / "src" / "nonwindows.raw", SPEC, force_tcg=True)
    config = write_config(args.images, source)
    migrate = ["migrate", "--config", str(config)]
    plan, _ = cli("plan", "--config", str(config))
    todo = plan.stdout.strip().splitlines()[-1] if plan.stdout.strip() else plan.stderr
    print(f"set-up: {args.images} images of {source} ({source.stat().st_size >> 20} MiB, not Windows); "
          f"plan: {todo}")
    if not todo.startswith("0 step(s)"):
        setup, secs = cli(*migrate, "--workers", "2")
        launched = sum(1 for e in events(setup.stderr) if e.get("event") == "appliance launched")
        print(f"set-up migration: exit {setup.returncode}, {secs:.0f} s, {launched} appliance launch(es)")
        if setup.returncode != 0:
            print(setup.stdout + setup.stderr[-3000:], file=sys.stderr)
            return 1

    startup = interpreter_startup()
    calls = BENCH / "tool-calls.log"
    path_env = path_shim(BENCH / "shim", calls, TOOLS)
    failures: list[str] = []
    walls, inside = [], []
    for i in range(args.runs):
        calls.unlink(missing_ok=True)
        proc, wall = cli(*migrate, env=path_env)
        ev = events(proc.stderr)
        steps = [e for e in ev if e.get("event") == "step started"]
        launches = [e for e in ev if e.get("event") == "appliance launched"]
        finished = next((e for e in ev if e.get("event") == "migration finished"), {})
        tool_calls = calls.read_text().splitlines() if calls.exists() else []
        converts = [c for c in tool_calls if c.startswith("qemu-img convert")]
        walls.append(wall)
        inside.append(float(finished.get("seconds", "nan")))
        print(f"run {i + 1}: exit {proc.returncode}, wall {wall:.2f} s, in-run {inside[-1]:.2f} s, "
              f"steps run {len(steps)}, appliance launches {len(launches)}, "
              f"qemu-img convert {len(converts)}, tool calls {len(tool_calls)}")
        if proc.returncode != 0:
            failures.append(f"run {i + 1} exit {proc.returncode}: {proc.stdout[-500:]}")
        if steps or launches or converts or tool_calls:
            failures.append(f"run {i + 1} did work: {len(steps)} steps, {len(launches)} launches, "
                            f"tool calls {tool_calls[:5]}")

    best = min(walls)
    after = best - startup
    print()
    print(f"images                       {args.images}")
    print(f"interpreter start-up         {startup:.3f} s   ({sys.executable} -c pass, best of 5)")
    print(f"no-op migrate, wall          {best:.3f} s   (best of {args.runs}; all: "
          f"{', '.join(f'{w:.2f}' for w in walls)})")
    print(f"  after interpreter start-up {after:.3f} s   goal ≤ {args.goal:.1f} s: "
          f"{'met' if after <= args.goal else 'MISSED'}")
    print(f"  in-run (luigi.build+summary) {min(inside):.3f} s")
    print("appliance launches 0, qemu-img convert runs 0, tool calls 0" if not failures else "")
    print()
    print("commands:")
    py = [sys.executable, "-m", "pipeline"]
    print(f"  GHO2KVM_FORCE_TCG=1 {shlex.join([*py, 'plan', '--config', str(config)])}")
    print(f"  GHO2KVM_FORCE_TCG=1 PATH={BENCH / 'shim'}:$PATH "
          f"{shlex.join([*py, *migrate])}")
    from bench.common import emit, row

    cmd = f"GHO2KVM_FORCE_TCG=1 {shlex.join([Path(py[0]).name, *py[1:], *migrate])}"
    emit("noop", [
        row(f"no-op migrate of {args.images} migrated images, after interpreter start-up",
            f"{after:.2f} s (best of {args.runs}; start-up {startup:.2f} s)", f"≤ {args.goal:g} s",
            after <= args.goal, cmd),
        row("  steps run / appliance launches / tool calls", "0 / 0 / 0" if not failures else "FAILED",
            "0", not failures, "PATH shim recording every tool call"),
    ])
    for f in failures:
        print(f"FAIL: {f}", file=sys.stderr)
    if after > args.goal:
        print(f"FAIL: {after:.2f} s after start-up, goal {args.goal:.1f} s", file=sys.stderr)
    return 1 if failures or after > args.goal else 0


if __name__ == "__main__":
    sys.exit(main())
