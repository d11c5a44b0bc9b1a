"""What gho2kvm changes in a Windows guest beyond its disk driver, as small pure functions.

Each fix turns inspection facts (and the image's options) into :class:`regfile.Op` lists for
registry-merge (``collect_ops`` adds them after the configured change sets), one :class:`Change`
record per edit for the receipt, warnings, and the files to put into the guest. Nothing here runs a
program; :func:`boot_settings` reads a LOCAL copy of the SYSTEM hive through
:mod:`pipeline.guest.hiveread`. The table of all changes with versions, defaults, opt-outs and
sources is ``docs/windows-changes.md``.

* :func:`autoreboot_ops` — ``Control\\CrashControl\\AutoReboot = 0`` (stop screens stay on screen; the
  boot check reads them), ``CrashDumpEnabled`` kept. Opt-out ``keep_autoreboot: true``.
* :func:`cpu_driver_ops` — ``intelppm``/``amdppm``/``AmdK8``/``AmdK7`` set to demand start (3) where they
  are boot/system start (0/1): loaded on a CPU of the other vendor (QEMU's default CPU model is
  AMD's) they stop the guest with 0x7E. Opt-out ``keep_cpu_drivers: true``.
* :func:`vmware_ops` — ``vmware_tools: disable``: Start=4 on the VMware entries of
  :data:`pipeline.model.guest.TABLE` marked ``disable`` (never storage).
* :func:`network_restore` — ``network_restore: static``: a first-boot service that re-applies the
  old static addresses on the new adapter (:func:`firstboot_script`), then deletes itself.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.core.receipts import JsonRecord
from pipeline.guest.hiveread import read_tree
from pipeline.guest.network import NET_CLASS
from pipeline.model.guest import VMWARE, BootSettings, Change, NetInterface, ToolService
from pipeline.registry.regfile import Op, Policy, RegType, encode_dword, encode_multi_sz, encode_sz

CCS = "HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet"
SOURCE = "gho2kvm (guest fixes)"
CRASH_CONTROL = "Control\\CrashControl"
TIME_ZONE = "Control\\TimeZoneInformation"
CPU_DRIVERS = ("intelppm", "amdppm", "AmdK8", "AmdK7")
DEMAND_START, DISABLED = 3, 4
FIRSTBOOT_SERVICE = "gho2kvm-firstboot"
FIRSTBOOT_DIR = "gho2kvm"  # under %SystemRoot%
FIRSTBOOT_SCRIPT = "firstboot.cmd"


def boot_settings(hive_path: str | os.PathLike[str], control_set: str, *, image_id: str | None = None,
                  step: str = "inspect") -> BootSettings:
    """:class:`BootSettings` from a local SYSTEM hive."""
    cs = f"\\{control_set}"
    control = read_tree(hive_path, f"{cs}\\Control", max_depth=2, image_id=image_id, step=step)
    services = read_tree(hive_path, f"{cs}\\Services", max_depth=2, image_id=image_id, step=step)
    cpu: list[tuple[str, int | None]] = []
    for name in CPU_DRIVERS:
        if services is not None and services.has(name):
            cpu.append((name, services.dword(name, "Start")))
    if control is None:
        return BootSettings(cpu_drivers=tuple(cpu))
    return BootSettings(auto_reboot=control.dword("CrashControl", "AutoReboot"),
                        crash_dump_enabled=control.dword("CrashControl", "CrashDumpEnabled"),
                        real_time_is_universal=control.dword("TimeZoneInformation", "RealTimeIsUniversal"),
                        cpu_drivers=tuple(cpu))


@dataclass(frozen=True)
class GuestOptions:
    """The image's choices about these fixes (config keys of the same names)."""

    keep_autoreboot: bool = False
    keep_cpu_drivers: bool = False
    keep_boot_geometry: bool = False  # pipeline.guest.ntfsgeom
    vmware_tools: str = "keep"  # keep | disable
    network_restore: str = "off"  # off | static


@dataclass(frozen=True)
class GuestFile(JsonRecord):
    """A file written into the guest: ``path`` below the Windows folder (``gho2kvm\\firstboot.cmd``)."""

    path: str
    text: str  # CRLF line ends, ASCII
    why: str


@dataclass(frozen=True)
class FixPlan:
    ops: tuple[Op, ...] = ()
    changes: tuple[Change, ...] = ()
    warnings: tuple[str, ...] = ()
    files: tuple[GuestFile, ...] = ()


def _dword(key: str, name: str, value: int, policy: Policy = Policy.FORCE) -> Op:
    """A DWORD set to ``value``; ``policy`` (pipeline.registry.edits): ``force`` adds or changes it,
    ``existing`` only where the guest has the key (a service it does not have is not created)."""
    return Op(key=f"{CCS}\\{key}", name=name, type=RegType.DWORD, data=encode_dword(value), file=SOURCE,
              policy=policy)


def _sz(key: str, name: str, value: str, kind: int = RegType.SZ) -> Op:
    return Op(key=f"{CCS}\\{key}", name=name, type=kind, data=encode_sz(value), file=SOURCE,
              policy=Policy.FORCE)


def _shown(v: int | None) -> str:
    return "absent" if v is None else str(v)


def autoreboot_ops(settings: BootSettings) -> tuple[list[Op], list[Change]]:
    """AutoReboot=0 in the live set (always written: an absent value means 1 to Windows)."""
    crash = f"CrashDumpEnabled {_shown(settings.crash_dump_enabled)} kept"
    ops = [_dword(CRASH_CONTROL, "AutoReboot", 0)]
    return ops, [Change("autoreboot", f"CurrentControlSet\\{CRASH_CONTROL}", "AutoReboot",
                        _shown(settings.auto_reboot), "0",
                        f"a stop screen stays on screen instead of rebooting into it again ({crash})")]


def cpu_driver_ops(settings: BootSettings) -> tuple[list[Op], list[Change]]:
    """Demand start for a CPU power driver that is boot/system start (loaded whatever the CPU)."""
    ops, changes = [], []
    for name, start in settings.cpu_drivers:
        if start is not None and start <= 1:
            ops.append(_dword(f"Services\\{name}", "Start", DEMAND_START, Policy.EXISTING))
            changes.append(Change("cpu-driver", f"CurrentControlSet\\Services\\{name}", "Start", str(start),
                                  str(DEMAND_START), "loaded at boot on a CPU of the other vendor (QEMU's "
                                  "default CPU model is AMD's) it stops the guest with 0x7E; demand start "
                                  "lets PnP load it only for its own CPU"))
    return ops, changes


def vmware_ops(tools: Sequence[ToolService]) -> tuple[list[Op], list[Change], list[str]]:
    """Start=4 on every installed VMware entry marked ``disable`` (never a storage driver)."""
    ops, changes, notes = [], [], []
    for t in tools:
        entry = t.entry()
        if entry is None or entry.vendor != VMWARE or not entry.disable:
            continue
        if t.storage:
            notes.append(f"vmware_tools: disable: {t.name} left as it is (group {t.group!r}: boot storage)")
            continue
        if t.start == DISABLED:
            continue
        ops.append(_dword(f"Services\\{t.name}", "Start", DISABLED, Policy.EXISTING))
        changes.append(Change("vmware-tools", f"CurrentControlSet\\Services\\{t.name}", "Start",
                              _shown(t.start), str(DISABLED), f"{entry.what}: nothing for it on KVM"))
    return ops, changes, notes


# ---------------------------------------------------------------------------------------------
# network restore


def restore_candidate(ifaces: Sequence[NetInterface]) -> tuple[NetInterface | None, list[NetInterface]]:
    """The static interface re-applied on the new (only) NIC: the first with an adapter and a
    gateway, else the first static one; and the other static ones (not carried)."""
    static = [i for i in ifaces if i.static]
    if not static:
        return None, []
    best = sorted(static, key=lambda i: (i.adapter is None, not i.gateways))[0]
    return best, [i for i in static if i is not best]


def _q(s: str) -> str:
    """A value for the script: cmd's special characters are refused by :func:`_safe`."""
    return s.replace('"', "")


def _safe(values: Sequence[str]) -> bool:
    return all(not set(v) & set('%^&|<>"!\r\n') for v in values)


def netsh_commands(iface: NetInterface, major: int, minor: int, name: str = "%NAME%") -> list[str]:
    """The netsh commands that set ``iface``'s addresses on the adapter called ``name``.

    Windows 2000/XP/2003 (5.x): ``netsh interface ip set address ... gwmetric=`` and ``set dns``/``add
    dns`` (XP's syntax needs a gateway metric with every gateway). Vista and later (6.x, 10.x): the
    ``interface ipv4`` context with ``address=``, ``set dnsservers``/``add dnsservers`` (``validate=no``
    from 7/2008 R2 on, where it exists: no DNS round trip before the server is reachable) and
    IPv6 DNS servers through ``interface ipv6``. netsh exists on every version; PowerShell's
    ``New-NetIPAddress`` only from 8/2012 on."""
    n = f'name="{name}"'
    masks = list(iface.masks) + ["255.255.255.0"] * (len(iface.addresses) - len(iface.masks))
    metrics = list(iface.gateway_metrics) + [0] * (len(iface.gateways) - len(iface.gateway_metrics))
    out: list[str] = []
    if major < 6:
        gw = (f"gateway={iface.gateways[0]} gwmetric={metrics[0] or 1}" if iface.gateways else "gateway=none")
        out.append(f"netsh interface ip set address {n} source=static addr={iface.addresses[0]} "
                   f"mask={masks[0]} {gw}")
        out += [f"netsh interface ip add address {n} addr={a} mask={m}"
                for a, m in zip(iface.addresses[1:], masks[1:], strict=True)]
        out += [f"netsh interface ip add address {n} gateway={g} gwmetric={m or i + 2}"
                for i, (g, m) in enumerate(zip(iface.gateways[1:], metrics[1:], strict=True))]
        if iface.dns_servers:
            out.append(f"netsh interface ip set dns {n} source=static addr={iface.dns_servers[0]} "
                       f"register=primary")
            out += [f"netsh interface ip add dns {n} addr={d} index={i + 2}"
                    for i, d in enumerate(iface.dns_servers[1:])]
        return out
    validate = " validate=no" if (major, minor) >= (6, 1) else ""
    gw = f" gateway={iface.gateways[0]}" + (f" gwmetric={metrics[0]}" if metrics[0] else "") \
        if iface.gateways else ""
    out.append(f"netsh interface ipv4 set address {n} source=static address={iface.addresses[0]} "
               f"mask={masks[0]}{gw}")
    out += [f"netsh interface ipv4 add address {n} address={a} mask={m}"
            for a, m in zip(iface.addresses[1:], masks[1:], strict=True)]
    out += [f"netsh interface ipv4 add address {n} gateway={g}" + (f" gwmetric={m}" if m else "")
            for g, m in zip(iface.gateways[1:], metrics[1:], strict=True)]
    if iface.dns_servers:
        out.append(f"netsh interface ipv4 set dnsservers {n} source=static address={iface.dns_servers[0]} "
                   f"register=primary{validate}")
        out += [f"netsh interface ipv4 add dnsservers {n} address={d} index={i + 2}{validate}"
                for i, d in enumerate(iface.dns_servers[1:])]
    out += [f"netsh interface ipv6 add dnsservers {n} address={d} index={i + 1}{validate}"
            for i, d in enumerate(iface.ipv6_dns_servers)]
    return out


def firstboot_script(iface: NetInterface, old_guids: Sequence[str], major: int, minor: int,
                     image_id: str) -> str:
    """The first-boot batch file (CRLF, ASCII). It waits (up to 10 minutes) for a network adapter
    whose GUID the old guest did not have and whose PnP id is a PCI device — the new NIC, once PnP
    has installed it — reads its connection name, runs :func:`netsh_commands` on it, sets the DNS
    suffix, logs every command and its exit code to ``%SystemRoot%\\gho2kvm\\firstboot.log``, then
    deletes its service and itself. Only built-in tools: cmd, reg, netsh, sc, ping (as a sleep:
    XP has no ``timeout``)."""
    net = f"HKLM\\SYSTEM\\CurrentControlSet\\Control\\Network\\{NET_CLASS}"
    log = "%SystemRoot%\\gho2kvm\\firstboot.log"
    lines = [
        "@echo off",
        f"rem gho2kvm first boot for image {image_id}: the new network adapter gets what the old one had:",
        f"rem {iface.describe()}",
        f"rem Runs once from the service {FIRSTBOOT_SERVICE}, then deletes the service and this file.",
        "setlocal enableextensions",
        f'set LOG={log}',
        f'set NETKEY={net}',
        'echo %DATE% %TIME% gho2kvm first boot started >> "%LOG%"',
        "set TRIES=0",
        ":wait",
        "set NEWGUID=",
        "set NAME=",
        'for /f "delims=" %%k in (\'reg query "%NETKEY%" 2^>nul\') do call :consider "%%k"',
        "if defined NAME goto found",
        "set /a TRIES+=1",
        "if %TRIES% GEQ 120 goto giveup",
        "ping -n 6 127.0.0.1 >nul",
        "goto wait",
        "",
        ":consider",
        "if defined NAME goto :eof",
        "set K=%~1",
        "set G=%K:~-38%",
        'if not "%G:~0,1%"=="{" goto :eof',
        f"for %%o in ({' '.join(old_guids) or '{}'}) do if /i \"%%o\"==\"%G%\" goto :eof",
        "set PNP=",
        'for /f "tokens=2*" %%a in (\'reg query "%K%\\Connection" /v PnpInstanceID 2^>nul ^| find "REG_SZ"\')'
        " do set PNP=%%b",
        "if not defined PNP goto :eof",
        'if /i not "%PNP:~0,4%"=="PCI\\" goto :eof',
        'for /f "tokens=2*" %%a in (\'reg query "%K%\\Connection" /v Name 2^>nul ^| find "REG_SZ"\')'
        " do set NAME=%%b",
        "if defined NAME set NEWGUID=%G%",
        "goto :eof",
        "",
        ":found",
        'echo new adapter %NEWGUID% "%NAME%" (%PNP%) >> "%LOG%"',
        "ping -n 11 127.0.0.1 >nul",
    ]
    for cmd in netsh_commands(iface, major, minor):
        lines += [f'echo {cmd} >> "%LOG%"', f'{cmd} >> "%LOG%" 2>&1', 'echo exit %ERRORLEVEL% >> "%LOG%"']
    if iface.dns_suffix:
        cmd = ('reg add "HKLM\\SYSTEM\\CurrentControlSet\\Services\\Tcpip\\Parameters\\Interfaces\\%NEWGUID%"'
               f' /v Domain /t REG_SZ /d "{_q(iface.dns_suffix)}" /f')
        lines += [f'echo {cmd} >> "%LOG%"', f'{cmd} >> "%LOG%" 2>&1', 'echo exit %ERRORLEVEL% >> "%LOG%"']
    lines += [
        "goto done",
        "",
        ":giveup",
        'echo no new network adapter appeared in 10 minutes: nothing applied >> "%LOG%"',
        "",
        ":done",
        'echo %DATE% %TIME% gho2kvm first boot finished >> "%LOG%"',
        f'sc delete {FIRSTBOOT_SERVICE} >> "%LOG%" 2>&1 || '
        f'reg delete "HKLM\\SYSTEM\\CurrentControlSet\\Services\\{FIRSTBOOT_SERVICE}" /f >> "%LOG%" 2>&1',
        'del "%~f0"',
    ]
    return "\r\n".join(lines) + "\r\n"


def firstboot_service_ops() -> list[Op]:
    """The service that runs the script at every boot until the script deletes it: own process
    (0x10), auto start, errors ignored (a failing start never triggers Last Known Good), LocalSystem.
    ``cmd /c start`` detaches the script, so the service control manager's 30 s wait for a service
    that never reports "running" does not cut it short."""
    key = f"Services\\{FIRSTBOOT_SERVICE}"
    image = (f"%SystemRoot%\\System32\\cmd.exe /c start \"{FIRSTBOOT_SERVICE}\" /min "
             f"%SystemRoot%\\System32\\cmd.exe /c %SystemRoot%\\{FIRSTBOOT_DIR}\\{FIRSTBOOT_SCRIPT}")
    return [
        Op(key=f"{CCS}\\{key}", file=SOURCE, policy=Policy.FORCE),
        _dword(key, "Type", 0x10),
        _dword(key, "Start", 2),
        _dword(key, "ErrorControl", 0),
        _sz(key, "ImagePath", image, RegType.EXPAND_SZ),
        _sz(key, "ObjectName", "LocalSystem"),
        _sz(key, "DisplayName", "gho2kvm first boot (deletes itself)"),
        _sz(key, "Description", f"Re-applies the network settings the guest had before the migration; "
                                f"log: %SystemRoot%\\{FIRSTBOOT_DIR}\\firstboot.log"),
        Op(key=f"{CCS}\\{key}", name="DependOnService", type=RegType.MULTI_SZ,
           data=encode_multi_sz(["Tcpip"]), file=SOURCE, policy=Policy.FORCE),
    ]


def network_restore(ifaces: Sequence[NetInterface], major: int, minor: int,
                    image_id: str) -> tuple[list[Op], list[Change], list[str], list[GuestFile]]:
    """``network_restore: static``: the first-boot service and script for :func:`restore_candidate`."""
    best, others = restore_candidate(ifaces)
    if best is None:
        return [], [], ["network_restore: static: the guest had no static interface; nothing to restore"], []
    if (major, minor) < (5, 1):
        return [], [], [f"network_restore: static needs Windows XP/2003 or later (reg.exe), not "
                         f"{major}.{minor}: set {best.describe()} in the guest"], []
    values = [*best.addresses, *best.masks, *best.gateways, *best.dns_servers, *best.ipv6_dns_servers,
              best.dns_suffix or "", best.adapter or "", best.driver or ""]
    if not _safe(values):
        return [], [], [f"network_restore: static: {best.where()} has values cmd cannot carry safely; "
                         f"set them in the guest"], []
    warnings = [f"network_restore: static: only {best.where()} is re-applied (the domain has one NIC); "
                f"not carried: {'; '.join(o.describe() for o in others)}"] if others else []
    if major < 6 and best.ipv6_dns_servers:
        warnings.append("network_restore: static: IPv6 DNS servers are not re-applied on XP/2003")
    script = firstboot_script(best, [i.guid for i in ifaces], major, minor, image_id)
    ops = firstboot_service_ops()
    path = f"{FIRSTBOOT_DIR}\\{FIRSTBOOT_SCRIPT}"
    changes = [Change("network-restore", f"CurrentControlSet\\Services\\{FIRSTBOOT_SERVICE}", None, "absent",
                      "auto-start service", f"runs %SystemRoot%\\{path} at first boot, which deletes both"),
               Change("network-restore", f"%SystemRoot%\\{path}", None, "absent", "written",
                      f"re-applies {best.describe()} on the new adapter")]
    return ops, changes, warnings, [GuestFile(path, script, f"re-apply {best.where()}")]


def guest_fixes(settings: BootSettings | None, tools: Sequence[ToolService],
                ifaces: Sequence[NetInterface], options: GuestOptions, *, major: int, minor: int,
                image_id: str) -> FixPlan:
    """Every fix for one Windows guest, in a fixed order."""
    settings = settings or BootSettings()
    ops: list[Op] = []
    changes: list[Change] = []
    warnings: list[str] = []
    files: list[GuestFile] = []
    if not options.keep_autoreboot:
        o, c = autoreboot_ops(settings)
        ops += o
        changes += c
    if not options.keep_cpu_drivers:
        o, c = cpu_driver_ops(settings)
        ops += o
        changes += c
    if options.vmware_tools == "disable":
        o, c, notes = vmware_ops(tools)
        ops += o
        changes += c
        warnings += notes
    if options.network_restore == "static":
        o, c, w, f = network_restore(ifaces, major, minor, image_id)
        ops += o
        changes += c
        warnings += w
        files += f
    return FixPlan(tuple(ops), tuple(changes), tuple(warnings), tuple(files))
