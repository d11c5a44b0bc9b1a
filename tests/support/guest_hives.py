"""SYSTEM hive content of real-looking Windows guests for the guest-fix tests: .reg lines (no
header) for :class:`pipeline.app.fakedisk.DiskSpec`'s ``system_reg_extra`` and for local hives built
with :func:`system_hive` (an empty hive from :mod:`pipeline.registry.hive` filled with the fake
disk's own SYSTEM text, so unit tests read the same values an appliance test would).

Values are spelled as a real hive has them: ``IPAddress``/``SubnetMask``/``DefaultGateway`` as
REG_MULTI_SZ, ``NameServer`` a comma-separated REG_SZ, ``EnableDHCP`` a dword, the adapter under
``Control\\Network\\{4D36E972-...}\\{GUID}\\Connection`` and its driver in ``Enum\\<PnpInstanceID>``.
"""

from __future__ import annotations

import struct
from pathlib import Path

from pipeline.app import fakedisk
from pipeline.registry import hive

NET = "{4D36E972-E325-11CE-BFC1-08002BE10318}"
SYS = "HKEY_LOCAL_MACHINE\\SYSTEM"


def multi_sz(*items: str) -> str:
    data = "".join(i + "\0" for i in items).encode("utf-16-le") + b"\0\0"
    return "hex(7):" + ",".join(f"{b:02x}" for b in data)


def _esc(s: str) -> str:
    return s.replace("\\", "\\\\")


def interface(cs: str, guid: str, *, dhcp: bool = False, addresses: tuple[str, ...] = (),
              masks: tuple[str, ...] = (), gateways: tuple[str, ...] = (), metrics: tuple[str, ...] = (),
              dns: tuple[str, ...] = (), suffix: str | None = None, lease: str | None = None,
              ipv6_dns: tuple[str, ...] = (), adapter: str | None = None, pnp: str | None = None,
              service: str | None = None, class_entry: str | None = None) -> list[str]:
    """One TCP/IP interface and (optionally) its adapter, as XP..10 store them."""
    key = f"{SYS}\\{cs}\\Services\\Tcpip\\Parameters\\Interfaces\\{guid}"
    lines = [f"[{key}]", f'"EnableDHCP"=dword:{int(dhcp):08x}',
             f'"IPAddress"={multi_sz(*(addresses or ("0.0.0.0",)))}',
             f'"SubnetMask"={multi_sz(*(masks or ("0.0.0.0",)))}',
             f'"DefaultGateway"={multi_sz(*gateways)}', f'"DefaultGatewayMetric"={multi_sz(*metrics)}',
             f'"NameServer"="{",".join(dns)}"', f'"Domain"="{suffix or ""}"']
    if lease:
        lines += [f'"DhcpIPAddress"="{lease}"', '"DhcpSubnetMask"="255.255.255.0"',
                  f'"DhcpDefaultGateway"={multi_sz(lease.rsplit(".", 1)[0] + ".1")}']
    lines.append("")
    if ipv6_dns:
        lines += [f"[{SYS}\\{cs}\\Services\\Tcpip6\\Parameters\\Interfaces\\{guid}]",
                  f'"NameServer"="{",".join(ipv6_dns)}"', ""]
    if adapter:
        lines += [f"[{SYS}\\{cs}\\Control\\Network\\{NET}\\{guid}\\Connection]", f'"Name"="{adapter}"']
        if pnp:
            lines.append(f'"PnpInstanceID"="{_esc(pnp)}"')
        lines.append("")
    if pnp and service and not class_entry:
        lines += [f"[{SYS}\\{cs}\\Enum\\{pnp}]", f'"Service"="{service}"', ""]
    if class_entry and service:
        lines += [f"[{SYS}\\{cs}\\Control\\Class\\{NET}\\{class_entry}]", f'"NetCfgInstanceId"="{guid}"', "",
                  f"[{SYS}\\{cs}\\Control\\Class\\{NET}\\{class_entry}\\Ndi]", f'"Service"="{service}"', ""]
    return lines


def service(cs: str, name: str, start: int, *, group: str | None = None, kernel: bool = True) -> list[str]:
    lines = [f"[{SYS}\\{cs}\\Services\\{name}]", f'"Start"=dword:{start:08x}',
             f'"Type"=dword:{1 if kernel else 16:08x}', '"ErrorControl"=dword:00000001']
    if group:
        lines.append(f'"Group"="{group}"')
    return [*lines, ""]


def crash_control(cs: str, auto_reboot: int = 1, dump: int = 7, rtiu: int | None = None) -> list[str]:
    lines = [f"[{SYS}\\{cs}\\Control\\CrashControl]", f'"AutoReboot"=dword:{auto_reboot:08x}',
             f'"CrashDumpEnabled"=dword:{dump:08x}', '"LogEvent"=dword:00000001', ""]
    if rtiu is not None:
        lines += [f"[{SYS}\\{cs}\\Control\\TimeZoneInformation]", f'"RealTimeIsUniversal"=dword:{rtiu:08x}',
                  '"StandardName"="W. Europe Standard Time"', ""]
    return lines


G_LAN = "{5A7D4C9E-1B2F-4E63-9C0A-7D1E2F3A4B5C}"
G_BACKUP = "{9C3E1F20-44AB-4D7E-8F11-2B3C4D5E6F70}"
G_DHCP = "{0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0}"
G_RAS = "{E2B5A1C0-0000-4000-8000-000000000001}"


def win7_vmware(cs: str = "ControlSet002") -> tuple[str, ...]:
    """The issue's Windows 7 SP1 VMware VM: two static IPv4 interfaces on vmxnet3 (one with a gateway,
    DNS and suffix, one backup network without), a stale DHCP one, VMware Tools and vmci, pvscsi."""
    lines = [
        *interface(cs, G_LAN, addresses=("10.3.58.5", "10.3.58.6"), masks=("255.255.255.0", "255.255.255.0"),
                   gateways=("10.3.58.1",), metrics=("0",), dns=("10.3.58.4", "10.3.58.8"),
                   suffix="corp.example", ipv6_dns=("fd00::53",), adapter="Local Area Connection",
                   pnp="PCI\\VEN_15AD&DEV_07B0&SUBSYS_07B015AD&REV_01\\FF565000A5B4C3FE00",
                   service="vmxnet3ndis6"),
        *interface(cs, G_BACKUP, addresses=("192.168.77.5",), masks=("255.255.0.0",),
                   adapter="Backup", pnp="PCI\\VEN_15AD&DEV_07B0&SUBSYS_07B015AD&REV_01\\FF565000A5B4C3FE08",
                   service="vmxnet3ndis6", class_entry="0011"),
        *interface(cs, G_DHCP, dhcp=True, lease="192.168.1.44"),
        *crash_control(cs, 1, 7, rtiu=None),
        *service(cs, "VMTools", 2, kernel=False),
        *service(cs, "VGAuthService", 2, kernel=False),
        *service(cs, "vmci", 0, group="System Bus Extender"),
        *service(cs, "vsock", 1),
        *service(cs, "vmhgfs", 1, group="Network"),
        *service(cs, "vmmouse", 3, group="Pointer Port"),
        *service(cs, "vm3dmp", 3, group="Video"),
        *service(cs, "vmxnet3ndis6", 3, group="NDIS"),
        *service(cs, "vmmemctl", 2),
        *service(cs, "pvscsi", 0, group="SCSI miniport"),
        *service(cs, "vmrawdsk", 1, group="SCSI miniport"),  # a table entry in a boot storage group
        *service(cs, "intelppm", 3),
        *service(cs, "vmicheartbeat", 3, kernel=False),  # inbox on 7, demand start: not warned
    ]
    return tuple(lines)


def xp_virtualbox(cs: str = "ControlSet001") -> tuple[str, ...]:
    """An XP guest from VirtualBox: static on its PCnet/e1000 NIC, Guest Additions, intelppm system start,
    a RAS interface without adapter, RTC in UTC."""
    return (
        *interface(cs, G_LAN, addresses=("172.16.4.20",), masks=("255.255.252.0",), gateways=("172.16.4.1",),
                   metrics=("1",), dns=("172.16.4.2",), adapter="Local Area Connection",
                   pnp="PCI\\VEN_8086&DEV_100E&SUBSYS_001E8086&REV_02\\3&267A616A&0&18", service="E1000"),
        *interface(cs, G_RAS),
        *crash_control(cs, 1, 3, rtiu=1),
        *service(cs, "VBoxService", 2, kernel=False),
        *service(cs, "VBoxGuest", 1, group="Base"),
        *service(cs, "VBoxMouse", 3, group="Pointer Port"),
        *service(cs, "VBoxSF", 2, group="Network"),
        *service(cs, "intelppm", 1),
    )


def win10_dhcp(cs: str = "ControlSet001") -> tuple[str, ...]:
    """A Windows 10 VM on DHCP with Hyper-V's inbox integration services (demand start)."""
    return (
        *interface(cs, G_DHCP, dhcp=True, lease="10.20.0.15", adapter="Ethernet0",
                   pnp="PCI\\VEN_15AD&DEV_07B0&SUBSYS_07B015AD&REV_01\\000C29FFFF1234",
                   service="vmxnet3ndis6"),
        *crash_control(cs, 1, 7),
        *service(cs, "VMTools", 2, kernel=False),
        *service(cs, "vm3dmp", 3, group="Video"),
        *service(cs, "vmbus", 0, group="System Bus Extender"),
        *service(cs, "vmicshutdown", 3, kernel=False),
        *service(cs, "intelppm", 3),
        *service(cs, "amdppm", 3),
    )


def system_hive(path: Path, spec: fakedisk.DiskSpec) -> Path:
    """A local SYSTEM hive with exactly the fake disk's SYSTEM content (``spec.system_reg_extra``
    included)."""
    hive.write_empty_hive(path, "SYSTEM")
    hive.apply_reg(path, fakedisk.system_reg(spec), SYS)
    return path


def make_dirty(path: Path) -> None:
    """Mark the hive as Windows leaves one with unflushed changes: primary and secondary sequence
    numbers differ (base block checksum kept valid)."""
    data = bytearray(path.read_bytes())
    seq1, = struct.unpack_from("<I", data, 4)
    struct.pack_into("<I", data, 8, seq1 + 1)
    x = 0
    for (d,) in struct.iter_unpack("<I", bytes(data[:0x1FC])):
        x ^= d
    struct.pack_into("<I", data, 0x1FC, x or 1)
    path.write_bytes(bytes(data))
