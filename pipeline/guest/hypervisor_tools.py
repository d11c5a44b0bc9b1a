"""Other hypervisors' guest tools: which are installed (read from a LOCAL SYSTEM hive) and which of
VMware's mean nothing on KVM.

:data:`TABLE` is the one list. Names are the services and drivers as the vendors' installers
register them under ``<ControlSet>\\Services`` (VMware Tools: "VMware Tools components" and the
device drivers listed in VMware's Tools documentation; VirtualBox: the Guest Additions' drivers and
VBoxService as ``VBoxWindowsAdditions`` installs them; Hyper-V: the integration services' names of
Windows 7/2008 R2 onwards, which also ships them inbox). ``disable`` marks what ``vmware_tools:
disable`` sets to Start=4: a device driver for a VMware virtual device KVM does not have, or a tools
service talking to the VMware host. Storage drivers (``pvscsi``, ``vmscsi``) are never disabled:
the guest may boot from them on VMware and a driver without its device costs nothing.
"""

from __future__ import annotations

import os

from pipeline.guest.hiveread import read_tree
from pipeline.model.guest import TABLE, ToolService


def installed(hive_path: str | os.PathLike[str], control_set: str, *, image_id: str | None = None,
              step: str = "inspect") -> tuple[ToolService, ...]:
    """Every :data:`TABLE` service present under ``<control_set>\\Services`` of the local SYSTEM hive
    (one export of the Services key's values, whatever their number)."""
    services = read_tree(hive_path, f"\\{control_set}\\Services", max_depth=2, image_id=image_id, step=step)
    if services is None:
        return ()
    out = []
    for entry in TABLE:
        if not services.has(entry.name):
            continue
        stored = next(n for n in services.children() if n.lower() == entry.name.lower())
        out.append(ToolService(name=stored, vendor=entry.vendor, start=services.dword(stored, "Start"),
                               group=services.string(stored, "Group"),
                               image_path=services.string(stored, "ImagePath")))
    return tuple(out)
