"""Built-in registry change sets shipped as ``.reg`` files in ``pipeline/registry/data``.

``mergeide``: the classic MergeIDE changes (CriticalDeviceDatabase entries for IDE controllers and
boot-start IDE services) so Windows finds its disk on QEMU's PIIX3 IDE controller instead of
stopping with STOP 0x7B. Windows Vista/7 (NT 6.x) additionally get Microsoft KB922976's changes
(``msahci``, ``intelide``, ``pciide``, ``atapi`` boot-start) so the disk boots on IDE or AHCI.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from pipeline.errors import InputError
from pipeline.registry.regfile import Op, parse_bytes

BUILTIN_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "mergeide": {
        "nt5": ("mergeide_cdd.reg", "mergeide_xp.reg"),
        "nt6": ("mergeide_cdd.reg", "mergeide_nt6.reg"),
    },
}

#: drivers the mergeide changes point at; the task checks them in System32\drivers.
REQUIRED_DRIVERS = ("atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys")


def builtin_names() -> list[str]:
    return sorted(BUILTIN_SETS)


def variant_for(os_major: int | None, os_minor: int | None = None) -> str:
    """``"nt6"`` for Windows NT 6.x (Vista, 7, 2008), ``"nt5"`` for everything else
    (2000/XP/2003 and unknown versions)."""
    return "nt6" if os_major == 6 else "nt5"


def data_files(name: str, os_major: int | None, os_minor: int | None = None) -> list[str]:
    try:
        variants = BUILTIN_SETS[name.lower()]
    except KeyError:
        raise InputError(
            f"unknown built-in registry change set {name!r}; known: {', '.join(builtin_names())}"
        ) from None
    return list(variants[variant_for(os_major, os_minor)])


@functools.cache
def data_hash() -> str:
    """sha256 over every built-in data file (part of registry-merge's input fingerprint)."""
    h = hashlib.sha256()
    pkg = resources.files("pipeline.registry").joinpath("data")
    for entry in sorted(pkg.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".reg"):
            h.update(entry.name.encode() + b"\0" + entry.read_bytes())
    return h.hexdigest()


def builtin_ops(name: str, os_major: int | None, os_minor: int | None) -> list[Op]:
    """Parsed ops of built-in set ``name`` for the Windows version ``os_major.os_minor``.

    Keys use ``CurrentControlSet``; pass the result through :func:`pipeline.registry.plan.plan`.
    Raises InputError for an unknown name.
    """
    ops: list[Op] = []
    pkg = resources.files("pipeline.registry").joinpath("data")
    for fname in data_files(name, os_major, os_minor):
        raw = pkg.joinpath(fname).read_bytes()
        ops.extend(parse_bytes(raw, f"<builtin {name}>/{fname}"))
    return ops


def required_drivers() -> list[str]:
    """Driver files (in ``System32\\drivers``) the mergeide changes need."""
    return list(REQUIRED_DRIVERS)
