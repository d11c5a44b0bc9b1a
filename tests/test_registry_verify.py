"""apply + verify round trips on local hive files (hivex tools, no libguestfs)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from pipeline.registry import (
    HIVE_PREFIXES,
    apply_reg,
    builtin_ops,
    export,
    parse_bytes,
    parse_text,
    plan,
    to_reg_text,
    verify,
    write_empty_hive,
)
from pipeline.registry.regfile import RegType, encode_dword

pytestmark = pytest.mark.skipif(shutil.which("hivexregedit") is None, reason="hivexregedit not installed")

HDR = "Windows Registry Editor Version 5.00\n\n"
SYS = HIVE_PREFIXES["SYSTEM"]


@pytest.fixture
def system_hive(tmp_path):
    """An empty SYSTEM hive with \\Select (Current=2) and two control sets."""
    h = write_empty_hive(tmp_path / "SYSTEM", "SYSTEM")
    apply_reg(h, HDR + "\n\n".join([
        f'[{SYS}\\Select]\n"Current"=dword:00000002\n"Default"=dword:00000002',
        f"[{SYS}\\ControlSet001]",
        f'[{SYS}\\ControlSet001\\Services]\n"marker"=dword:00000001',
        f"[{SYS}\\ControlSet002]",
    ]) + "\n", SYS)
    return h


def _apply(hive, ops):
    apply_reg(hive, to_reg_text(ops), SYS)


def test_mergeide_apply_verify_and_other_control_set_untouched(system_hive):
    before = export(system_hive, "\\ControlSet001")
    ops = plan(builtin_ops("mergeide", 5, 1), "ControlSet002")["SYSTEM"]
    _apply(system_hive, ops)
    assert verify(system_hive, ops, image_id="img") == []
    assert export(system_hive, "\\ControlSet001") == before
    got = {(o.key, o.name): o.value for o in export(system_hive, r"\ControlSet002\Services\atapi")}
    assert got[(r"\ControlSet002\Services\atapi", "Start")] == 0
    cdd = export(system_hive, r"\ControlSet002\Control\CriticalDeviceDatabase\pci#ven_8086&dev_7010")
    assert {o.name: o.value for o in cdd if not o.is_key} == {
        "ClassGUID": "{4D36E96A-E325-11CE-BFC1-08002BE10318}", "Service": "intelide"}


def test_win7_set_on_top_of_existing_services(system_hive):
    existing = HDR + f'[{SYS}\\ControlSet002\\Services]\n\n[{SYS}\\ControlSet002\\Services\\msahci]\n' \
        '"Start"=dword:00000003\n"Type"=dword:00000001\n'
    _apply(system_hive, plan(parse_text(existing), 2)["SYSTEM"])
    ops = plan(builtin_ops("mergeide", 6, 1), "ControlSet002")["SYSTEM"]
    _apply(system_hive, ops)
    assert verify(system_hive, ops) == []
    vals = {o.name: o.value for o in export(system_hive, r"\ControlSet002\Services\msahci") if not o.is_key}
    assert vals == {"Start": 0, "Type": 1}  # merged, not replaced


def test_user_reg_utf16_missing_parents_all_types_and_deletions(system_hive, tmp_path):
    text = HDR.replace("\n", "\r\n") + "\r\n".join([
        r"[HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\Vendor\Parameters\Deep]",
        '"sz"="x \\"y\\" C:\\\\z"',
        '@="default"',
        '"d"=dword:deadbeef',
        '"b"=hex:00,01,\\',
        "  02",
        '"e"=hex(2):25,00,41,00,25,00,00,00',
        '"m"=hex(7):61,00,00,00,00,00',
        '"q"=hex(b):01,00,00,00,00,00,00,00',
        '"gone"=dword:00000001',
        "",
        r"[HKLM\SYSTEM\CurrentControlSet\Services\Vendor\Parameters\Deep]",
        '"gone"=-',
        "",
        r"[HKLM\SYSTEM\CurrentControlSet\Services\Vendor\Tmp\Sub]",
        "",
        r"[-HKLM\SYSTEM\CurrentControlSet\Services\Vendor\Tmp]",
        "",
    ])
    ops = parse_bytes(b"\xff\xfe" + text.encode("utf-16-le"), "user.reg")
    planned = plan(ops, "ControlSet002")["SYSTEM"]
    _apply(system_hive, planned)
    assert verify(system_hive, planned) == []
    deep = export(system_hive, r"\ControlSet002\Services\Vendor\Parameters\Deep")
    got = {o.name: (o.type, o.value) for o in deep if not o.is_key}
    assert got == {
        "sz": (RegType.SZ, 'x "y" C:\\z'), "": (RegType.SZ, "default"), "d": (RegType.DWORD, 0xDEADBEEF),
        "b": (RegType.BINARY, b"\0\1\2"), "e": (RegType.EXPAND_SZ, "%A%"), "m": (RegType.MULTI_SZ, ["a"]),
        "q": (RegType.QWORD, 1),
    }
    keys = [o.key for o in export(system_hive, r"\ControlSet002\Services\Vendor") if o.is_key]
    assert keys == [r"\ControlSet002\Services\Vendor", r"\ControlSet002\Services\Vendor\Parameters",
                    r"\ControlSet002\Services\Vendor\Parameters\Deep"]
    # ControlSet001 still has only its marker
    assert [o.name for o in export(system_hive, "\\ControlSet001") if not o.is_key] == ["marker"]


def test_verify_detects_mismatches(system_hive):
    ops = plan(parse_text(HDR + "\n".join([
        r"[HKLM\SYSTEM\CurrentControlSet\Services\atapi]",
        '"Start"=dword:00000000',
        '"Group"="SCSI miniport"',
        '"Old"=-',
        "",
        r"[-HKLM\SYSTEM\CurrentControlSet\Services\Legacy]",
    ]), "want.reg"), 2)["SYSTEM"]
    _apply(system_hive, ops)
    assert verify(system_hive, ops) == []
    # now tamper with the hive behind verify's back
    _apply(system_hive, parse_text(HDR + "\n\n".join([
        f'[{SYS}\\ControlSet002\\Services\\atapi]\n"Start"=dword:00000003\n"Group"=-\n"Old"=hex:01',
        f"[{SYS}\\ControlSet002\\Services\\Legacy]",
    ]) + "\n"))
    problems = verify(system_hive, ops)
    assert len(problems) == 4
    text = "\n".join(problems)
    assert '"Start" is REG_DWORD 3, expected REG_DWORD 0' in text
    assert '"Group" is missing, expected REG_SZ' in text
    assert '"Old" should be deleted' in text
    assert r"key [\ControlSet002\Services\Legacy] should be deleted" in text
    assert all(p.startswith("want.reg:") for p in problems)


def test_verify_detects_type_difference_with_same_bytes_and_missing_key(system_hive):
    op_key = r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\X"
    ops = plan(parse_text(HDR + f'[{op_key}]\n"v"=dword:00000007\n', "t.reg"), 2)["SYSTEM"]
    _apply(system_hive, [replace(o, type=RegType.BINARY) if o.name == "v" else o for o in ops])
    problems = verify(system_hive, ops)
    assert len(problems) == 1 and "REG_BINARY" in problems[0] and "expected REG_DWORD 7" in problems[0]
    missing = plan(parse_text(HDR + "[HKLM\\SYSTEM\\ControlSet002\\Nope\\Deeper]\n", "m.reg"), 2)["SYSTEM"]
    problems = verify(system_hive, missing)
    assert any(r"key [\ControlSet002\Nope] is missing" in p for p in problems)
    assert any(r"key [\ControlSet002\Nope\Deeper] is missing" in p for p in problems)
    assert encode_dword(7) == b"\x07\0\0\0"


def test_software_hive_round_trip(tmp_path):
    h = write_empty_hive(tmp_path / "SOFTWARE", "SOFTWARE")
    text = HDR + '[HKLM\\SOFTWARE\\Microsoft\\Windows NT\\CurrentVersion]\n"CurrentVersion"="5.1"\n'
    ops = plan(parse_text(text), 1)["SOFTWARE"]
    apply_reg(h, to_reg_text(ops), HIVE_PREFIXES["SOFTWARE"])
    assert verify(h, ops) == []


def test_repeated_value_in_one_section_keeps_file_order(system_hive):
    ops = plan(parse_text(HDR + '[HKLM\\SYSTEM\\ControlSet002\\R]\n"v"=dword:00000001\n"v"=dword:00000002\n'
                          '"gone"=dword:00000001\n"gone"=-\n'), 2)["SYSTEM"]
    _apply(system_hive, ops)
    assert verify(system_hive, ops) == []
    vals = [(o.name, o.value) for o in export(system_hive, r"\ControlSet002\R") if not o.is_key]
    assert vals == [("v", 2)]


def test_non_ascii_key_and_value_names(tmp_path):
    h = write_empty_hive(tmp_path / "SOFTWARE", "SOFTWARE")
    text = HDR + '[HKLM\\SOFTWARE\\\u00c9diteur\\\u4e2d\u6587]\n"n\u00e4me"=dword:00000001\n' \
        '"\u00c9"="\u00e9t\u00e9"\n'
    ops = plan(parse_text(text), 1)["SOFTWARE"]
    apply_reg(h, to_reg_text(ops), HIVE_PREFIXES["SOFTWARE"])
    assert verify(h, ops) == []
    got = [(o.key, o.name, o.value) for o in export(h, "\\\u00c9diteur")]
    assert got == [("\\\u00c9diteur", None, None), ("\\\u00c9diteur\\\u4e2d\u6587", None, None),
                   ("\\\u00c9diteur\\\u4e2d\u6587", "n\u00e4me", 1),
                   ("\\\u00c9diteur\\\u4e2d\u6587", "\u00c9", "\u00e9t\u00e9")]
