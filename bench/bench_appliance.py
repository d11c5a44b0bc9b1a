"""Benchmark: appliance launches and wall time of one Windows image's migration.

    GHO2KVM_FORCE_TCG=1 .venv/bin/python bench/bench_appliance.py [--rounds 2] [--tree DIR ...]

Each round migrates a fresh copy of the cached phony XP disk (monolithicSparse VMDK, 64 MiB,
``registry: [mergeide]``, ``format: raw``, ``libvirt_uri: test:///default``) through the real CLI
(``python -m pipeline migrate``) and counts the "appliance launched" log lines (issue #14 goal 1:
≤ 1 per image). With several ``--tree`` folders (each a gho2kvm source tree, e.g. an export of
another commit) the rounds interleave the trees on the same machine, so a before/after comparison
shares the machine's load. Reported per tree: median wall time, launches per image, and the inspect
and registry-merge step seconds from the receipts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "var" / "testdisks" / "vmdk-monolithicSparse" / "xp.vmdk"


def one_run(tree: Path, root: Path) -> dict[str, float | int]:
    src = root / "src"
    src.mkdir(parents=True)
    shutil.copyfile(SOURCE, src / "xp.vmdk")
    doc = {"defaults": {"workdir": str(root / "work"), "output_dir": str(root / "images"), "format": "raw",
                        "libvirt_uri": "test:///default", "memory_mib": 256},
           "images": [{"id": "xp", "source": str(src / "xp.vmdk"), "registry": ["mergeide"]}]}
    cfg = root / "config.yaml"
    cfg.write_text(yaml.safe_dump(doc, sort_keys=False))
    env = dict(os.environ, GHO2KVM_FORCE_TCG="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "migrate", "--config", str(cfg)],
                          capture_output=True, text=True, env=env, cwd=str(tree))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: migrate exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}")
    launches = sum(1 for ln in proc.stderr.splitlines()
                   if ln.startswith("{") and '"appliance launched"' in ln)
    steps = {s: json.loads((root / "work" / "xp" / f"{s}.json").read_text())["duration_s"]
             for s in ("inspect", "registry-merge", "convert")}
    return {"wall": wall, "launches": launches, **steps}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tree", action="append", type=Path, help="gho2kvm source tree (default: this one)")
    args = ap.parse_args()
    trees = [t.resolve() for t in (args.tree or [REPO])]
    results: dict[Path, list[dict[str, float | int]]] = {t: [] for t in trees}
    for r in range(args.rounds):
        for tree in trees:
            root = Path(tempfile.mkdtemp(prefix="gho2kvm-bench-appliance-"))
            try:
                res = one_run(tree, root)
            finally:
                shutil.rmtree(root, ignore_errors=True)
            results[tree].append(res)
            print(f"round {r + 1} {tree}: wall {res['wall']:.1f} s, launches {res['launches']}, inspect "
                  f"{res['inspect']:.1f} s, registry-merge {res['registry-merge']:.1f} s, convert "
                  f"{res['convert']:.1f} s", flush=True)
    print()
    for tree, rows in results.items():
        med = {k: statistics.median(float(x[k]) for x in rows) for k in rows[0]}
        print(f"{tree}: median of {len(rows)}: wall {med['wall']:.1f} s, appliance launches per image "
              f"{med['launches']:.0f} (goal ≤ 1), inspect {med['inspect']:.1f} s, registry-merge "
              f"{med['registry-merge']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
