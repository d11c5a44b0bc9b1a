"""Built-in registry change sets shipped as ``.reg`` files in ``pipeline/registry/data``.

``mergeide``, chosen by the guest's family (:func:`pipeline.guest.windows.family`):

* ``nt5`` (2000/XP/2003, and unknown versions): the classic MergeIDE changes of Microsoft KB314082
  (CriticalDeviceDatabase entries for IDE controllers, boot-start ``atapi``/``intelide``/``pciide``)
  so Windows finds its disk on QEMU's PIIX3 IDE controller instead of stopping with STOP 0x7B;
* ``nt6`` (Vista/7/2008/2008 R2): the same CriticalDeviceDatabase entries plus KB922976 (``msahci``
  boot-start, an AHCI class entry) and ``intelide``/``pciide``/``atapi`` boot-start: IDE or AHCI;
* ``nt62`` (8/8.1/10/11/2012+): no CriticalDeviceDatabase (these versions do not read it);
  ``storahci`` (which replaced msahci) boot-start with its ``StartOverride`` cleared, and
  ``pciide``/``intelide``/``atapi`` boot-start.

``virtio_viostor``/``virtio_netkvm`` are the service and CriticalDeviceDatabase entries of the
virtio switch-over (:mod:`pipeline.guest.virtio`), applied with the driver files they point at.
"""

from __future__ import annotations

import functools
import hashlib
from importlib import resources

from pipeline.core.errors import InputError
from pipeline.guest import windows as guest
from pipeline.registry.regfile import Op, parse_bytes

BUILTIN_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "mergeide": {
        guest.NT5: ("mergeide_cdd.reg", "mergeide_xp.reg"),
        guest.NT6: ("mergeide_cdd.reg", "mergeide_nt6.reg"),
        guest.NT62: ("mergeide_nt62.reg",),
    },
}
#: the virtio switch-over's registry data, per driver (not selectable in ``registry:``)
VIRTIO_SETS = {"viostor": "virtio_viostor.reg", "netkvm": "virtio_netkvm.reg"}


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


def builtin_ops(name: str, os_major: int | None, os_minor: int | None) -> list[Op]:
    """Parsed ops of built-in set ``name`` for the Windows version ``os_major.os_minor``.

    Keys use ``CurrentControlSet``; pass the result through :func:`pipeline.registry.plan.plan`.
    Raises InputError for an unknown name.
    """
    ops: list[Op] = []
    for fname in data_files(name, os_major, os_minor):
        ops.extend(_data_ops(name, fname))
    return ops


def virtio_ops(driver: str) -> list[Op]:
    """Service and CriticalDeviceDatabase ops for virtio driver ``viostor`` or ``netkvm``."""
    return _data_ops("virtio", VIRTIO_SETS[driver])


def _data_ops(name: str, fname: str) -> list[Op]:
    raw = resources.files("pipeline.registry").joinpath("data").joinpath(fname).read_bytes()
    return parse_bytes(raw, f"<builtin {name}>/{fname}")


def required_drivers() -> list[str]:
    """Driver files (in ``System32\\drivers``) the mergeide changes need to boot on IDE (a missing
    AHCI driver is a refusal of ``disk_bus: sata`` instead, :func:`pipeline.guest.windows.decide`)."""
    return list(guest.IDE_DRIVERS)
