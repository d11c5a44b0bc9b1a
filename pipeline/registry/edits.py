"""The accounting of registry changes: planned ops + what the hive has → typed edits and the ops to write.

:func:`account` is the one place that decides, for every planned :class:`~pipeline.registry.regfile.Op`
of one hive, whether it *adds* something, *changes* a value (old → new), *deletes* something, or is
*kept* (with why), following each op's :class:`~pipeline.registry.regfile.Policy`: a user's ``.reg``
does exactly what it says; built-in sets fill in what is missing and change only what they force.
Every built-in change set (MergeIDE, virtio, and any later one fed through
``registry_merge.collect_ops``) goes through it, at ``gho2kvm plan`` (on inspect's
:func:`snapshot` of the hive: what it did not record is ``unknown``) and in registry-merge (on the
hive itself, :class:`RegfView`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.core.receipts import JsonRecord
from pipeline.registry import regf
from pipeline.registry.plan import hive_relative
from pipeline.registry.regfile import Op, Policy, RegType, decode_value, encode_sz, type_name

ADDED, CHANGED, DELETED, KEPT, UNKNOWN = "added", "changed", "deleted", "kept", "unknown"
STATUSES = (ADDED, CHANGED, DELETED, KEPT, UNKNOWN)
BUILTIN = "built-in"
_CDD = re.compile(r"\\(ControlSet\d{3})\\Control\\CriticalDeviceDatabase\\[^\\]+$", re.IGNORECASE)


class _Unknown:
    def __repr__(self) -> str:
        return "UNKNOWN"


#: what a view answers for a key it did not record (plan time: inspect's snapshot)
NOT_RECORDED = _Unknown()
Values = dict[str, regf.Value]  # lower name → value


class HiveView(Protocol):
    def values(self, key: str) -> Values | None | _Unknown:
        """Values of the hive-relative ``key``; None when absent, NOT_RECORDED when unknown."""

    def spelling(self, parent: str, name: str) -> str | None | _Unknown:
        """``lower``/``upper``: how the siblings under ``parent`` spell value ``name``."""


class RegfView:
    """A view on a hive file's bytes (registry-merge: the replayed, checked local copy)."""

    def __init__(self, hive: regf.Hive) -> None:
        self.hive = hive
        self._spell: dict[tuple[str, str], str | None] = {}

    def values(self, key: str) -> Values | None:
        return self.hive.key_values(key)

    def spelling(self, parent: str, name: str) -> str | None:
        k = (parent.lower(), name.lower())
        if k not in self._spell:
            off = self.hive.find(parent)
            styles: Counter[str] = Counter()
            for sub in self.hive.subkeys(off) if off is not None else []:
                for v in self.hive.values(sub):
                    if v.name.lower() == k[1] and v.type == RegType.SZ:
                        styles[_style(decode_value(v.type, v.data))] += 1
            styles.pop("", None)
            self._spell[k] = styles.most_common(1)[0][0] if styles else None
        return self._spell[k]


class SnapshotView:
    """A view on inspect's :func:`snapshot` (JSON): keys it did not record are NOT_RECORDED."""

    def __init__(self, snap: Mapping[str, Any]) -> None:
        self.keys: Mapping[str, Any] = snap.get("keys", {})
        self.spell: Mapping[str, Any] = snap.get("spelling", {})

    def values(self, key: str) -> Values | None | _Unknown:
        lk = key.lower()
        if lk not in self.keys:
            return NOT_RECORDED
        got = self.keys[lk]
        if got is None:
            return None
        return {n: regf.Value(v[0], v[1], bytes.fromhex(v[2])) for n, v in got.items()}

    def spelling(self, parent: str, name: str) -> str | None | _Unknown:
        k = f"{parent.lower()}|{name.lower()}"
        return self.spell.get(k, NOT_RECORDED)


def _style(s: object) -> str:
    if not isinstance(s, str) or s.lower() == s.upper():
        return ""
    return "lower" if s == s.lower() else "upper" if s == s.upper() else ""


def snapshot(hive: regf.Hive, ops: Iterable[Op]) -> dict[str, Any]:
    """What :func:`account` needs of ``hive`` for ``ops`` (keys in any form), as JSON: each key's
    values (None when absent), the services named by existing CriticalDeviceDatabase entries, and
    the sibling spelling of ``fill_spelled`` values. Stored by inspect, read back at plan time."""
    view = RegfView(hive)
    keys: dict[str, Any] = {}
    spelling: dict[str, str | None] = {}

    def record(rel: str) -> Values | None:
        got = view.values(rel)
        keys[rel.lower()] = None if got is None else {
            n: [v.name, v.type, v.data.hex()] for n, v in got.items()}
        return got

    for op in ops:
        rel = hive_relative(op.key)
        got = record(rel) if rel.lower() not in keys else None
        if op.policy == Policy.CDD and got is not None and (svc := _service_key(rel, got)) is not None:
            record(svc)
        if op.policy == Policy.FILL_SPELLED and op.name is not None:
            parent = rel.rsplit("\\", 1)[0]
            spelling[f"{parent.lower()}|{op.name.lower()}"] = view.spelling(parent, op.name)
    return {"keys": keys, "spelling": spelling}


def _service_key(rel: str, values: Values) -> str | None:
    """``\\ControlSet00N\\Services\\<svc>`` for a CDD entry whose ``Service`` names ``svc``."""
    m = _CDD.search(rel)
    svc = values.get("service")
    if not m or svc is None or svc.type not in (RegType.SZ, RegType.EXPAND_SZ):
        return None
    name = decode_value(svc.type, svc.data)
    if not isinstance(name, str) or not name or "\\" in name:
        return None
    return f"\\{m.group(1)}\\Services\\{name}"


@dataclass(frozen=True)
class Edit(JsonRecord):
    """One key or value and what the merge does to it."""

    status: str  # added | changed | deleted | kept | unknown
    key: str  # canonical (HKEY_LOCAL_MACHINE\SYSTEM\...)
    name: str | None = None  # None: the key itself
    old: str | None = None
    new: str | None = None
    why: str = ""
    source: str = BUILTIN  # the .reg file, or "built-in"

    def line(self) -> str:
        what = f"[{self.key}]" + ("" if self.name is None else f' "{self.name or "@"}"')
        detail = {ADDED: f" = {self.new}" if self.name is not None else "",
                  CHANGED: f": {self.old} → {self.new}",
                  DELETED: f" (was {self.old})"}.get(self.status, "")
        return f"{self.status} {what}{detail}" + (f" ({self.why})" if self.why else "")


@dataclass(frozen=True)
class Accounting:
    edits: tuple[Edit, ...]
    write: tuple[Op, ...]  # the ops that change the hive, in order (parents first)

    def counts(self) -> dict[str, dict[str, int]]:
        """``{source: {status: n}}`` (statuses with n > 0)."""
        out: dict[str, Counter[str]] = {}
        for e in self.edits:
            out.setdefault(e.source, Counter())[e.status] += 1
        return {s: dict(c) for s, c in out.items()}


@dataclass
class _State:
    view: HiveView
    keys: dict[str, Values | None] = field(default_factory=dict)  # overrides of the view, by lower key

    def get(self, rel: str) -> Values | None | _Unknown:
        lk = rel.lower()
        if lk in self.keys:
            return self.keys[lk]
        for k, v in self.keys.items():  # a deleted ancestor hides the view's key
            if v is None and lk.startswith(k + "\\"):
                return None
        return self.view.values(rel)


def show(t: int | None, data: bytes | None) -> str:
    if t is None or data is None:
        return "-"
    v = decode_value(t, data)
    text = repr(v) if not isinstance(v, bytes) else v.hex(",")
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{type_name(t)} {text}"


def account(ops: Sequence[Op], view: HiveView) -> Accounting:
    """Edits and ops to write for the planned ``ops`` of one hive (canonical keys, parents first, as
    :func:`pipeline.registry.plan.plan` gives them) against ``view``."""
    st = _State(view)
    edits: list[Edit] = []
    write: list[Op] = []
    guarded: dict[str, str] = {}  # lower key → why its ops are kept
    skipped: dict[str, str] = {}  # lower key → why nothing is created under it

    def source(op: Op) -> str:
        return BUILTIN if op.policy != Policy.EXACT or op.file.startswith("<builtin") else op.file

    def edit(op: Op, status: str, **kw: Any) -> None:
        edits.append(Edit(status, op.key, op.name, source=source(op), **kw))

    for op in ops:
        rel = hive_relative(op.key)
        lk = rel.lower()
        # a built-in keeps what Windows has; a user's .reg (exact) still does what it says
        under = None if op.policy == Policy.EXACT else next(
            (why for k, why in {**skipped, **guarded}.items() if lk == k or lk.startswith(k + "\\")), None)
        if op.is_key and op.delete:
            have = st.get(rel)
            if have is NOT_RECORDED:
                edit(op, UNKNOWN, new="deleted", why="not read by inspect")
            elif have is None:
                edit(op, KEPT, why="no such key")
            else:
                edit(op, DELETED, old="key")
            st.keys = {k: v for k, v in st.keys.items() if not (k == lk or k.startswith(lk + "\\"))}
            st.keys[lk] = None
            write.append(op)
            continue
        if under is not None:
            if not op.ancestor:
                edit(op, KEPT, why=under)
            continue
        have = st.get(rel)
        if op.is_key:
            if have is NOT_RECORDED:
                if not op.ancestor:
                    edit(op, UNKNOWN, why="not read by inspect")
                write.append(op)
                continue
            if have is None:
                if op.policy == Policy.EXISTING:
                    skipped[lk] = f"no key {rel.rsplit(chr(92), 1)[-1]} in the guest"
                    if not op.ancestor:
                        edit(op, KEPT, why=skipped[lk])
                    continue
                st.keys[lk] = {}
                edit(op, ADDED)
                write.append(op)
                continue
            if op.policy == Policy.CDD:
                assert not isinstance(have, _Unknown)
                svc = _service_key(rel, have)
                if svc is not None:
                    exists = st.get(svc)
                    name = svc.rsplit("\\", 1)[-1]
                    if exists is NOT_RECORDED:
                        guarded[lk] = (f"maps to {name}; whether the guest has it is unknown until "
                                       f"registry-merge")
                        edit(op, UNKNOWN, why=guarded[lk])
                        continue
                    if exists is not None:
                        guarded[lk] = f"Windows maps it to {name}, which the guest has"
                        edit(op, KEPT, why=guarded[lk])
                        continue
            continue  # an existing key: nothing to create
        assert op.name is not None
        ln = op.name.lower()
        if isinstance(have, _Unknown):
            edit(op, UNKNOWN, new=show(op.type, op.data), why="not read by inspect")
            write.append(op)
            continue
        cur = None if have is None else have.get(ln)
        if op.delete:
            if cur is None:
                edit(op, KEPT, why="not present")
                continue
            edit(op, DELETED, old=show(cur.type, cur.data))
            assert have is not None
            have = dict(have)
            del have[ln]
            st.keys[lk] = have
            write.append(op)
            continue
        assert op.type is not None and op.data is not None
        data = op.data
        if op.policy == Policy.FILL_SPELLED and op.type == RegType.SZ:
            style = view.spelling(rel.rsplit("\\", 1)[0], op.name)
            text = decode_value(op.type, data)
            if isinstance(style, str) and isinstance(text, str):
                data = encode_sz(text.lower() if style == "lower" else text.upper())
        new = Op(op.key, op.name, op.type, data, file=op.file, line=op.line, policy=op.policy)
        if cur is None:
            edit(op, ADDED, new=show(op.type, data))
        elif cur.type == op.type and cur.data == data:
            edit(op, KEPT, old=show(cur.type, cur.data), why="already so")
            continue
        elif op.policy in (Policy.FILL, Policy.FILL_SPELLED, Policy.CDD):
            edit(op, KEPT, old=show(cur.type, cur.data), why="the guest's own value")
            continue
        else:
            edit(op, CHANGED, old=show(cur.type, cur.data), new=show(op.type, data))
        vals = dict(have or {})
        vals[ln] = regf.Value(op.name, op.type, data)
        st.keys[lk] = vals
        write.append(new)
    return Accounting(tuple(edits), tuple(write))


def summary(counts: Mapping[str, Mapping[str, int]]) -> str:
    """``built-in: 12 added, 3 changed, 140 kept; extra.reg: 2 added``."""
    parts = []
    for src, c in counts.items():
        shown = ", ".join(f"{c[s]} {s}" for s in STATUSES if c.get(s))
        parts.append(f"{src}: {shown or 'nothing'}")
    return "; ".join(parts)
