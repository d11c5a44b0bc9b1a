"""``make bench``: run every benchmark script in this folder, one after the other.

Each script measures gho2kvm against the bare tool in the same run and prints its own table.
``python -m bench.run NAME…`` runs only the named ones (e.g. ``gho``, ``convert``, ``noop``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ORDER = ("gho", "convert", "noop")


def main(argv: list[str]) -> int:
    names = argv or [n for n in ORDER if (HERE / f"bench_{n}.py").exists()]
    failed = []
    for name in names:
        script = HERE / f"bench_{name}.py"
        print(f"\n=== bench {name} ({script.name}) ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, "-m", f"bench.{script.stem}"], cwd=HERE.parent)
        print(f"=== bench {name}: exit {rc}, {time.monotonic() - t0:.0f} s ===", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
