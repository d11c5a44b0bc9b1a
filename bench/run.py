"""``make bench``: run every benchmark script in this folder and print one table of all figures.

Each script measures gho2kvm against the bare tool or peer in the same run, prints its own table and
leaves its rows in ``var/bench/results.d/<name>.json`` (see ``bench/common.py``); this runner then
prints one table (figure, goal, met, the command that produced it) and writes it to
``var/bench/results.json`` and ``var/bench/results.md``.

``python -m bench.run NAME…`` runs only the named ones (``gho``, ``convert``, ``gho_once``, ``v2v``,
``many``, ``noop``, ``scan``). ``BENCH_QUICK=1`` runs fewer rounds and images (checks that the
benches work; the figures are then not the ones to quote). ``BENCH_IMAGES`` / ``BENCH_WORKERS`` set
bench_many's image and worker count.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "var" / "bench"
ORDER = ("gho", "convert", "gho_once", "big", "fixed", "v2v", "many", "noop", "scan")


def table(rows: list[dict]) -> list[str]:
    head = ("bench", "measure", "figure", "goal", "met", "command")
    cells = [[r["bench"], r["measure"], r["figure"], r["goal"],
              {True: "yes", False: "**no**", None: ""}[r["met"]], f"`{r['command']}`" if r["command"] else ""]
             for r in rows]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in cs) + " |" for cs in cells]
    return lines


def main(argv: list[str]) -> int:
    names = argv or [n for n in ORDER if (HERE / f"bench_{n}.py").exists()]
    results = OUT / "results.d"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    env = dict(os.environ, BENCH_RESULTS=str(results))
    failed, took = [], {}
    t_all = time.monotonic()
    for name in names:
        script = HERE / f"bench_{name}.py"
        print(f"\n=== bench {name} ({script.name}) ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{script.stem}"], cwd=HERE.parent, env=env)
        took[name] = round(time.monotonic() - t0)
        print(f"=== bench {name}: exit {rc}, {took[name]} s ===", flush=True)
        if rc != 0:
            failed.append(name)
    total = round(time.monotonic() - t_all)
    rows = []
    docs = {}
    for name in names:
        f = results / f"{name}.json"
        if f.exists():
            doc = json.loads(f.read_text())
            docs[name] = {k: v for k, v in doc.items() if k != "rows"}
            rows += [dict(r, bench=name) for r in doc["rows"]]
        else:
            rows.append({"bench": name, "measure": "(no results)", "goal": "", "met": None,
                         "figure": "failed" if name in failed else "", "command": f"bench/bench_{name}.py"})
    la = os.getloadavg()
    note = (f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load at the end "
            f"{la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f}; total {total} s ("
            + ", ".join(f"{n} {s} s" for n, s in took.items()) + ")"
            + ("; BENCH_QUICK=1" if os.environ.get("BENCH_QUICK", "") not in ("", "0") else ""))
    md = ["# gho2kvm benchmarks (`make bench`)", "", note, "", *table(rows), ""]
    (OUT / "results.md").write_text("\n".join(md))
    doc = {"note": note, "seconds": took, "rows": rows, "details": docs}
    (OUT / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    print("\n=== all benchmarks ===")
    w = [max(len(str(r[k])) for r in rows) for k in ("bench", "measure", "figure", "goal")]
    for r in rows:
        met = {True: "met", False: "MISSED", None: ""}[r["met"]]
        print(f"{r['bench']:<{w[0]}}  {r['measure']:<{w[1]}}  {r['figure']:<{w[2]}}  "
              f"{r['goal']:<{w[3]}}  {met}")
    print(f"\n{note}\nwritten: {OUT / 'results.md'}, {OUT / 'results.json'}")
    print("commands: see the 'command' column in results.md")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
