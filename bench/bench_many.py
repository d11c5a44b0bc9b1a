"""Many images at once: throughput of one ``gho2kvm migrate`` over N phony XP images (issue 14, goal 5).

    GHO2KVM_FORCE_TCG=1 .venv/bin/python bench/bench_many.py [--images 20] [--workers 2]

(``BENCH_IMAGES`` / ``BENCH_WORKERS`` set the defaults; ``BENCH_QUICK=1`` makes it 3 images.) Every image is
its own id over the same fake XP disk (``pipeline.app.fakedisk``, 64 MiB raw, read-only: each image gets
its own overlay, final disk and domain), raw output, ``verify: true``, ``test:///default``; one fresh
workdir, page cache dropped first. Reported: wall time, images per hour, and how the worker time
(``workers × wall``) splits, from the run's JSON log: the ``appliance launched`` lines (launch seconds),
the canonical ``step done`` line of every task (``duration_s``): appliance work after launch
(inspect + registry-merge minus launches), copy (convert: qemu-img convert + compare + fsync), other
steps, and the rest — worker slots with no step running: Luigi scheduling, waiting for a resource or a
dependency, and the tail when one worker has nothing left.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from collections import defaultdict
from pathlib import Path

from bench.common import BENCH, drop_caches, emit, load_note, migrate, quick, row
from pipeline.app import fakedisk
from tests.support.fx_pipeline import json_events as events

REPO = Path(__file__).resolve().parent.parent

APPLIANCE_STEPS = ("inspect", "registry-merge")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    n = int(os.environ.get("BENCH_IMAGES") or (3 if quick() else 20))
    p.add_argument("--images", type=int, default=n)
    p.add_argument("--workers", type=int, default=int(os.environ.get("BENCH_WORKERS") or 2))
    a = p.parse_args(argv)

    src = fakedisk.build(BENCH / "xp.raw", fakedisk.XP, force_tcg=True)
    run_dir = BENCH / "many-run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    config = BENCH / f"many-{a.images}-config.yaml"  # kept: the command in the table names it
    config.write_text(json.dumps({
        "defaults": {"workdir": str(run_dir / "work"), "output_dir": str(run_dir / "images"), "format": "raw",
                     "verify": True, "libvirt_uri": "test:///default"},
        "images": [{"id": f"xp-{i:02d}", "source": str(src)} for i in range(1, a.images + 1)],
    }, indent=2))
    drop_caches(src)
    proc, wall, cmd = migrate(config, "--workers", str(a.workers))
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr[-4000:], sep="\n", file=sys.stderr)
        return 1
    ev = events(proc.stderr)
    launches = [float(e.get("seconds", 0)) for e in ev if e.get("event") == "appliance launched"]
    per_step: dict[str, float] = defaultdict(float)
    done = 0
    for e in ev:
        if e.get("event") == "step done":
            per_step[str(e.get("task"))] += float(e.get("duration_s", 0))
            done += e.get("task") == "define"
    shutil.rmtree(run_dir, ignore_errors=True)

    slots = a.workers * wall
    launch_s = sum(launches)
    appl_s = sum(per_step.get(s, 0.0) for s in APPLIANCE_STEPS)
    copy_s = per_step.get("convert", 0.0)
    other_s = sum(v for k, v in per_step.items() if k not in APPLIANCE_STEPS and k != "convert")
    busy = appl_s + copy_s + other_s
    idle = max(0.0, slots - busy)

    def share(x: float) -> str:
        return f"{100 * x / slots:.0f} %"

    per_hour = a.images / wall * 3600
    command = "GHO2KVM_FORCE_TCG=1 " + shlex.join([Path(cmd[0]).name, *cmd[1:]])
    rows = [
        row(f"{a.images} XP images, --workers {a.workers}: wall", f"{wall:.0f} s ({done} defined)",
            command=command),
        row("  images per hour", f"{per_hour:.0f}", command=command),
        row("  appliance launches", f"{len(launches)} ({len(launches) / max(a.images, 1):.1f} per image), "
            f"{launch_s:.0f} s = {share(launch_s)} of worker time", "≤ 1 per image",
            len(launches) <= a.images),
        row("  appliance work after launch (inspect + merge)", f"{appl_s - launch_s:.0f} s = "
            f"{share(appl_s - launch_s)}"),
        row("  copy (convert step: qemu-img convert + compare + fsync)", f"{copy_s:.0f} s = {share(copy_s)}"),
        row("  other steps (xml-render, define, …)", f"{other_s:.0f} s = {share(other_s)}"),
        row("  no step running (scheduling, waiting for resources, tail)", f"{idle:.0f} s = {share(idle)}"),
    ]
    print(f"worker time {slots:.0f} s = {a.workers} workers × {wall:.0f} s; per step: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(per_step.items())))
    for r in rows:
        print(f"{r['measure']:<60} {r['figure']}" + (f"   goal {r['goal']}" if r["goal"] else ""))
    print(f"({load_note()})\ncommand: {command}")
    emit("many", rows, per_step=per_step, launches=launches, wall=wall, images=a.images, workers=a.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
