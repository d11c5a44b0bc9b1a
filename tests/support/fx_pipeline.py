"""Helpers for end-to-end tests: write a config, run the real CLI, read receipts."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]


def make_config(tmp: Path, images: list[dict[str, Any]], defaults: dict[str, Any] | None = None,
                settings: dict[str, Any] | None = None, name: str = "config.yaml") -> Path:
    """Write a config under ``tmp`` whose workdir/output_dir are ``tmp/work`` and ``tmp/images``."""
    d = {"workdir": str(tmp / "work"), "output_dir": str(tmp / "images")}
    d.update(defaults or {})
    doc: dict[str, Any] = {"defaults": d, "images": [{k: str(v) if isinstance(v, Path) else v
                                                       for k, v in img.items()} for img in images]}
    if settings:
        doc["settings"] = settings
    path = tmp / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900,
            cwd: Path | None = None, inject: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pipeline ARGS`` as a user would; JSON logs (not a TTY).

    ``inject="STEP"`` (or ``"STEP:kill"``) runs the same CLI through ``tests/support/inject_cli.py``, which
    fails (or SIGKILLs) STEP after its work, before its receipt."""
    full = dict(os.environ)
    full["GHO2KVM_FORCE_TCG"] = "1"
    full.update(env or {})
    entry = [str(REPO / "tests" / "support" / "inject_cli.py"), inject] if inject else ["-m", "pipeline"]
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True,
                          timeout=timeout, env=full, cwd=str(cwd or REPO))


def receipt(tmp: Path, image_id: str, step: str) -> dict[str, Any]:
    return json.loads((tmp / "work" / image_id / f"{step}.json").read_text())


def json_events(stderr: str) -> list[dict[str, Any]]:
    """The JSON log lines in a gho2kvm child's stderr (not a TTY, so it logs JSON)."""
    out = []
    for line in stderr.splitlines():
        line = line.strip()
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def log_events(proc: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The JSON log lines a run printed on stderr."""
    return json_events(proc.stderr)


def path_shim(folder: Path, calls: Path, tools: tuple[str, ...] = ("qemu-img", "guestfish", "virsh",
                                                                    "hivexregedit", "qemu-system-x86_64")
              ) -> dict[str, str]:
    """A PATH directory whose tools log their argv to ``calls`` and run the real tool."""
    folder.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        real = shutil.which(tool)
        if real is None:
            continue
        script = folder / tool
        script.write_text(f'#!/bin/sh\necho "{tool} $*" >> "{calls}"\nexec "{real}" "$@"\n')
        script.chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}
