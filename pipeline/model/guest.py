"""What inspect reads from a Windows guest: TCP/IP interfaces, other hypervisors' tools, the boot
settings and geometry of the system partition, and the edits registry-merge makes beyond the change
sets. The readers live in :mod:`pipeline.guest`; these are the types and the rules on them.

:data:`TABLE` is the one list of other hypervisors' tools. Names are the services and drivers as the
vendors' installers register them under ``<ControlSet>\\Services`` (see
:mod:`pipeline.guest.hypervisor_tools`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pipeline.core.receipts import JsonRecord


@dataclass(frozen=True)
class NetInterface(JsonRecord):
    """One TCP/IP interface of the guest as its registry had it."""

    guid: str
    dhcp: bool
    addresses: tuple[str, ...] = ()  # static IPv4 addresses (IPAddress), "0.0.0.0" left out
    masks: tuple[str, ...] = ()  # SubnetMask, one per address
    gateways: tuple[str, ...] = ()  # DefaultGateway
    gateway_metrics: tuple[int, ...] = ()  # DefaultGatewayMetric (empty: automatic)
    dns_servers: tuple[str, ...] = ()  # NameServer (static DNS; with DHCP too, when set by hand)
    dns_suffix: str | None = None  # Domain: the connection-specific DNS suffix
    ipv6_dns_servers: tuple[str, ...] = ()  # Tcpip6 NameServer
    dhcp_address: str | None = None  # DhcpIPAddress: the last lease
    dhcp_mask: str | None = None
    dhcp_gateways: tuple[str, ...] = ()
    dhcp_dns_servers: tuple[str, ...] = ()
    adapter: str | None = None  # Connection\Name ("Local Area Connection")
    pnp_instance: str | None = None  # Connection\PnpInstanceID (PCI\VEN_15AD&DEV_07B0\...)
    driver: str | None = None  # the NIC's driver service (vmxnet3ndis6, E1G60, ...)

    @property
    def static(self) -> bool:
        """Static IPv4 addresses are configured (what a new NIC loses)."""
        return not self.dhcp and bool(self.addresses)

    def cidrs(self) -> tuple[str, ...]:
        """``10.3.58.5/24`` for each address (``/?`` where the mask is missing or not a mask)."""
        return tuple(f"{a}/{prefix_len(m)}" for a, m in zip(self.addresses, self.masks + ("",) * len(
            self.addresses), strict=False))

    def describe(self) -> str:
        """``static 10.3.58.5/24 gateway 10.3.58.1 DNS 10.3.58.4 on 'Local Area Connection' (vmxnet3)``."""
        if self.static:
            out = f"static {', '.join(self.cidrs())}"
            if self.gateways:
                out += f" gateway {', '.join(self.gateways)}"
        else:
            out = "DHCP" + (f" (last lease {self.dhcp_address})" if self.dhcp_address else "")
        if self.dns_servers:
            out += f" DNS {', '.join(self.dns_servers)}"
        if self.ipv6_dns_servers:
            out += f" IPv6 DNS {', '.join(self.ipv6_dns_servers)}"
        if self.dns_suffix:
            out += f" suffix {self.dns_suffix}"
        return out + f" on {self.where()}"

    def where(self) -> str:
        name = f"'{self.adapter}'" if self.adapter else f"interface {self.guid}"
        return name + (f" ({self.driver})" if self.driver else "")


def prefix_len(mask: str) -> str:
    try:
        return str(ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen)
    except ValueError:
        return "?"


def static_warning(ifaces: tuple[NetInterface, ...], restore: bool) -> str | None:
    """The warning when any interface was static: what it had, and what the new NIC will do."""
    static = [i for i in ifaces if i.static]
    if not static:
        return None
    had = "; ".join(i.describe() for i in static)
    if restore:
        return (f"the guest used {had}; the new NIC is a new adapter (DHCP by default): "
                f"network_restore: static re-applies the settings at first boot (see the receipt)")
    return (f"the guest used {had}; the new NIC will use DHCP: set the address in the guest, "
            f"or use network_restore: static")


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


@dataclass(frozen=True)
class BootSettings(JsonRecord):
    """Values of the live control set that decide the fixes (None: absent)."""

    auto_reboot: int | None = None  # CrashControl\AutoReboot (Windows' default 1)
    crash_dump_enabled: int | None = None  # CrashControl\CrashDumpEnabled (kept)
    real_time_is_universal: int | None = None  # TimeZoneInformation\RealTimeIsUniversal (1: RTC in UTC)
    cpu_drivers: tuple[tuple[str, int | None], ...] = ()  # (service, Start) of CPU_DRIVERS present


GEOMETRY_OFFSET = 0x18  # sectors per track (u16), then heads (u16)
PHYSICAL_HEADS, SECTORS = 16, 63  # QEMU's physical geometry of an IDE disk


def bios_geometry(size: int) -> tuple[int, int]:
    """``(heads, sectors per track)`` the BIOS reports for a disk of ``size`` bytes (LBA translation)."""
    heads = PHYSICAL_HEADS
    cylinders = size // (PHYSICAL_HEADS * SECTORS * 512)
    while cylinders > 1024 and heads < 255:
        heads = min(heads * 2, 255)
        cylinders = (cylinders + 1) // 2  # halved, rounded up: virt-v2v's thresholds exactly
    return heads, SECTORS


@dataclass(frozen=True)
class BootGeometry(JsonRecord):
    partition: str  # the system partition (/dev/sda1)
    bpb_sectors: int  # the boot sector's sectors per track
    bpb_heads: int
    disk_size: int  # bytes of the whole disk
    total_sectors: int = 0  # of the volume: the backup boot sector is the sector after them

    @property
    def bios(self) -> tuple[int, int]:
        return bios_geometry(self.disk_size)

    @property
    def mismatch(self) -> bool:
        return (self.bpb_heads, self.bpb_sectors) != self.bios


@dataclass(frozen=True)
class Change(JsonRecord):
    """One edit in the guest, as the receipt shows it."""

    fix: str  # autoreboot | cpu-driver | vmware-tools | network-restore
    key: str  # in the SYSTEM hive, CurrentControlSet = the live set
    value: str | None  # None: a key, or a file
    was: str | None  # "absent" when it did not exist
    now: str | None
    why: str
