"""The guest fixes on local hives built like the fake disks' (hivex, no appliance): the old network,
other hypervisors' tools, boot settings, and what registry-merge writes for them (applied to the hive
and read back), the first-boot script and its netsh commands per Windows version."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.app import fakedisk
from pipeline.guest import fixes, hypervisor_tools, network
from pipeline.model import guest as model_guest
from pipeline.model.inspect import InspectFacts
from pipeline.registry import hive, regfile
from pipeline.registry.plan import HIVE_PREFIXES, plan
from pipeline.steps.inspect import system_hive_facts
from pipeline.steps.registry_merge import MergeInput, collect_ops, guest_warnings
from pipeline.tools import hivex
from tests.support import guest_hives as gh

W7 = dataclasses.replace(fakedisk.WIN7, system_reg_extra=gh.win7_vmware())
XP = dataclasses.replace(fakedisk.XP, system_reg_extra=gh.xp_virtualbox())
W10 = dataclasses.replace(fakedisk.WIN10, system_reg_extra=gh.win10_dhcp())
CS = {"w7": "ControlSet002", "xp": "ControlSet001", "w10": "ControlSet001"}
SPECS = {"w7": W7, "xp": XP, "w10": W10}


@pytest.fixture(scope="module")
def hives(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One SYSTEM hive per guest."""
    folder = tmp_path_factory.mktemp("hives")
    return {name: gh.system_hive(folder / name, spec) for name, spec in SPECS.items()}


_FACTS: dict[Path, InspectFacts] = {}


def facts_of(hive_path: Path, name: str) -> InspectFacts:
    if hive_path not in _FACTS:
        _FACTS[hive_path] = _read_facts(hive_path, name)
    return _FACTS[hive_path]


def _read_facts(hive_path: Path, name: str) -> InspectFacts:
    spec = SPECS[name]
    major, _, minor = spec.version.partition(".")
    return InspectFacts.from_dict({"os": "windows", "major_version": int(major), "minor_version": int(minor),
                                   "current_control_set": CS[name], "product_name": spec.product,
                                   **system_hive_facts(hive_path, CS[name], "t")[0]})


def test_static_interfaces_with_adapter_and_driver(hives: dict[str, Path]) -> None:
    lan, backup, stale = network.interfaces(hives["w7"], "ControlSet002")
    assert (lan.adapter, lan.driver, lan.static, lan.dhcp) == ("Local Area Connection", "vmxnet3ndis6", True,
                                                               False)
    assert lan.cidrs() == ("10.3.58.5/24", "10.3.58.6/24")
    assert (lan.gateways, lan.dns_servers, lan.dns_suffix) == (("10.3.58.1",), ("10.3.58.4", "10.3.58.8"),
                                                               "corp.example")
    assert lan.ipv6_dns_servers == ("fd00::53",)
    assert lan.pnp_instance.startswith("PCI\\VEN_15AD&DEV_07B0")
    # the driver found through the net class entry when Enum has none
    assert (backup.adapter, backup.driver, backup.cidrs(), backup.gateways) == (
        "Backup", "vmxnet3ndis6", ("192.168.77.5/16",), ())
    assert (stale.static, stale.dhcp, stale.dhcp_address, stale.adapter) == (False, True, "192.168.1.44",
                                                                              None)


def test_a_dirty_hive_reads_the_same(hives: dict[str, Path], tmp_path: Path) -> None:
    """Sequence numbers differ (unflushed logs, as Windows leaves a running system's hive): hivex
    reads the primary file as it is; the facts are those of the clean copy."""
    dirty = tmp_path / "dirty"
    dirty.write_bytes(hives["w7"].read_bytes())
    gh.make_dirty(dirty)
    assert dirty.read_bytes()[4:8] != dirty.read_bytes()[8:12]
    assert _read_facts(dirty, "w7") == facts_of(hives["w7"], "w7")


def test_only_the_live_control_set_is_read(tmp_path: Path) -> None:
    spec = dataclasses.replace(fakedisk.WIN7, system_reg_extra=gh.win7_vmware("ControlSet001"))
    h = gh.system_hive(tmp_path / "S", spec)
    assert network.interfaces(h, "ControlSet002") == ()
    assert len(network.interfaces(h, "ControlSet001")) == 3


def test_static_warning_names_address_adapter_and_driver(hives: dict[str, Path]) -> None:
    facts = facts_of(hives["w7"], "w7")
    [net_warning, tools_warning] = facts.warnings
    assert net_warning.startswith("the guest used static 10.3.58.5/24, 10.3.58.6/24 gateway 10.3.58.1 DNS "
                                  "10.3.58.4, 10.3.58.8")
    assert "on 'Local Area Connection' (vmxnet3ndis6)" in net_warning
    assert "static 192.168.77.5/16 on 'Backup'" in net_warning
    assert "the new NIC will use DHCP" in net_warning and "network_restore: static" in net_warning
    assert "VMware Tools: VMTools (Start=2)" in tools_warning and "vmci (Start=0)" in tools_warning
    assert "vmicheartbeat" not in tools_warning  # Windows 7's inbox integration service, demand start


def test_dhcp_guest_has_no_network_warning(hives: dict[str, Path]) -> None:
    facts = facts_of(hives["w10"], "w10")
    [only] = facts.network
    assert (only.dhcp, only.adapter, only.dhcp_address) == (True, "Ethernet0", "10.20.0.15")
    assert not any("static" in w for w in facts.warnings)
    assert not any("vmbus" in w or "vmicshutdown" in w for w in facts.warnings)


def test_facts_survive_inspect_json(hives: dict[str, Path]) -> None:
    facts = facts_of(hives["xp"], "xp")
    again = InspectFacts.from_dict(facts.to_dict())
    assert again == facts
    assert isinstance(again.network[0], model_guest.NetInterface)
    assert isinstance(again.hypervisor_tools[0], model_guest.ToolService)
    assert again.boot_settings == model_guest.BootSettings(auto_reboot=1, crash_dump_enabled=3,
                                                     real_time_is_universal=1, cpu_drivers=(("intelppm", 1),))


def test_virtualbox_and_vmware_listed_with_start(hives: dict[str, Path]) -> None:
    xp = {t.name: (t.vendor, t.start) for t in hypervisor_tools.installed(hives["xp"], "ControlSet001")}
    vbox = model_guest.VIRTUALBOX
    assert xp == {"VBoxService": (vbox, 2), "VBoxGuest": (vbox, 1), "VBoxMouse": (vbox, 3),
                  "VBoxSF": (vbox, 2)}
    w7 = {t.name: t for t in hypervisor_tools.installed(hives["w7"], "ControlSet002")}
    assert w7["pvscsi"].storage and w7["vmrawdsk"].storage and not w7["vmci"].storage


def _apply(hive_path: Path, inp: MergeInput, tmp_path: Path) -> Path:
    """What registry-merge writes into the SYSTEM hive for ``inp`` (a copy of ``hive_path``)."""
    out = tmp_path / "merged"
    out.write_bytes(hive_path.read_bytes())
    ops, _warnings = collect_ops(inp)
    planned = plan(ops, inp.facts.control_set)
    if "SYSTEM" in planned:
        hive.apply_reg(out, regfile.to_reg_text(planned["SYSTEM"]), HIVE_PREFIXES["SYSTEM"])
    return out


def _values(h: Path, key: str) -> dict[str, object]:
    text = hivex.export(h, key, max_depth=1, missing_ok=True, step="registry-merge")
    if text is None:
        return {}
    return {op.name: op.value for op in regfile.parse_text(text) if not op.is_key}


def _inp(facts: InspectFacts, **guest: object) -> MergeInput:
    return MergeInput(image_id="t", image_dir=Path("/nonexistent"), registry=(),
                      guest=fixes.GuestOptions(**guest), facts=facts)  # type: ignore[arg-type]


def test_defaults_autoreboot_off_dump_kept_tools_kept(hives: dict[str, Path], tmp_path: Path) -> None:
    facts = facts_of(hives["w7"], "w7")
    merged = _apply(hives["w7"], _inp(facts), tmp_path)
    crash = _values(merged, "\\ControlSet002\\Control\\CrashControl")
    assert (crash["AutoReboot"], crash["CrashDumpEnabled"], crash["LogEvent"]) == (0, 7, 1)
    assert _values(merged, "\\ControlSet002\\Services\\VMTools")["Start"] == 2  # keep is the default
    assert _values(merged, "\\ControlSet001\\Control\\CrashControl") == {}  # not the live set
    assert not _values(merged, "\\ControlSet002\\Services\\gho2kvm-firstboot")


def test_keep_autoreboot_opts_out(hives: dict[str, Path], tmp_path: Path) -> None:
    facts = facts_of(hives["w7"], "w7")
    merged = _apply(hives["w7"], _inp(facts, keep_autoreboot=True), tmp_path)
    assert _values(merged, "\\ControlSet002\\Control\\CrashControl")["AutoReboot"] == 1
    assert [c.fix for c in fixes.guest_fixes(facts.boot_settings, (), (), fixes.GuestOptions(
        keep_autoreboot=True), major=6, minor=1, image_id="t").changes] == []


def test_autoreboot_written_where_crashcontrol_is_missing(tmp_path: Path) -> None:
    h = gh.system_hive(tmp_path / "S", fakedisk.WIN10)  # no CrashControl key at all
    facts = facts_of(h, "w10")
    assert facts.boot_settings.auto_reboot is None
    merged = _apply(h, _inp(facts), tmp_path)
    assert _values(merged, "\\ControlSet001\\Control\\CrashControl") == {"AutoReboot": 0}
    [change] = fixes.autoreboot_ops(facts.boot_settings)[1]
    assert (change.was, change.now) == ("absent", "0")


def test_vmware_disable_never_touches_storage(hives: dict[str, Path], tmp_path: Path) -> None:
    facts = facts_of(hives["w7"], "w7")
    inp = _inp(facts, vmware_tools="disable")
    merged = _apply(hives["w7"], inp, tmp_path)
    start = {n: _values(merged, f"\\ControlSet002\\Services\\{n}").get("Start")
             for n in ("VMTools", "VGAuthService", "vmci", "vsock", "vmhgfs", "vmmouse", "vm3dmp",
                       "vmxnet3ndis6", "vmmemctl", "pvscsi", "vmrawdsk", "vmicheartbeat")}
    assert start == {"VMTools": 4, "VGAuthService": 4, "vmci": 4, "vsock": 4, "vmhgfs": 4, "vmmouse": 4,
                     "vm3dmp": 4, "vmxnet3ndis6": 4, "vmmemctl": 4, "pvscsi": 0, "vmrawdsk": 1,
                     "vmicheartbeat": 3}
    changes = {c.key.rsplit("\\", 1)[1]: (c.was, c.now) for c in
               fixes.guest_fixes(facts.boot_settings, facts.hypervisor_tools, facts.network, inp.guest,
                                 major=6, minor=1, image_id="t").changes if c.fix == "vmware-tools"}
    assert changes["VMTools"] == ("2", "4") and "pvscsi" not in changes and "vmrawdsk" not in changes
    assert any("vmrawdsk left as it is" in w for w in guest_warnings(inp))


def test_cpu_driver_boot_start_made_demand_start(hives: dict[str, Path], tmp_path: Path) -> None:
    xp = facts_of(hives["xp"], "xp")
    merged = _apply(hives["xp"], _inp(xp), tmp_path)
    assert _values(merged, "\\ControlSet001\\Services\\intelppm")["Start"] == 3
    kept = _apply(hives["xp"], _inp(xp, keep_cpu_drivers=True), tmp_path)
    assert _values(kept, "\\ControlSet001\\Services\\intelppm")["Start"] == 1
    w10 = facts_of(hives["w10"], "w10")  # already demand start: nothing to change
    assert [c.fix for c in fixes.cpu_driver_ops(w10.boot_settings)[1]] == []


def test_network_restore_registers_the_first_boot_service(hives: dict[str, Path], tmp_path: Path) -> None:
    facts = facts_of(hives["w7"], "w7")
    inp = _inp(facts, network_restore="static")
    merged = _apply(hives["w7"], inp, tmp_path)
    svc = _values(merged, "\\ControlSet002\\Services\\gho2kvm-firstboot")
    assert (svc["Type"], svc["Start"], svc["ErrorControl"], svc["ObjectName"]) == (0x10, 2, 0, "LocalSystem")
    assert svc["ImagePath"] == ("%SystemRoot%\\System32\\cmd.exe /c start \"gho2kvm-firstboot\" /min "
                                "%SystemRoot%\\System32\\cmd.exe /c %SystemRoot%\\gho2kvm\\firstboot.cmd")
    assert svc["DependOnService"] == ["Tcpip"]
    warnings = guest_warnings(inp)
    assert any("re-applies the settings at first boot" in w for w in warnings)
    assert any("only 'Local Area Connection' (vmxnet3ndis6) is re-applied" in w and "192.168.77.5/16" in w
               for w in warnings)
    plan_ = fixes.guest_fixes(facts.boot_settings, facts.hypervisor_tools, facts.network, inp.guest,
                              major=6, minor=1, image_id="t")
    [script] = plan_.files
    assert script.path == "gho2kvm\\firstboot.cmd"
    assert [c.fix for c in plan_.changes] == ["autoreboot", "network-restore", "network-restore"]


def test_network_restore_without_static_interface_says_so(hives: dict[str, Path]) -> None:
    facts = facts_of(hives["w10"], "w10")
    inp = _inp(facts, network_restore="static")
    assert "the guest had no static interface; nothing to restore" in " ".join(guest_warnings(inp))
    assert collect_ops(inp)[0] == collect_ops(_inp(facts))[0]


LAN = model_guest.NetInterface(guid=gh.G_LAN, dhcp=False, addresses=("10.3.58.5", "10.3.58.6"),
                           masks=("255.255.255.0", "255.255.255.0"), gateways=("10.3.58.1", "10.3.58.254"),
                           gateway_metrics=(0, 20), dns_servers=("10.3.58.4", "10.3.58.8"),
                           dns_suffix="corp.example", ipv6_dns_servers=("fd00::53",),
                           adapter="Local Area Connection", driver="vmxnet3ndis6")


def test_netsh_xp_2003_syntax() -> None:
    for minor in (1, 2):
        assert fixes.netsh_commands(LAN, 5, minor) == [
            'netsh interface ip set address name="%NAME%" source=static addr=10.3.58.5 mask=255.255.255.0 '
            "gateway=10.3.58.1 gwmetric=1",
            'netsh interface ip add address name="%NAME%" addr=10.3.58.6 mask=255.255.255.0',
            'netsh interface ip add address name="%NAME%" gateway=10.3.58.254 gwmetric=20',
            'netsh interface ip set dns name="%NAME%" source=static addr=10.3.58.4 register=primary',
            'netsh interface ip add dns name="%NAME%" addr=10.3.58.8 index=2',
        ]  # no IPv6 DNS on XP/2003 (warned)
    no_gw = dataclasses.replace(LAN, gateways=(), gateway_metrics=(), addresses=("10.0.0.9",), masks=())
    assert fixes.netsh_commands(no_gw, 5, 1)[0].endswith("addr=10.0.0.9 mask=255.255.255.0 gateway=none")


def test_netsh_vista_and_later_syntax() -> None:
    w7 = fixes.netsh_commands(LAN, 6, 1)
    assert w7 == [
        'netsh interface ipv4 set address name="%NAME%" source=static address=10.3.58.5 mask=255.255.255.0 '
        "gateway=10.3.58.1",
        'netsh interface ipv4 add address name="%NAME%" address=10.3.58.6 mask=255.255.255.0',
        'netsh interface ipv4 add address name="%NAME%" gateway=10.3.58.254 gwmetric=20',
        'netsh interface ipv4 set dnsservers name="%NAME%" source=static address=10.3.58.4 register=primary '
        "validate=no",
        'netsh interface ipv4 add dnsservers name="%NAME%" address=10.3.58.8 index=2 validate=no',
        'netsh interface ipv6 add dnsservers name="%NAME%" address=fd00::53 index=1 validate=no',
    ]
    assert fixes.netsh_commands(LAN, 10, 0) == w7
    vista = fixes.netsh_commands(LAN, 6, 0)  # validate= came with 7/2008 R2
    assert vista == [c.replace(" validate=no", "") for c in w7]


def test_first_boot_script_waits_applies_logs_and_removes_itself() -> None:
    text = fixes.firstboot_script(LAN, [gh.G_LAN, gh.G_DHCP], 5, 1, "xp1")
    assert text.isascii() and text.endswith("\r\n") and "\n" not in text.replace("\r\n", "")
    lines = text.split("\r\n")
    assert f"for %%o in ({gh.G_LAN} {gh.G_DHCP}) do if /i \"%%o\"==\"%G%\" goto :eof" in lines
    assert "ping -n 6 127.0.0.1 >nul" in lines  # XP has no timeout.exe
    assert 'if /i not "%PNP:~0,4%"=="PCI\\" goto :eof' in lines  # a PCI NIC, not a RAS/1394 adapter
    for cmd in fixes.netsh_commands(LAN, 5, 1):
        i = lines.index(f'{cmd} >> "%LOG%" 2>&1')
        assert lines[i - 1] == f'echo {cmd} >> "%LOG%"'
        assert lines[i + 1] == 'echo exit %ERRORLEVEL% >> "%LOG%"'
    assert any('/v Domain /t REG_SZ /d "corp.example" /f' in ln for ln in lines)
    assert lines.index(":giveup") < lines.index(":done")
    assert lines[-3].startswith("sc delete gho2kvm-firstboot") and lines[-2] == 'del "%~f0"'


@pytest.mark.parametrize("bad", ["Local & Area", "100%", "a|b", 'q"uote'])
def test_values_cmd_cannot_carry_are_not_scripted(bad: str) -> None:
    iface = dataclasses.replace(LAN, adapter=bad)
    ops, _changes, warnings, files = fixes.network_restore([iface], 6, 1, "t")
    assert (ops, files) == ([], []) and "cmd cannot carry safely" in warnings[0]


def test_network_restore_refused_on_windows_2000() -> None:
    _ops, _c, warnings, files = fixes.network_restore([LAN], 5, 0, "t")
    assert files == [] and "needs Windows XP/2003 or later" in warnings[0]


def _boot_sector(spt: int, heads: int, total: int = 100_000) -> bytes:
    b = bytearray(512)
    b[0:3] = b"\xeb\x52\x90"
    b[3:11] = b"NTFS    "
    b[0x18:0x1C] = spt.to_bytes(2, "little") + heads.to_bytes(2, "little")
    b[0x28:0x30] = total.to_bytes(8, "little")
    b[510:512] = b"\x55\xaa"
    return bytes(b)


@pytest.mark.parametrize(("size", "heads"), [
    (64 << 20, 16), (700 << 20, 32), (2114445312 - 512, 64), (2114445312, 128), (4228374780 - 512, 128),
    (4228374780, 255), (40 << 30, 255)])
def test_bios_geometry_by_disk_size(size: int, heads: int) -> None:
    """virt-v2v's measured table (64/128/255 heads at its thresholds), extended below 1 GiB."""

    assert model_guest.bios_geometry(size) == (heads, 63)


@pytest.mark.parametrize(("major", "firmware", "fix"), [(5, "bios", True), (6, "bios", False),
                                                         (10, "bios", False), (5, "uefi", False)])
def test_ntfs_geometry_rewritten_only_for_xp_2003_on_bios(major: int, firmware: str, fix: bool) -> None:
    from pipeline.guest import ntfsgeom

    geom = ntfsgeom.parse(_boot_sector(63, 240), 8 << 30, "/dev/sda1")
    assert geom == model_guest.BootGeometry("/dev/sda1", 63, 240, 8 << 30, 100_000) and geom.mismatch
    facts = InspectFacts(os="windows", major_version=major, minor_version=1, firmware=firmware,
                         boot_geometry=geom)
    assert ntfsgeom.needs_fix(facts) is fix
    if fix:
        assert "says 240 heads/63 sectors per track, the BIOS will report 255/63" in ntfsgeom.warning(facts)
    else:
        assert ntfsgeom.warning(facts) is None  # recorded in the receipt only
    same = ntfsgeom.parse(_boot_sector(63, 255), 8 << 30, "/dev/sda1")
    assert not same.mismatch and ntfsgeom.warning(dataclasses.replace(facts, boot_geometry=same)) is None


def test_ntfs_geometry_needs_an_ntfs_boot_sector() -> None:
    from pipeline.guest import ntfsgeom

    fat = bytearray(_boot_sector(63, 255))
    fat[3:11] = b"MSDOS5.0"
    assert ntfsgeom.parse(bytes(fat), 8 << 30, "/dev/sda1") is None


def test_rebooted_verdict_fails_with_the_last_screen() -> None:
    from pipeline.tools import screen

    assert "rebooted" in screen.FAILURES and "rebooted" in screen.VERDICTS
    stop = screen.Observation("bsod", "text", "*** STOP: 0x0000007B", "0x0000007B",
                              "INACCESSIBLE_BOOT_DEVICE")
    msg = screen.failure_message({"verdict": "rebooted", "message": "the guest restarted itself after 7.5 s",
                                  "hint": screen.reboot_hint(stop), "screenshot": "/w/boot.png"}, "any")
    assert msg == ("boot check: the guest restarted itself after 7.5 s: it showed a stop screen (0x0000007B "
                   "INACCESSIBLE_BOOT_DEVICE) first and rebooted (AutoReboot) (screenshot /w/boot.png)")
    assert "triple fault" in screen.reboot_hint(None)


def test_the_docs_table_is_the_code_table() -> None:
    """docs/windows-changes.md lists every TABLE entry, and the disable column says what the code does."""
    text = (Path(__file__).parent.parent / "docs" / "windows-changes.md").read_text()
    table = text[text.index("| service | vendor | what | `disable` |"):]
    table = table[:table.index("\n\n")]
    for e in model_guest.TABLE:
        row = next((ln for ln in table.splitlines() if e.name in [c.strip() for c in
                                                                  ln.strip("|").split("|")[0].split(",")]),
                   None)
        assert row is not None, f"{e.name} missing from the docs table"
        vmware_storage = e.storage and e.vendor == model_guest.VMWARE
        assert ("Start=4" in row) == e.disable and ("never (storage)" in row) == vmware_storage
