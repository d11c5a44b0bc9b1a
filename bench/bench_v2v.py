"""gho2kvm end to end against virt-v2v on the same phony XP disk, in one run (issue 14, goal 4).

    GHO2KVM_FORCE_TCG=1 .venv/bin/python bench/bench_v2v.py [--rounds 3] [--size-mib 256]

Source (built once under ``var/bench/``): the fake XP disk of ``pipeline.app.fakedisk`` at ``--size-mib``
(256 MiB: virt-v2v refuses a guest with < 100 MB free), as a monolithicSparse VMDK. Each round runs,
in alternating order (ABBA…), page cache dropped before each:

* ``python -m pipeline migrate`` into a fresh workdir: raw output, ``verify: true`` (qemu-img compare
  of the final disk), ``libvirt_uri: test:///default`` — inspect, MergeIDE registry merge with its
  read-back, convert, domain XML, define;
* ``virt-v2v -i disk SRC -o local -os DIR -of raw`` (``LIBGUESTFS_BACKEND=direct``,
  ``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``, as gho2kvm's appliance under ``GHO2KVM_FORCE_TCG=1``).

Reported: medians, their ratio (goal ≤ 0.8), and where gho2kvm's time goes (receipt ``duration_s`` per
step, appliance launches and their seconds from the JSON log; virt-v2v's own phase stamps).
Skipped (exit 0, row "skipped") when virt-v2v is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import BENCH, drop_caches, emit, load_note, migrate, quick, row
from pipeline.app import fakedisk
from tests.support.fx_pipeline import json_events as events

REPO = Path(__file__).resolve().parent.parent

GOAL = 0.8
STEPS = ("inspect", "registry-merge", "convert", "xml-render", "define")
V2V_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
_STAMP = re.compile(r"^\[\s*(\d+(?:\.\d+)?)\]\s+(.*)$")


def source(size_mib: int) -> Path:
    spec = replace(fakedisk.XP, size_mib=size_mib, output="monolithicSparse")
    return fakedisk.build(BENCH / f"xp{size_mib}.vmdk", spec, force_tcg=True)


def ours(src: Path, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    work, images = run_dir / "work", run_dir / "images"
    config = BENCH / "v2v-config.yaml"  # kept: the command in the table names it
    config.write_text(json.dumps({
        "defaults": {"workdir": str(work), "output_dir": str(images), "format": "raw", "verify": True,
                     "libvirt_uri": "test:///default"},
        "images": [{"id": "xp", "source": str(src)}],
    }, indent=2))
    drop_caches(src)
    proc, wall, argv = migrate(config)
    if proc.returncode != 0:
        raise SystemExit(f"gho2kvm migrate failed (exit {proc.returncode}):\n"
                         f"{proc.stdout}\n{proc.stderr[-3000:]}")
    ev = events(proc.stderr)
    launches = [float(e.get("seconds", 0)) for e in ev if e.get("event") == "appliance launched"]
    steps = {}
    for s in STEPS:
        r = work / "xp" / f"{s}.json"
        if r.exists():
            steps[s] = json.loads(r.read_text()).get("duration_s", 0.0)
    return {"wall": wall, "launches": launches, "steps": steps, "argv": argv, "config": str(config)}


def v2v(src: Path, run_dir: Path) -> dict[str, Any]:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    argv = ["virt-v2v", "-i", "disk", str(src), "-o", "local", "-os", str(run_dir), "-of", "raw"]
    drop_caches(src)
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, **V2V_ENV))
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"virt-v2v failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    phases = []
    for line in proc.stdout.splitlines():
        m = _STAMP.match(line.strip())
        if m:
            phases.append((float(m.group(1)), m.group(2)))
    return {"wall": wall, "phases": phases, "argv": argv}


def walls(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{r['wall']:.1f}" for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=1 if quick() else 3)
    p.add_argument("--size-mib", type=int, default=256)
    a = p.parse_args(argv)
    if shutil.which("virt-v2v") is None:
        print("virt-v2v not installed (apt-get install virt-v2v nbdkit libnbd-bin): skipped")
        emit("v2v", [row("gho2kvm ÷ virt-v2v", "skipped (no virt-v2v)", f"≤ {GOAL}")])
        return 0
    src = source(a.size_mib)
    run_dir = BENCH / "v2v-run"
    t_all = time.monotonic()
    mine: list[dict[str, Any]] = []
    theirs: list[dict[str, Any]] = []
    for i in range(a.rounds):
        order = ("ours", "v2v") if i % 2 == 0 else ("v2v", "ours")
        for who in order:
            if who == "ours":
                mine.append(ours(src, run_dir / "ours"))
                r = mine[-1]
                print(f"round {i + 1} gho2kvm: {r['wall']:.1f} s, launches "
                      f"{', '.join(f'{s:.1f}' for s in r['launches'])} s, steps {r['steps']}", flush=True)
            else:
                theirs.append(v2v(src, run_dir / "v2v"))
                print(f"round {i + 1} virt-v2v: {theirs[-1]['wall']:.1f} s", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)

    m_ours = statistics.median(r["wall"] for r in mine)
    m_v2v = statistics.median(r["wall"] for r in theirs)
    ratio = m_ours / m_v2v
    n_launch = statistics.median(len(r["launches"]) for r in mine)
    launch_s = statistics.median(sum(r["launches"]) for r in mine)
    step_med = {s: statistics.median(r["steps"].get(s, 0.0) for r in mine) for s in STEPS}
    outside = statistics.median(r["wall"] - sum(r["steps"].values()) for r in mine)
    guest = statistics.median(r["steps"].get("inspect", 0) + r["steps"].get("registry-merge", 0)
                              - sum(r["launches"]) for r in mine)
    v2v_version = subprocess.run(["virt-v2v", "--version"], capture_output=True, text=True).stdout.strip()
    last = theirs[len(theirs) // 2]["phases"]
    phase_txt = "; ".join(f"{t:.0f} s {what}" for t, what in last[:8])
    ours_cmd = "GHO2KVM_FORCE_TCG=1 " + shlex.join([Path(mine[0]["argv"][0]).name, *mine[0]["argv"][1:]])
    v2v_cmd = " ".join(f"{k}={v}" for k, v in V2V_ENV.items()) + " " + shlex.join(theirs[0]["argv"])
    rows = [
        row(f"gho2kvm migrate, {a.size_mib} MiB XP VMDK (verify on, test:///default)",
            f"{m_ours:.1f} s (median of {len(mine)}: {walls(mine)})",
            command=ours_cmd),
        row("  its appliance launches", f"{n_launch:g} per image, {launch_s:.1f} s", "≤ 1",
            n_launch <= 1, "JSON log 'appliance launched' lines"),
        row("  its steps (receipt duration_s, medians)",
            ", ".join(f"{s} {v:.1f}" for s, v in step_med.items()) + " s", command="var/.../<step>.json"),
        row("  appliance steps minus launches (guestfish work)", f"{guest:.1f} s",
            command="inspect + registry-merge duration_s − launch seconds"),
        row("  outside any step (python + luigi start-up, scheduling, summary)", f"{outside:.1f} s",
            command="wall − Σ step duration_s (one worker)"),
        row(f"virt-v2v {v2v_version.split()[-1] if v2v_version else ''} -i disk -o local -of raw",
            f"{m_v2v:.1f} s (median of {len(theirs)}: {walls(theirs)})",
            command=v2v_cmd),
        row("  virt-v2v phases (median round)", phase_txt or "n/a"),
        row("gho2kvm ÷ virt-v2v", f"{ratio:.2f}×", f"≤ {GOAL}", ratio <= GOAL, "ratio of the medians above"),
    ]
    print()
    for r in rows:
        print(f"{r['measure']:<58} {r['figure']}" + (f"   goal {r['goal']}" if r["goal"] else ""))
    print(f"\n({load_note()}; {time.monotonic() - t_all:.0f} s)")
    print("commands:\n  " + ours_cmd + "\n  " + v2v_cmd)
    emit("v2v", rows, ours=mine, v2v=theirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
