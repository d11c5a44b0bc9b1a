"""Read back a hive after merging and check that every change is there."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.core.choices import Step
from pipeline.registry.plan import hive_relative
from pipeline.registry.regfile import Op, parse_text, type_name
from pipeline.tools import hivex

#: a parent with at least this many keys to check is exported once (with its children)
#: instead of exporting each key separately.
_GROUP_MIN = 3


@dataclass
class _Key:
    exists: bool
    op: Op
    path: str
    values: dict[str, Op] = field(default_factory=dict)  # lower name -> last op


def _expected(ops: Sequence[Op]) -> dict[str, _Key]:
    """Final expected state, keyed by lower-case hive-relative path."""
    keys: dict[str, _Key] = {}

    def ensure(rel: str, op: Op) -> _Key:
        parts = rel.split("\\")
        for i in range(2, len(parts)):
            anc = "\\".join(parts[:i]).lower()
            k = keys.get(anc)
            if k is None or not k.exists:
                keys[anc] = _Key(True, op, "\\".join(parts[:i]))
        k = keys.get(rel.lower())
        if k is None or not k.exists:
            k = keys[rel.lower()] = _Key(True, op, rel)
        return k

    for op in ops:
        rel = hive_relative(op.key)
        lk = rel.lower()
        if op.is_key and op.delete:
            for sub in [k for k in keys if k == lk or k.startswith(lk + "\\")]:
                del keys[sub]
            keys[lk] = _Key(False, op, rel)
        elif op.is_key:
            ensure(rel, op)
        else:
            assert op.name is not None
            ensure(rel, op).values[op.name.lower()] = op
    return keys


def _export(hive_path: str, rel: str, depth: int, image_id: str | None, step: str
            ) -> dict[str, dict[str, Op]] | None:
    """Values of ``rel`` (and children if depth 2), keyed by lower path then lower name;
    None if ``rel`` does not exist."""
    text = hivex.export(hive_path, rel, max_depth=depth, missing_ok=True, image_id=image_id, step=step)
    if text is None:
        return None
    found: dict[str, dict[str, Op]] = {}
    for op in parse_text(text, f"export of {rel}"):
        vals = found.setdefault(op.key.lower(), {})
        if not op.is_key:
            assert op.name is not None
            vals[op.name.lower()] = op
    return found


def _show(op: Op) -> str:
    return f"{type_name(op.type)} {op.value!r}"


def verify(hive_path: str | os.PathLike[str], ops: Sequence[Op], *, image_id: str | None = None,
           step: str = Step.REGISTRY_MERGE) -> list[str]:
    """Compare the hive with the final state ``ops`` should have produced.

    ``ops`` are the planned ops of this one hive (canonical or hive-relative keys). Every value set
    must be present with the same type and bytes; deleted values and keys must be absent; created
    keys must exist. Returns one line per mismatch (empty list = OK).
    """
    path = os.fspath(hive_path)
    want = _expected(ops)
    # Which keys to read: group siblings under their parent.
    # (Paths are passed in their original case: hivex only folds ASCII case.)
    by_parent: dict[str, list[str]] = defaultdict(list)
    parent_path: dict[str, str] = {}
    for lk, k in want.items():
        parent = lk.rsplit("\\", 1)[0] or "\\"
        by_parent[parent].append(lk)
        parent_path.setdefault(parent, k.path.rsplit("\\", 1)[0] or "\\")
    actual: dict[str, dict[str, Op] | None] = {}
    for parent, children in sorted(by_parent.items()):
        if len(children) >= _GROUP_MIN and parent != "\\":
            got = _export(path, parent_path[parent], 2, image_id, step)
            for lk in children:
                actual[lk] = None if got is None else got.get(lk)
        else:
            for lk in children:
                got = _export(path, want[lk].path, 1, image_id, step)
                actual[lk] = None if got is None else got.get(lk, {})
    problems: list[str] = []
    for lk, k in want.items():
        have = actual.get(lk)
        where = k.op.where()
        if not k.exists:
            if have is not None:
                problems.append(f"{where}: key [{k.path}] should be deleted but is present")
            continue
        if have is None:
            problems.append(f"{where}: key [{k.path}] is missing")
            continue
        for lname, op in k.values.items():
            got_op = have.get(lname)
            shown = "@" if op.name == "" else f'"{op.name}"'
            if op.delete:
                if got_op is not None:
                    problems.append(f"{op.where()}: [{op.key}] {shown} should be deleted but is "
                                    f"{_show(got_op)}")
                continue
            if got_op is None:
                problems.append(f"{op.where()}: [{op.key}] {shown} is missing, expected {_show(op)}")
            elif got_op.type != op.type or got_op.data != op.data:
                problems.append(f"{op.where()}: [{op.key}] {shown} is {_show(got_op)}, expected {_show(op)}")
    return problems
