"""One hive file as the guest left it: base block facts, its transaction logs, the replayed copy, damage.

:func:`examine` is the one rule for a hive taken from a guest (inspect and registry-merge both call
it): read the base block; find the logs; a dirty hive gets its logs replayed into a copy
(:func:`pipeline.registry.txlog.replay`) whose base block is fixed; the copy is checked against the
format (:func:`pipeline.registry.regf.check`); anything that does not hold makes the hive *damaged*,
said in one line by :meth:`HiveFacts.damage_line`. hivex's own walk of the copy (the tools layer)
comes on top, by the caller.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.model.hives import HiveFacts
from pipeline.registry import regf, txlog
from pipeline.registry.regf import BaseBlock, HiveDamage

#: the log files of a hive, in the order they are replayed
LOG_SUFFIXES = (".LOG", ".LOG1", ".LOG2")
#: the hives registry-merge edits, as the files are named in System32\config
HIVES = ("SYSTEM", "SOFTWARE")
@dataclass(frozen=True)
class Examined:
    facts: HiveFacts
    data: bytes | None  # the hive to edit (replayed when dirty); None when damaged


def examine(name: str, primary: bytes, logs: Mapping[str, bytes], *, guest_path: str = "") -> Examined:
    """Facts about hive ``name`` and the bytes to edit. ``logs`` maps the log file names found next
    to it (``SYSTEM.LOG1`` ...) to their content, in replay order."""
    found = tuple(logs)
    base_kw: dict[str, object] = {"name": name, "guest_path": guest_path, "size": len(primary),
                                  "logs_found": found}
    try:
        base = BaseBlock.parse(primary)
    except HiveDamage as e:
        return Examined(HiveFacts(**base_kw, damaged=str(e)), None)  # type: ignore[arg-type]
    base_kw.update(version=base.version, primary_seq=base.primary_seq, secondary_seq=base.secondary_seq,
                   checksum_ok=base.checksum_ok, dirty=base.signature == b"regf" and base.dirty)
    if base.signature != b"regf":
        return Examined(HiveFacts(**base_kw, damaged="no regf signature at 0x0"), None)  # type: ignore[arg-type]
    if not base.dirty:
        return _checked(HiveFacts(**base_kw), primary)  # type: ignore[arg-type]
    parsed = [txlog.read_log(n, d) for n, d in logs.items()]
    try:
        rep = txlog.replay(primary, parsed)
    except HiveDamage as e:
        return Examined(HiveFacts(**base_kw, damaged=str(e)), None)  # type: ignore[arg-type]
    seqs = (rep.first_seq, rep.last_seq) if rep.first_seq is not None and rep.last_seq is not None else ()
    warning = None
    if rep.entries_replayed == 0:
        usable = ", ".join(f"{lg.name} ({lg.kind}{': ' + lg.stop if lg.stop else ''})"
                           for lg in parsed) or "none"
        warning = (f"{name} hive is dirty (sequence numbers {base.primary_seq}/{base.secondary_seq}) and its "
                   f"logs "
                   f"hold nothing to replay (logs: {usable}); migrated as the primary file has it: changes "
                   f"Windows had not written into it are lost")
    elif rep.stopped:
        warning = (f"{name} hive is dirty (sequence numbers {base.primary_seq}/{base.secondary_seq}): "
                   f"{rep.entries_replayed} log entries replayed, then the replay stopped: {rep.stopped}")
    facts = HiveFacts(**base_kw, entries_replayed=rep.entries_replayed, replayed_seqs=tuple(seqs),  # type: ignore[arg-type]
                      replay_stopped=rep.stopped, warning=warning)
    out = _checked(facts, rep.data)
    if out.data is not None and rep.entries_replayed:
        out = Examined(_with(out.facts, values_recovered=values_differing(primary, out.data)), out.data)
    return out


def _with(f: HiveFacts, **kw: object) -> HiveFacts:
    from dataclasses import replace

    return replace(f, **kw)  # type: ignore[arg-type]


def _checked(facts: HiveFacts, data: bytes) -> Examined:
    try:
        regf.check(data)
    except HiveDamage as e:
        what = str(e)
        if facts.entries_replayed:
            what += f" (after replaying {facts.entries_replayed} log entries)"
        return Examined(_with(facts, damaged=what), None)
    return Examined(facts, data)


def values_differing(before: bytes, after: bytes) -> int:
    """How many values a replay added, changed or removed (a primary that cannot be walked counts
    every value of ``after``)."""
    def table(data: bytes) -> dict[tuple[str, str], tuple[int, bytes]]:
        return {(path.lower(), v.name.lower()): (v.type, v.data) for path, vals in regf.Hive(data).walk()
                for v in vals}
    new = table(after)
    try:
        old = table(before)
    except HiveDamage:
        return len(new)
    return sum(1 for k, v in new.items() if old.get(k) != v) + sum(1 for k in old if k not in new)


def log_names(hive_name: str, listing: Sequence[str]) -> list[str]:
    """The names in ``listing`` (a folder's file names) that are logs of ``hive_name``, in replay
    order, matched case-insensitively as NTFS does (``system.LOG1``, ``SYSTEM.LOG1``)."""
    by_lower = {n.lower(): n for n in listing}
    return [by_lower[k] for s in LOG_SUFFIXES if (k := (hive_name + s).lower()) in by_lower]


def examine_files(name: str, primary: Path, logs: Sequence[Path], *, guest_path: str = "") -> Examined:
    return examine(name, primary.read_bytes(), {p.name: p.read_bytes() for p in logs}, guest_path=guest_path)


def write_copy(ex: Examined, path: str | os.PathLike[str]) -> Path:
    """Write the examined (replayed) bytes to ``path``."""
    assert ex.data is not None
    p = Path(path)
    p.write_bytes(ex.data)
    return p


def service_starts(hive_path: str | os.PathLike[str], control_set: str,
                   names: Sequence[str]) -> dict[str, int | None]:
    """``{service: Start}`` for ``names`` under ``\\<control_set>\\Services`` of a local SYSTEM hive
    (the checked, replayed copy): None when absent, -1 without a ``Start`` dword."""
    h = regf.Hive(Path(hive_path).read_bytes())
    out: dict[str, int | None] = {}
    for n in names:
        vals = h.key_values(f"\\{control_set}\\Services\\{n}")
        if vals is None:
            out[n] = None
            continue
        start = vals.get("start")
        out[n] = int.from_bytes(start.data, "little") if start is not None and len(start.data) == 4 else -1
    return out
