"""Shared bits of the bench scripts: the results file ``bench/run.py`` collects, cache dropping, the
JSON log of a ``gho2kvm migrate`` child, the quick mode.

Every script prints its own table and, when ``BENCH_RESULTS`` names a folder (``bench/run.py`` sets it),
also writes ``<folder>/<bench>.json``: a list of rows ``{measure, figure, goal, met, command}`` (``met``
is true/false when the row has a goal, else null), so that ``make bench`` prints one table of all.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "var" / "bench"


def quick() -> bool:
    """``BENCH_QUICK=1``: fewer rounds and images (a check that the benches work, not figures)."""
    return os.environ.get("BENCH_QUICK", "") not in ("", "0")


def row(measure: str, figure: str, goal: str = "", met: bool | None = None,
        command: str = "") -> dict[str, Any]:
    return {"measure": measure, "figure": figure, "goal": goal, "met": met, "command": command}


def emit(bench: str, rows: list[dict[str, Any]], **extra: Any) -> None:
    """Write the rows for ``bench/run.py`` (no-op unless ``BENCH_RESULTS`` is set)."""
    folder = os.environ.get("BENCH_RESULTS")
    if not folder:
        return
    Path(folder).mkdir(parents=True, exist_ok=True)
    doc = {"bench": bench, "rows": rows, "load": os.getloadavg(), "finished": time.time(), **extra}
    (Path(folder) / f"{bench}.json").write_text(json.dumps(doc, indent=2) + "\n")


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches(*files: Path) -> str:
    """Write back dirty pages and empty the page cache: the whole cache when root (``echo 3 >
    /proc/sys/vm/drop_caches``), else only ``files`` (fsync + POSIX_FADV_DONTNEED). Returns which."""
    os.sync()
    if can_drop_caches():
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            return "drop_caches"
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return "fadvise"


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


Migrated = tuple[subprocess.CompletedProcess[str], float, list[str]]


def migrate(config: Path, *extra: str, env: dict[str, str] | None = None) -> Migrated:
    """Run ``python -m pipeline migrate --config CONFIG …``; return (process, wall seconds, argv)."""
    argv = [sys.executable, "-m", "pipeline", "migrate", "--config", str(config), *extra]
    full = dict(os.environ, GHO2KVM_FORCE_TCG="1", **(env or {}))
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(REPO), env=full)
    return proc, time.monotonic() - t0, argv


def load_note() -> str:
    la = os.getloadavg()
    return f"load {la[0]:.1f}/{la[1]:.1f}/{la[2]:.1f} on {os.cpu_count()} CPUs"
