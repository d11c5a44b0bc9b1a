"""virtio switch-over: find a guest's drivers in a virtio-win tree (ISO or folder).

virtio-win lays drivers out as ``<driver>/<os>/<arch>/<driver>.sys`` (``viostor/w7/amd64/viostor.sys``,
``viostor/w10/amd64/viostor.sys``, ``netkvm/xp/x86/netkvm.sys``); the ``<os>`` names of a guest come from
:func:`pipeline.model.windows.virtio_os_dirs`. Which files a tree holds is a list of relative paths: a folder
is listed here (bounded), an ISO inside registry-merge's appliance (``find`` on the mounted ISO), and
:func:`find_drivers` picks from either list the same way.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import InputError
from pipeline.model import windows as guest

if TYPE_CHECKING:
    from pipeline.model.inspect import InspectFacts

#: a virtio-win folder holds a few thousand files; more than this is not a driver tree
MAX_TREE_FILES = 100_000


def is_iso(tree: Path) -> bool:
    return tree.is_file() and tree.suffix.lower() == ".iso"


def list_folder(folder: Path, *, image_id: str | None = None, step: str = "registry-merge") -> list[str]:
    """Relative POSIX paths of the files under ``folder`` (symlinks not followed)."""
    out: list[str] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        rel = Path(root).relative_to(folder)
        for f in sorted(files):
            out.append((rel / f).as_posix())
            if len(out) > MAX_TREE_FILES:
                raise InputError(f"virtio.drivers {folder}: more than {MAX_TREE_FILES} files; point it at "
                                 f"the virtio-win folder itself", image_id=image_id, step=step)
    return out


def find_drivers(paths: Iterable[str], facts: InspectFacts) -> dict[str, str]:
    """``{driver: path}`` (from ``paths``) of viostor/netkvm for this guest's ``<os>/<arch>``.

    The first ``<os>`` name of :func:`pipeline.model.windows.virtio_os_dirs` that has the driver wins; names
    compare case-insensitively (ISO 9660 readers differ), any leading folders are allowed. Only drivers
    the guest can get offline are looked for (:data:`pipeline.model.windows.VIRTIO_OFFLINE`: no netkvm
    for Windows 8 and later).
    """
    arch = guest.arch_of(facts)
    by_tail: dict[tuple[str, ...], str] = {}
    for p in paths:
        parts = tuple(x.lower() for x in p.strip("/").split("/"))
        if len(parts) >= 4:
            by_tail.setdefault(parts[-4:], p)
    found: dict[str, str] = {}
    for driver in guest.VIRTIO_DRIVERS.values():
        if not guest.virtio_switch_supported(facts, driver):
            continue
        for os_dir in guest.virtio_os_dirs(facts):
            hit = by_tail.get((driver, os_dir.lower(), arch, f"{driver}.sys"))
            if hit is not None:
                found[driver] = hit
                break
    return found
