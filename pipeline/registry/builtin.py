"""Built-in registry change sets shipped as ``.reg`` files in ``pipeline/registry/data``.

``mergeide``, chosen by the guest's family (:func:`pipeline.model.windows.family`):

* ``nt5`` (2000/XP/2003, and unknown versions): the classic MergeIDE changes of Microsoft KB314082
  (CriticalDeviceDatabase entries for IDE controllers, boot-start ``atapi``/``intelide``/``pciide``)
  so Windows finds its disk on QEMU's PIIX3 IDE controller instead of stopping with STOP 0x7B;
* ``nt6`` (Vista/7/2008/2008 R2): the same CriticalDeviceDatabase entries plus KB922976 (``msahci``
  boot-start, an AHCI class entry) and ``intelide``/``pciide``/``atapi`` boot-start: IDE or AHCI;
* ``nt62`` (8/8.1/10/11/2012+): no CriticalDeviceDatabase (these versions do not read it);
  ``storahci`` (which replaced msahci) boot-start with its ``StartOverride`` cleared, and
  ``pciide``/``intelide``/``atapi`` boot-start.

``virtio_*`` are the virtio switch-over's entries (:mod:`pipeline.guest.virtio`), applied with the
driver files they point at: the ``viostor`` service for every family, bound to the virtio PCI ids
through CriticalDeviceDatabase (``nt5``/``nt6``) or DriverDatabase (``nt62``, which no longer reads
CriticalDeviceDatabase); ``netkvm`` (service + CriticalDeviceDatabase) for ``nt5``/``nt6`` only
(:data:`pipeline.model.windows.VIRTIO_OFFLINE`).
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import replace
from importlib import resources
from typing import TYPE_CHECKING

from pipeline.core.errors import InputError
from pipeline.model import windows as guest
from pipeline.registry.regfile import (
    Op,
    Policy,
    RegType,
    decode_value,
    encode_multi_sz,
    encode_sz,
    parse_bytes,
)

if TYPE_CHECKING:
    from pipeline.model.inspect import InspectFacts

BUILTIN_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "mergeide": {
        guest.NT5: ("mergeide_cdd.reg", "mergeide_cdd_xp.reg", "mergeide_xp.reg"),
        guest.NT6: ("mergeide_cdd.reg", "mergeide_nt6.reg"),
        guest.NT62: ("mergeide_nt62.reg",),
    },
}
#: the virtio switch-over's registry data, per driver and family (not selectable in ``registry:``)
VIRTIO_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "viostor": {
        guest.NT5: ("virtio_viostor.reg", "virtio_viostor_cdd.reg"),
        guest.NT6: ("virtio_viostor.reg", "virtio_viostor_cdd.reg"),
        guest.NT62: ("virtio_viostor.reg", "virtio_viostor_nt62.reg"),
    },
    "netkvm": {guest.NT5: ("virtio_netkvm.reg",), guest.NT6: ("virtio_netkvm.reg",)},
}
#: replaced by the guest's architecture (``amd64``/``x86``) in the data's key names and strings
ARCH_TOKEN = "$ARCH$"


def builtin_names() -> list[str]:
    return sorted(BUILTIN_SETS)


def variant_for(os_major: int | None, os_minor: int | None = None) -> str:
    """The fix-set family: ``nt5``/``nt6``/``nt62``; unknown versions get ``nt5`` (the classic set)."""
    return guest.family(os_major, os_minor) or guest.NT5


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


def builtin_ops(name: str, os_major: int | None, os_minor: int | None, bus: str = "ide") -> list[Op]:
    """Parsed ops of built-in set ``name`` for the Windows version ``os_major.os_minor`` booting from
    ``bus``, each with its :class:`~pipeline.registry.regfile.Policy` (:func:`fix_policies`).

    Keys use ``CurrentControlSet``; pass the result through :func:`pipeline.registry.plan.plan`.
    Raises InputError for an unknown name.
    """
    ops: list[Op] = []
    for fname in data_files(name, os_major, os_minor):
        ops.extend(_data_ops(name, fname))
    return fix_policies(ops, variant_for(os_major, os_minor), bus)


_CCS = re.escape("HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\")
_CDD_ENTRY = re.compile(_CCS + r"Control\\CriticalDeviceDatabase\\[^\\]+$", re.IGNORECASE)
_SERVICE = re.compile(_CCS + r"Services\\([^\\]+)(\\.*)?$", re.IGNORECASE)


def _cdd_policy(op: Op) -> Policy | None:
    """A CriticalDeviceDatabase entry: the key kept whole when Windows maps it to a service the guest
    has; a missing ClassGUID added as Windows spells it; a Service naming no service replaced."""
    if not _CDD_ENTRY.match(op.key):
        return None
    if op.is_key:
        return Policy.CDD
    return Policy.FILL_SPELLED if (op.name or "").lower() == "classguid" else Policy.FORCE


def fix_policies(ops: list[Op], fam: str, bus: str) -> list[Op]:
    """The policies of a MergeIDE-style fix set: CriticalDeviceDatabase entries as
    :func:`_cdd_policy`; a service the set defines whole (with an ``ImagePath``) is created where
    absent, a service it only tunes (a ``Start``) is left alone where absent; only the ``Start`` (and
    ``StartOverride``) of :func:`pipeline.model.windows.boot_services` is changed, every other value
    only filled in. NT 6+ get Windows 7's lower-case ClassGUID where the hive shows no spelling."""
    boot = {s.lower() for s in guest.boot_services(fam, bus)}
    whole = {m.group(1).lower() for op in ops if (op.name or "").lower() == "imagepath"
             and (m := _SERVICE.match(op.key))}
    out = []
    for op in ops:
        policy = _cdd_policy(op)
        if policy is None:
            m = _SERVICE.match(op.key)
            if m is None:
                policy = Policy.FILL
            elif op.is_key:
                policy = Policy.FILL if m.group(1).lower() in whole else Policy.EXISTING
            else:
                sub = (m.group(2) or "").lower()
                forced = m.group(1).lower() in boot and (
                    (not sub and (op.name or "").lower() == "start") or sub == "\\startoverride")
                policy = Policy.FORCE if forced else Policy.FILL
        if policy == Policy.FILL_SPELLED and fam != guest.NT5 and op.type == RegType.SZ:
            text = decode_value(op.type, op.data or b"")
            op = replace(op, data=encode_sz(str(text).lower()))
        out.append(replace(op, policy=policy))
    return out


def _virtio_policies(ops: list[Op]) -> list[Op]:
    """The virtio driver is the chosen one: its values are forced; CriticalDeviceDatabase entries
    follow :func:`_cdd_policy` (an entry already mapping the id to a service the guest has is kept)."""
    return [replace(op, policy=_cdd_policy(op) or Policy.FORCE) for op in ops]


def virtio_ops(driver: str, facts: InspectFacts) -> list[Op]:
    """Ops installing virtio driver ``viostor`` or ``netkvm`` in this guest (family and arch from
    the inspect ``facts``). Raises ValueError for a driver the family cannot get offline."""
    fnames = VIRTIO_SETS[driver].get(guest.facts_family(facts) or guest.NT5)
    if fnames is None:
        raise ValueError(f"{driver} cannot be installed offline in {guest.guest_name(facts)}")
    arch = guest.arch_of(facts)
    return _virtio_policies([_with_arch(op, arch) for fname in fnames for op in _data_ops("virtio", fname)])


def _with_arch(op: Op, arch: str) -> Op:
    """``op`` with :data:`ARCH_TOKEN` replaced in its key and in a string value's text."""
    data = op.data
    if data is not None and op.type in (RegType.SZ, RegType.EXPAND_SZ, RegType.MULTI_SZ):
        value = decode_value(op.type, data)
        if isinstance(value, list) and any(ARCH_TOKEN in v for v in value):
            data = encode_multi_sz(v.replace(ARCH_TOKEN, arch) for v in value)
        elif isinstance(value, str) and ARCH_TOKEN in value:
            data = encode_sz(value.replace(ARCH_TOKEN, arch))
    return replace(op, key=op.key.replace(ARCH_TOKEN, arch), data=data)


def _data_ops(name: str, fname: str) -> list[Op]:
    raw = resources.files("pipeline.registry").joinpath("data").joinpath(fname).read_bytes()
    return parse_bytes(raw, f"<builtin {name}>/{fname}")


def required_drivers() -> list[str]:
    """Driver files (in ``System32\\drivers``) the mergeide changes need to boot on IDE (a missing
    AHCI driver is a refusal of ``disk_bus: sata`` instead, :func:`pipeline.model.windows.decide`)."""
    return list(guest.IDE_DRIVERS)


def snapshot_ops(facts: InspectFacts) -> list[Op]:
    """Every built-in op this guest could get (each set, each bus, the virtio drivers it can take):
    the keys inspect records for ``gho2kvm plan`` (:func:`pipeline.registry.edits.snapshot`). A
    new built-in change set adds its ops here so that plan can count them."""
    ops = [op for name in BUILTIN_SETS for op in builtin_ops(name, facts.major_version, facts.minor_version)]
    for driver in VIRTIO_SETS:
        if guest.facts_family(facts) in VIRTIO_SETS[driver]:
            ops += virtio_ops(driver, facts)
    return ops
