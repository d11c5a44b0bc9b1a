"""Map parsed ``.reg`` operations onto the hive files they belong to.

Only ``HKEY_LOCAL_MACHINE\\SYSTEM`` and ``HKEY_LOCAL_MACHINE\\SOFTWARE`` (``HKLM`` accepted) can be
changed offline. ``CurrentControlSet`` does not exist in the SYSTEM hive file; it is replaced by
the live ``ControlSet00N`` found by inspection (``\\Select\\Current``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace

from pipeline.registry.regfile import Op, Policy, RegSyntaxError

HKLM = "HKEY_LOCAL_MACHINE"
HIVE_PREFIXES: dict[str, str] = {
    "SYSTEM": HKLM + "\\SYSTEM",
    "SOFTWARE": HKLM + "\\SOFTWARE",
}
_ROOT_ALIASES = {"HKEY_LOCAL_MACHINE": HKLM, "HKLM": HKLM}
_OTHER_ROOTS = {
    "HKEY_CURRENT_USER", "HKCU", "HKEY_CLASSES_ROOT", "HKCR", "HKEY_USERS", "HKU",
    "HKEY_CURRENT_CONFIG", "HKCC", "HKEY_DYN_DATA", "HKEY_PERFORMANCE_DATA",
}
_CONTROL_SET = re.compile(r"(?:ControlSet)?0*(\d{1,3})", re.IGNORECASE)
_NUMBERED_SET = re.compile(r"ControlSet(\d{3})", re.IGNORECASE)
# HKLM\SYSTEM_00, HKLM\OFFLINE_SYSTEM, HKLM\SOFTWARE-old: a hive loaded under another name
_HIVE_ALIAS = re.compile(r"(?:OFFLINE[_ -]?)?(SYSTEM|SOFTWARE)[_ .-]?\w*", re.IGNORECASE)
#: top-level keys of a real SYSTEM hive (XP..11); anything else is probably a typo or an
#: unexpanded template (``%(cset)s``) and lands as a junk key
SYSTEM_TOP_KEYS = frozenset(k.lower() for k in (
    "CurrentControlSet", "Select", "Setup", "MountedDevices", "WPA", "DriverDatabase", "HardwareConfig",
    "Keyboard Layout", "ResourceManager", "ResourcePolicyStore", "RNG", "Software", "Input", "Maps",
    "ActivationBroker", "Platform", "State", "LastKnownGoodRecovery", "BcdStore", "Wpa", "Hardware",
))


def control_set_name(current: str | int) -> str:
    """``"ControlSet002"`` for ``"ControlSet002"``, ``"controlset2"``, ``"2"`` or ``2``."""
    m = _CONTROL_SET.fullmatch(str(current).strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"not a control set: {current!r} (expected ControlSet00N)")
    return f"ControlSet{int(m.group(1)):03d}"


def map_key(key: str, current_control_set: str | int, *, file: str = "<text>",
            line: int = 0) -> tuple[str, str]:
    """Return ``(hive, canonical key)`` for a registry key as written in a ``.reg`` file.

    The canonical key is ``HKEY_LOCAL_MACHINE\\<HIVE>\\...`` with ``CurrentControlSet`` replaced.
    Raises :class:`RegSyntaxError` (naming ``file``/``line``) for keys outside SYSTEM/SOFTWARE.
    """
    parts = key.split("\\")
    root = parts[0].upper()
    if root not in _ROOT_ALIASES:
        if root in _OTHER_ROOTS:
            why = f"{parts[0]} cannot be changed offline, only HKEY_LOCAL_MACHINE\\SYSTEM and \\SOFTWARE"
        else:
            why = "expected a key under HKEY_LOCAL_MACHINE\\SYSTEM or HKEY_LOCAL_MACHINE\\SOFTWARE"
        raise RegSyntaxError(file, line, f"key [{key}] refused: {why}")
    if len(parts) < 2 or parts[1].upper() not in HIVE_PREFIXES:
        hive = parts[1] if len(parts) > 1 else "(none)"
        alias = _HIVE_ALIAS.fullmatch(hive)
        hint = (f" ({hive} looks like the name a mounted offline hive gets in regedit; write "
                f"HKEY_LOCAL_MACHINE\\{alias.group(1).upper()}\\... instead)") if alias else ""
        raise RegSyntaxError(
            file, line,
            f"key [{key}] refused: hive {hive} is not supported, only SYSTEM and SOFTWARE{hint}",
        )
    hive = parts[1].upper()
    rest = parts[2:]
    if hive == "SYSTEM" and rest and rest[0].lower() == "currentcontrolset":
        rest[0] = control_set_name(current_control_set)
    return hive, "\\".join([HIVE_PREFIXES[hive], *rest])


def hive_relative(key: str) -> str:
    """``HKEY_LOCAL_MACHINE\\SYSTEM\\A\\B`` -> ``\\A\\B`` (``\\`` for the hive root). Keys that
    already start with a backslash are returned unchanged."""
    if key.startswith("\\"):
        return key
    parts = key.split("\\")
    rest = parts[2:]
    return "\\" + "\\".join(rest)


def _ancestors(key: str) -> list[str]:
    """Canonical ancestors strictly between the hive root and ``key``, outermost first."""
    parts = key.split("\\")
    return ["\\".join(parts[:i]) for i in range(3, len(parts))]


def plan(ops: Iterable[Op], current_control_set: str | int) -> dict[str, list[Op]]:
    """Split ``ops`` by hive (``"SYSTEM"``, ``"SOFTWARE"``), keys mapped to canonical form.

    Order is preserved. Because ``hivexregedit --merge`` cannot create a key whose parent is
    missing, a create-key op is inserted for every ancestor not yet created in this plan (a no-op
    for keys that exist). Deleting a hive root or a whole control set is refused.
    """
    ccs = control_set_name(current_control_set)
    out: dict[str, list[Op]] = {}
    ensured: dict[str, set[str]] = {}
    for op in ops:
        hive, key = map_key(op.key, ccs, file=op.file, line=op.line)
        depth = len(key.split("\\"))
        if op.is_key and op.delete:
            if depth <= 2:
                raise RegSyntaxError(op.file, op.line, f"refusing to delete the hive root [{op.key}]")
            if hive == "SYSTEM" and depth == 3 and re.fullmatch(r"controlset\d+", key.split("\\")[2], re.I):
                raise RegSyntaxError(op.file, op.line, f"refusing to delete a whole control set [{op.key}]")
        todo = out.setdefault(hive, [])
        done = ensured.setdefault(hive, set())
        lk = key.lower()
        if op.is_key and op.delete:
            done -= {k for k in done if k == lk or k.startswith(lk + "\\")}
            todo.append(replace(op, key=key))
            continue
        for anc in _ancestors(key):
            if anc.lower() not in done:
                policy = Policy.EXISTING if op.policy == Policy.EXISTING else Policy.EXACT
                todo.append(Op(anc, file=op.file, line=op.line, policy=policy, ancestor=True))
                done.add(anc.lower())
        todo.append(replace(op, key=key))
        done.add(lk)
    return {h: v for h, v in out.items() if v}


def control_set_findings(ops: Iterable[Op], current_control_set: str | int) -> list[tuple[Op, str, bool]]:
    """``(first op, message, numbered)`` for each SYSTEM key outside the live control set: a
    numbered ``ControlSet00N`` that is not the live one (``numbered`` True), or an unknown top-level
    key (a typo, an unexpanded ``%(cset)s``). One finding per file and top-level key."""
    live = control_set_name(current_control_set)
    out: list[tuple[Op, str, bool]] = []
    seen: set[tuple[str, str]] = set()
    for op in ops:
        parts = op.key.split("\\")
        if len(parts) < 3 or parts[0].upper() not in _ROOT_ALIASES or parts[1].upper() != "SYSTEM":
            continue
        top = parts[2]
        if (op.file, top.lower()) in seen:
            continue
        numbered = _NUMBERED_SET.fullmatch(top)
        if numbered and top.lower() != live.lower():
            msg = (f"{op.where()}: key [{op.key}] names {top}, but the guest boots from {live}: the change "
                   f"would land in a set Windows does not use (set registry_remap_controlset: true, or write "
                   f"CurrentControlSet)")
        elif not numbered and top.lower() not in SYSTEM_TOP_KEYS:
            msg = (f"{op.where()}: key [{op.key}]: {top!r} is not a key of a Windows SYSTEM hive (a typo or "
                   f"an unexpanded template?); it would be created as a new top-level key")
        else:
            continue
        seen.add((op.file, top.lower()))
        out.append((op, msg, bool(numbered)))
    return out


def remap_control_sets(ops: Iterable[Op], current_control_set: str | int) -> list[Op]:
    """Every ``HKLM\\SYSTEM\\ControlSet00N\\...`` key rewritten to the live control set."""
    live = control_set_name(current_control_set)
    out = []
    for op in ops:
        parts = op.key.split("\\")
        if (len(parts) >= 3 and parts[0].upper() in _ROOT_ALIASES and parts[1].upper() == "SYSTEM"
                and _NUMBERED_SET.fullmatch(parts[2])):
            op = replace(op, key="\\".join([*parts[:2], live, *parts[3:]]))
        out.append(op)
    return out
