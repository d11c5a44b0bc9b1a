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
from dataclasses import dataclass

from pipeline.core.receipts import JsonRecord
from pipeline.guest.hiveread import read_tree

VMWARE, VIRTUALBOX, HYPERV = "VMware Tools", "VirtualBox Guest Additions", "Hyper-V integration services"


@dataclass(frozen=True)
class ToolEntry:
    name: str
    vendor: str
    what: str
    disable: bool = False  # vmware_tools: disable sets Start=4
    storage: bool = False  # never disabled


TABLE: tuple[ToolEntry, ...] = (
    ToolEntry("VMTools", VMWARE, "VMware Tools service (vmtoolsd)", disable=True),
    ToolEntry("VGAuthService", VMWARE, "VMware Alias Manager and Ticket Service", disable=True),
    ToolEntry("vmvss", VMWARE, "VMware Snapshot Provider (VSS)", disable=True),
    ToolEntry("VMUpgradeHelper", VMWARE, "VMware Upgrade Helper (older Tools)", disable=True),
    ToolEntry("vmci", VMWARE, "VMCI bus driver (host-guest channel)", disable=True),
    ToolEntry("vsock", VMWARE, "VMCI sockets (vSockets)", disable=True),
    ToolEntry("vmhgfs", VMWARE, "shared folders (HGFS) file system", disable=True),
    ToolEntry("vmmouse", VMWARE, "VMware pointing device filter", disable=True),
    ToolEntry("vmusbmouse", VMWARE, "VMware USB pointing device", disable=True),
    ToolEntry("vm3dmp", VMWARE, "VMware SVGA 3D display (WDDM)", disable=True),
    ToolEntry("vm3dmp_loader", VMWARE, "VMware SVGA 3D loader", disable=True),
    ToolEntry("vmx_svga", VMWARE, "VMware SVGA II display (XP/2003)", disable=True),
    ToolEntry("vmxnet", VMWARE, "vmxnet NIC", disable=True),
    ToolEntry("vmxnet3ndis6", VMWARE, "vmxnet3 NIC (NDIS 6)", disable=True),
    ToolEntry("VMXNET3", VMWARE, "vmxnet3 NIC (NDIS 5, XP/2003)", disable=True),
    ToolEntry("vmmemctl", VMWARE, "memory balloon", disable=True),
    ToolEntry("vmrawdsk", VMWARE, "raw disk access helper", disable=True),
    ToolEntry("vmaudio", VMWARE, "VMware audio (XP/2003)", disable=True),
    ToolEntry("pvscsi", VMWARE, "VMware paravirtual SCSI (storage)", storage=True),
    ToolEntry("vmscsi", VMWARE, "VMware SCSI (storage, XP/2003)", storage=True),
    ToolEntry("VBoxService", VIRTUALBOX, "VirtualBox Guest Additions service"),
    ToolEntry("VBoxGuest", VIRTUALBOX, "VirtualBox guest driver"),
    ToolEntry("VBoxMouse", VIRTUALBOX, "VirtualBox mouse filter"),
    ToolEntry("VBoxSF", VIRTUALBOX, "VirtualBox shared folders"),
    ToolEntry("VBoxVideo", VIRTUALBOX, "VirtualBox display (XP/2003, XPDM)"),
    ToolEntry("VBoxWddm", VIRTUALBOX, "VirtualBox display (WDDM)"),
    ToolEntry("vmbus", HYPERV, "VMBus"),
    ToolEntry("storvsc", HYPERV, "synthetic storage (storage)", storage=True),
    ToolEntry("netvsc", HYPERV, "synthetic network adapter"),
    ToolEntry("vmicheartbeat", HYPERV, "heartbeat service"),
    ToolEntry("vmickvpexchange", HYPERV, "data exchange service"),
    ToolEntry("vmicshutdown", HYPERV, "guest shutdown service"),
    ToolEntry("vmictimesync", HYPERV, "time synchronisation service"),
    ToolEntry("vmicvss", HYPERV, "volume shadow copy requestor"),
)
#: service groups of boot storage: a service in one is never disabled, whatever the table says
STORAGE_GROUPS = frozenset({"scsi miniport", "scsi class", "primary disk", "boot bus extender",
                            "boot file system", "filter"})
AUTO_START = 2  # SERVICE_AUTO_START; 0 boot, 1 system, 3 demand, 4 disabled


@dataclass(frozen=True)
class ToolService(JsonRecord):
    """One installed service/driver of another hypervisor's tools, as the guest's registry has it."""

    name: str
    vendor: str
    start: int | None  # None: no Start value
    group: str | None = None
    image_path: str | None = None

    def entry(self) -> ToolEntry | None:
        return next((e for e in TABLE if e.name.lower() == self.name.lower()), None)

    @property
    def active(self) -> bool:
        """It loads at boot or starts automatically (Start 0-2)."""
        return self.start is not None and self.start <= AUTO_START

    @property
    def storage(self) -> bool:
        e = self.entry()
        return bool(e and e.storage) or (self.group or "").lower() in STORAGE_GROUPS


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


def noteworthy(tools: tuple[ToolService, ...]) -> list[ToolService]:
    """What the warning names: every VMware/VirtualBox entry present, Hyper-V's only when it starts
    automatically (Windows 7/2008 R2 and later ship them inbox, demand-started on Hyper-V only)."""
    return [t for t in tools if t.vendor != HYPERV or t.start == AUTO_START]


def tools_warning(tools: tuple[ToolService, ...], disable_vmware: bool) -> str | None:
    named = noteworthy(tools)
    if not named:
        return None
    by_vendor: dict[str, list[str]] = {}
    for t in named:
        start = t.start if t.start is not None else "-"
        by_vendor.setdefault(t.vendor, []).append(f"{t.name} (Start={start})")
    had = "; ".join(f"{v}: {', '.join(names)}" for v, names in by_vendor.items())
    tail = ("vmware_tools: disable turns VMware's off (see the receipt); uninstall the rest in the guest"
            if disable_vmware else
            "they do nothing on KVM: uninstall them in the guest, or set vmware_tools: disable")
    return f"other hypervisors' tools are installed: {had}; {tail}"
