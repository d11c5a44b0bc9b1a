"""Hive mapping (CurrentControlSet -> ControlSet00N), built-in mergeide sets."""

from __future__ import annotations

import pytest

from pipeline.core.errors import InputError
from pipeline.registry.builtin import builtin_ops, required_drivers
from pipeline.registry.plan import control_set_name, hive_relative, map_key, plan
from pipeline.registry.regfile import RegSyntaxError, parse_text

HDR = "Windows Registry Editor Version 5.00\n\n"


@pytest.mark.parametrize("given", ["ControlSet002", "controlset2", "2", 2, " ControlSet002 "])
def test_control_set_name(given):
    assert control_set_name(given) == "ControlSet002"


@pytest.mark.parametrize("bad", ["", "0", "CurrentControlSet", "ControlSetX", "ControlSet0001x"])
def test_control_set_name_rejects(bad):
    with pytest.raises(ValueError):
        control_set_name(bad)


@pytest.mark.parametrize("key,hive,canon", [
    (r"HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\x",
     "SYSTEM", r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002\Services\x"),
    (r"hklm\system\currentcontrolset", "SYSTEM", r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002"),
    (r"HKLM\SYSTEM\ControlSet001\Services", "SYSTEM", r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services"),
    (r"HKLM\SYSTEM\Select", "SYSTEM", r"HKEY_LOCAL_MACHINE\SYSTEM\Select"),
    (r"HKLM\Software\Microsoft\CurrentControlSet", "SOFTWARE",
     r"HKEY_LOCAL_MACHINE\SOFTWARE\Microsoft\CurrentControlSet"),
    (r"HKEY_LOCAL_MACHINE\SOFTWARE", "SOFTWARE", r"HKEY_LOCAL_MACHINE\SOFTWARE"),
])
def test_map_key(key, hive, canon):
    assert map_key(key, "ControlSet002") == (hive, canon)


@pytest.mark.parametrize("key,needle", [
    (r"HKEY_CURRENT_USER\Software\x", "HKEY_CURRENT_USER cannot be changed offline"),
    (r"HKCU\Software\x", "HKCU cannot be changed offline"),
    (r"HKCR\.txt", "HKCR cannot be changed offline"),
    (r"HKLM\SAM\Domains", "hive SAM is not supported"),
    (r"HKLM\SECURITY", "hive SECURITY is not supported"),
    (r"HKLM\HARDWARE\DESCRIPTION", "hive HARDWARE is not supported"),
    (r"HKEY_LOCAL_MACHINE", "hive (none)"),
    (r"Foo\Bar", "expected a key under HKEY_LOCAL_MACHINE"),
])
def test_other_roots_refused_with_file_and_line(key, needle):
    ops = parse_text(HDR + "; x\n" + f"[{key}]\n", "user.reg")
    with pytest.raises(RegSyntaxError) as e:
        plan(ops, "ControlSet001")
    assert isinstance(e.value, InputError)
    assert str(e.value).startswith("user.reg:4: ") and needle in str(e.value)


def test_plan_maps_ccs_splits_hives_and_creates_parents():
    ops = parse_text(HDR + "\n".join([
        r"[HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\New\Deep]",
        '"Start"=dword:00000000',
        "",
        r"[HKLM\SOFTWARE\Vendor\App]",
        '"v"="1"',
        "",
        r"[HKLM\SYSTEM\CurrentControlSet\Services\New\Other]",
    ]), "u.reg")
    p = plan(ops, "ControlSet002")
    assert set(p) == {"SYSTEM", "SOFTWARE"}
    sysk = [(o.key, o.name) for o in p["SYSTEM"]]
    base = r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet002"
    assert sysk == [
        (base, None), (base + r"\Services", None), (base + r"\Services\New", None),
        (base + r"\Services\New\Deep", None), (base + r"\Services\New\Deep", "Start"),
        (base + r"\Services\New\Other", None),
    ]
    # inserted parents point at the line that needed them
    assert all(o.file == "u.reg" for o in p["SYSTEM"]) and p["SYSTEM"][0].line == 3
    assert not any("ControlSet001" in o.key or "CurrentControlSet" in o.key for o in p["SYSTEM"])
    assert [(o.key, o.name) for o in p["SOFTWARE"]] == [
        (r"HKEY_LOCAL_MACHINE\SOFTWARE\Vendor", None), (r"HKEY_LOCAL_MACHINE\SOFTWARE\Vendor\App", None),
        (r"HKEY_LOCAL_MACHINE\SOFTWARE\Vendor\App", "v"),
    ]


def test_plan_recreates_parents_after_delete():
    ops = parse_text(HDR + "[HKLM\\SOFTWARE\\A\\B]\n\n[-HKLM\\SOFTWARE\\A]\n\n[HKLM\\SOFTWARE\\A\\B\\C]\n")
    keys = [(hive_relative(o.key), o.delete) for o in plan(ops, 1)["SOFTWARE"]]
    assert keys == [("\\A", False), ("\\A\\B", False), ("\\A", True),
                    ("\\A", False), ("\\A\\B", False), ("\\A\\B\\C", False)]


@pytest.mark.parametrize("key", [r"HKLM\SYSTEM", r"HKLM\SOFTWARE\\", r"HKLM\SYSTEM\CurrentControlSet",
                                 r"HKLM\SYSTEM\ControlSet001"])
def test_plan_refuses_root_and_control_set_deletion(key):
    with pytest.raises(RegSyntaxError, match="refusing to delete"):
        plan(parse_text(HDR + f"[-{key}]\n", "d.reg"), 1)


def test_hive_relative():
    assert hive_relative(r"HKEY_LOCAL_MACHINE\SYSTEM\A\B") == r"\A\B"
    assert hive_relative(r"HKEY_LOCAL_MACHINE\SYSTEM") == "\\"
    assert hive_relative(r"\X") == r"\X"


# ------------------------------------------------------------------ built-in mergeide

IDE = "{4D36E96A-E325-11CE-BFC1-08002BE10318}"
DISK = "{4D36E967-E325-11CE-BFC1-08002BE10318}"
CDD = r"HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Control\CriticalDeviceDatabase" + "\\"
SVC = r"HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services" + "\\"


def _by_key(ops):
    out: dict[str, dict[str, object]] = {}
    for o in ops:
        vals = out.setdefault(o.key.lower(), {})
        if not o.is_key:
            vals[o.name] = o.value
    return out


def test_mergeide_xp_set():
    keys = _by_key(builtin_ops("mergeide", 5, 1))
    for dev, svc in [("primary_ide_channel", "atapi"), ("secondary_ide_channel", "atapi"),
                     ("*pnp0600", "atapi"), ("*azt0502", "atapi"), ("pci#cc_0101", "pciide")]:
        assert keys[(CDD + dev).lower()] == {"ClassGUID": IDE, "Service": svc}
    assert keys[(CDD + "gendisk").lower()] == {"ClassGUID": DISK, "Service": "disk"}
    for dev in ["7010", "7111", "7199", "1222", "1230", "2411", "2421", "244a", "244b", "248a", "248b",
                "24c1", "24cb", "24db", "25a2", "25a3", "266f", "2850", "27c0", "27df"]:
        assert keys[(CDD + f"pci#ven_8086&dev_{dev}").lower()] == {"ClassGUID": IDE, "Service": "intelide"}
    for vd in ["1106&dev_0571", "10b9&dev_5229", "1039&dev_5513", "1022&dev_7409", "1022&dev_7411",
               "1022&dev_7441", "1022&dev_7469", "10de&dev_0065", "10de&dev_0085", "10de&dev_008e",
               "10de&dev_00d5", "10de&dev_00e5", "10de&dev_00ee", "1166&dev_0211", "105a&dev_4d33"]:
        assert keys[(CDD + f"pci#ven_{vd}").lower()] == {"ClassGUID": IDE, "Service": "pciide"}
    for svc, group, tag in [("atapi", "SCSI miniport", 0x19), ("intelide", "System Bus Extender", 4),
                            ("pciide", "System Bus Extender", 3)]:
        v = keys[(SVC + svc).lower()]
        assert (v["Start"], v["Type"], v["ErrorControl"], v["Group"], v["Tag"]) == (0, 1, 1, group, tag)
        assert v["ImagePath"] == rf"system32\DRIVERS\{svc}.sys"
    assert (SVC + "msahci").lower() not in keys
    # every CDD entry is complete and every CDD service exists as a built-in service or is "disk"
    cdd = {k: v for k, v in keys.items() if k.startswith(CDD.lower())}
    assert len(cdd) > 80
    assert all(set(v) == {"ClassGUID", "Service"} for v in cdd.values())
    assert {v["Service"] for v in cdd.values()} == {"atapi", "pciide", "intelide", "disk"}


def test_mergeide_win7_set():
    ops = builtin_ops("mergeide", 6, 1)
    keys = _by_key(ops)
    for svc in ["msahci", "intelide", "pciide", "atapi"]:
        assert keys[(SVC + svc).lower()] == {"Start": 0}
    # Windows 7 spells class GUIDs in lower case (the accounting follows the hive where it shows one)
    assert keys[(CDD + "pci#cc_010601").lower()] == {"ClassGUID": IDE.lower(), "Service": "msahci"}
    assert keys[(CDD + "pci#ven_8086&dev_7010").lower()]["Service"] == "intelide"
    assert (CDD + "*azt0502").lower() not in keys and (CDD + "*pnp0600").lower() not in keys  # XP-only ids
    assert all(o.file.startswith("<builtin mergeide>/") for o in ops)


@pytest.mark.parametrize("major,minor", [(None, None), (5, 0), (5, 2), (4, 0)])
def test_mergeide_unknown_or_nt5_get_xp_set(major, minor):
    assert builtin_ops("mergeide", major, minor) == builtin_ops("mergeide", 5, 1)


def test_mergeide_maps_onto_live_control_set():
    p = plan(builtin_ops("mergeide", 5, 1), "ControlSet002")
    assert list(p) == ["SYSTEM"]
    rels = [hive_relative(o.key) for o in p["SYSTEM"]]
    assert all(r.startswith("\\ControlSet002\\") or r == "\\ControlSet002" for r in rels)


def test_unknown_builtin():
    with pytest.raises(InputError, match="unknown built-in registry change set 'mergeidee'; known: mergeide"):
        builtin_ops("mergeidee", 5, 1)


def test_required_drivers():
    assert required_drivers() == ["atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys"]
