"""Receipts: the JSON file each step writes last, next to its artifact.

A receipt (:class:`Receipt`, generic in the step's result type) records what the step did and the
*fingerprint* of its inputs, derived from the step's input dataclass (:func:`fingerprint_of`): files
by path/size/mtime (never their content for disk images), small files (``.reg``) by content hash,
config values as JSON, and the ``run_id`` of the upstream receipt. ``why_stale`` compares a receipt
with freshly computed inputs using only ``stat`` and small reads, and never raises.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import types
import typing
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, Self, TypeVar

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


# ---------------------------------------------------------------------------------------------
# Fingerprints derived from a step's input dataclass

#: dataclass field metadata key saying how a field enters the fingerprint (default: by value, a
#: ``Path`` by :func:`file_stamp`)
FP = "fingerprint"
HASHED = {FP: "content"}  # a small file (``.reg``): by content hash
NAMED = {FP: "name"}  # a path whose content is no input (an output, a location): by name only
UPSTREAM = {FP: "upstream"}  # an upstream step's result: covered by ``upstream_run_id``
RUNTIME = {FP: "runtime"}  # how the step runs, not what it makes (force_tcg for libguestfs, a timeout)
#: read only to refuse early, before anything is written; the later step whose result depends on it
#: has it in its own fingerprint (registry-merge checks the disk bus that xml-render decides)
PREFLIGHT = {FP: "preflight"}
_SKIPPED = ("upstream", "runtime", "preflight")


def fingerprint_of(value: Any, how: str | None = None) -> Any:
    """The JSON fingerprint of a step input: every dataclass field (recursively) unless its metadata
    says :data:`UPSTREAM` or :data:`RUNTIME`; paths stamped (``stat`` only), :data:`HASHED` paths by
    content, :data:`NAMED` paths by name; everything else as JSON. A field added to an input is in
    the fingerprint without anyone listing it."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: fingerprint_of(getattr(value, f.name), f.metadata.get(FP))
                for f in dataclasses.fields(value) if f.metadata.get(FP) not in _SKIPPED}
    if isinstance(value, Path):
        if how == "content":
            return content_hash(value)
        if how == "name":
            return str(value)
        return file_stamp(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, list | tuple):
        return [fingerprint_of(v, how) for v in value]
    if isinstance(value, Mapping):
        return {str(k): fingerprint_of(v, how) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{type(value).__name__} cannot be part of a step fingerprint")


# ---------------------------------------------------------------------------------------------
# Typed receipts


class StepResult(Protocol):
    """What a step function returns: a frozen dataclass that round-trips through JSON."""

    @property
    def warnings(self) -> tuple[str, ...]: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=StepResult)


@dataclass(frozen=True)
class Outcome(Generic[R]):
    """What a task's ``execute()`` returns: the step's result, the files it made (name → path) and
    the bytes it read (None for bytes written: the outputs' allocated size)."""

    result: R
    outputs: Mapping[str, Path] = field(default_factory=dict)
    bytes_read: int = 0
    bytes_written: int | None = None


@dataclass(frozen=True)
class Receipt(Generic[R]):
    """A step's receipt: its typed result plus the bookkeeping every step has."""

    step: str
    image_id: str
    run_id: str
    started: str
    finished: str
    duration_s: float
    fingerprint: Mapping[str, Any]
    outputs: Mapping[str, Mapping[str, Any]]  # name → output_stamp
    bytes_read: int
    bytes_written: int
    result: R

    @property
    def warnings(self) -> tuple[str, ...]:
        return tuple(self.result.warnings)

    @property
    def timings(self) -> dict[str, Any]:
        return {"started": self.started, "finished": self.finished, "duration_s": self.duration_s}

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "image_id": self.image_id, "run_id": self.run_id,
                "started": self.started, "finished": self.finished, "duration_s": self.duration_s,
                "fingerprint": dict(self.fingerprint),
                "outputs": {k: dict(v) for k, v in self.outputs.items()}, "bytes_read": self.bytes_read,
                "bytes_written": self.bytes_written, "warnings": list(self.warnings),
                "result": self.result.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], parse: Callable[[Mapping[str, Any]], R]) -> Receipt[R]:
        """Raises ``KeyError``/``TypeError``/``ValueError`` for a receipt of another shape (an older
        version's): the caller treats it as stale."""
        return cls(step=str(data["step"]), image_id=str(data["image_id"]), run_id=str(data["run_id"]),
                   started=str(data["started"]), finished=str(data["finished"]),
                   duration_s=float(data["duration_s"]), fingerprint=dict(data["fingerprint"]),
                   outputs={str(k): dict(v) for k, v in data["outputs"].items()},
                   bytes_read=int(data["bytes_read"]), bytes_written=int(data["bytes_written"]),
                   result=parse(data["result"]))


def parse_receipt(data: Mapping[str, Any] | None,
                  parse: Callable[[Mapping[str, Any]], R]) -> Receipt[R] | None:
    """The typed receipt, or None when absent or of another shape (an older version's: stale)."""
    if data is None:
        return None
    try:
        return Receipt.from_dict(data, parse)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


class JsonRecord:
    """``to_dict``/``from_dict`` for a frozen dataclass of JSON values, paths, tuples and nested
    records (a step's result as stored in its receipt). ``from_dict`` ignores keys of no field and
    raises ``TypeError`` when a field without default is missing (a receipt of another shape)."""

    def to_dict(self) -> dict[str, Any]:
        out = _plain(dataclasses.asdict(self))  # type: ignore[call-overload]
        assert isinstance(out, dict)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        hints = typing.get_type_hints(cls)
        kw = {f.name: _coerce(hints[f.name], data[f.name])
              for f in dataclasses.fields(cls) if f.name in data}  # type: ignore[arg-type]
        return cls(**kw)


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _coerce(hint: Any, value: Any) -> Any:
    if value is None:
        return None
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce(args[0], value) if len(args) == 1 else value
    if hint is Path:
        return Path(value)
    if origin is tuple:
        return tuple(_coerce(args[0], v) for v in value) if args else tuple(value)
    if isinstance(hint, type) and issubclass(hint, JsonRecord):
        return hint.from_dict(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return hint(value)
    return value
