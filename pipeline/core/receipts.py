"""Receipts: the JSON file each step writes last, next to its artifact.

A receipt records what the step did and the *fingerprint* of its inputs: files by path/size/mtime
(never their content for disk images), small files (``.reg``) by content hash, the config fields the
step uses, tool versions and the ``run_id`` of the upstream receipt. ``is_current`` compares a
receipt with freshly computed inputs using only ``stat`` and small reads, and never raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from pipeline.core import atomic


def file_stamp(path: Path | str) -> dict[str, Any]:
    """Path, size and mtime of a file (``missing`` when absent). Reads no content."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return {"path": str(p), "missing": True}
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def content_hash(path: Path | str) -> dict[str, Any]:
    """sha256 of a small file (``.reg``); ``missing`` when absent."""
    p = Path(path)
    try:
        return {"path": str(p), "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    except OSError:
        return {"path": str(p), "missing": True}


def digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def new_run_id() -> str:
    return uuid.uuid4().hex


def read(path: Path) -> dict[str, Any] | None:
    data = atomic.read_json(path)
    return data if isinstance(data, dict) else None


def write(path: Path, receipt: dict[str, Any]) -> None:
    atomic.write_json(path, receipt)


def why_stale(receipt: dict[str, Any] | None, fingerprint: dict[str, Any]) -> str | None:
    """None if the receipt is current for ``fingerprint``; else a short human reason."""
    if receipt is None:
        return "no receipt (never ran, or did not finish)"
    old = receipt.get("fingerprint")
    if not isinstance(old, dict):
        return "receipt has no fingerprint"
    changed = [describe_change(key, old.get(key), fingerprint.get(key))
               for key in sorted(set(old) | set(fingerprint)) if old.get(key) != fingerprint.get(key)]
    if changed:
        more = f" (+{len(changed) - 3} more)" if len(changed) > 3 else ""
        return "input changed: " + "; ".join(changed[:3]) + more
    for out in receipt.get("outputs", {}).values():
        if not isinstance(out, dict) or not isinstance(out.get("path"), str):
            continue
        now = file_stamp(out["path"])
        if now.get("missing"):
            return f"output missing: {out['path']}"
        if "size" in out and now.get("size") != out["size"]:
            return f"output changed: {out['path']}"
        if "mtime_ns" in out and now.get("mtime_ns") != out["mtime_ns"]:
            return f"output changed: {out['path']}"
    return None


def _short(v: Any) -> str:
    text = json.dumps(v, default=str) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_change(key: str, old: Any, new: Any) -> str:
    """One phrase naming what differs between two fingerprint values, e.g.
    ``domain.memory_mib 512 → 1024`` or ``disk /src/xp.vmdk modified (mtime)``."""
    if key == "upstream_run_id":
        return "the previous step ran again (upstream_run_id)"
    if isinstance(old, dict) and isinstance(new, dict) and ("path" in old or "path" in new):
        path = new.get("path") or old.get("path")
        if old.get("path") != new.get("path"):
            return f"{key} path {old.get('path')} → {new.get('path')}"
        if new.get("missing"):
            return f"{key} {path} is missing"
        if old.get("missing"):
            return f"{key} {path} appeared"
        what = [w for w, k in (("content", "sha256"), ("size", "size"), ("mtime", "mtime_ns"))
                if old.get(k) != new.get(k)]
        return f"{key} {path} modified ({', '.join(what) or 'stamp'})"
    if isinstance(old, dict) and isinstance(new, dict):
        for sub in sorted(set(old) | set(new), key=str):
            if old.get(sub) != new.get(sub):
                return describe_change(f"{key}.{sub}", old.get(sub), new.get(sub))
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return f"{key}: {len(old)} → {len(new)} entries"
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            if a != b:
                return describe_change(f"{key}[{i}]", a, b)
    return f"{key} {_short(old)} → {_short(new)}"


def output_stamp(path: Path) -> dict[str, Any]:
    st = os.stat(path)
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "allocated": st.st_blocks * 512}
