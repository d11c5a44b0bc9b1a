"""Registry edits on real-shaped hives, without an appliance (issue #20).

* a Windows 7 SYSTEM hive with thousands of CriticalDeviceDatabase/Services keys whose CDD already
  maps vendor IDE controllers to their own drivers: MergeIDE keeps them, adds only what is missing
  (spelled as the hive spells it), changes only the Start that matters for the bus;
* a dirty Windows 10 hive with SYSTEM.LOG1/LOG2 (new format), a truncated LOG2, an old-format LOG,
  no logs at all: replayed as the format says, checked by hivex;
* damaged hives: one line naming image, hive and what is wrong; plan refuses; ``registry: []`` not.
"""

from __future__ import annotations

import dataclasses
import struct
from pathlib import Path

import pytest

from pipeline.core.config import ImageConfig
from pipeline.guest import fixes
from pipeline.model.inspect import InspectFacts
from pipeline.registry import builtin, edits, hive, hivefile, regf, regfile, txlog
from pipeline.registry.plan import plan
from pipeline.steps.registry_merge import MergeInput, collect_ops, plan_edits, plan_warnings
from pipeline.tools import hivex
from tests.support import hives
from tests.support.hives import GUID_IDE, NO_SERVICE_CDD, STALE_CDD, VENDOR_IDE

CDD = r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Control\CriticalDeviceDatabase"
SVC = r"HKEY_LOCAL_MACHINE\SYSTEM\ControlSet001\Services"
W7 = InspectFacts(image_id="w7", os="windows", os_type="windows", major_version=6, minor_version=1,
                  product_name="Windows 7 Professional", arch="x86_64", current_control_set="ControlSet001",
                  drivers_present={"msahci.sys": True})


def _mergeide(bus: str = "ide", major: int = 6, minor: int = 1) -> list[regfile.Op]:
    return plan(builtin.builtin_ops("mergeide", major, minor, bus), "ControlSet001")["SYSTEM"]


def _by(acct: edits.Accounting) -> dict[tuple[str, str | None], edits.Edit]:
    return {(e.key.lower(), e.name.lower() if e.name else None): e for e in acct.edits}


@pytest.fixture(scope="module")
def win7(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return hives.win7_system(tmp_path_factory.mktemp("w7") / "SYSTEM")


def test_win7_existing_cdd_entries_are_kept_and_only_missing_ones_added(tmp_path: Path) -> None:
    win7 = hives.win7_system(tmp_path / "SYSTEM")
    h = regf.check(win7.read_bytes())
    assert sum(1 for _ in h.walk()) > 2900  # real-shaped: thousands of keys
    acct = edits.account(_mergeide(), edits.RegfView(h))
    by = _by(acct)
    for dev, svc in VENDOR_IDE.items():
        e = by[(f"{CDD}\\{dev}".lower(), "service")]
        assert e.status == "kept" and e.why == f"Windows maps it to {svc}, which the guest has"
        assert by[(f"{CDD}\\{dev}".lower(), "classguid")].status == "kept"
    stale = by[(f"{CDD}\\{STALE_CDD[0]}".lower(), "service")]
    assert (stale.status, stale.old, stale.new) == ("changed", "REG_SZ 'sisraid'", "REG_SZ 'pciide'")
    partial = f"{CDD}\\{NO_SERVICE_CDD}".lower()
    assert by[(partial, "service")].status == "added" and by[(partial, "classguid")].status == "kept"
    # added entries spelled like the hive's own (lower-case), XP-only ids not in a Windows 7 set
    added_guids = [e.new for e in acct.edits if e.name == "ClassGUID" and e.status == "added"]
    assert added_guids and set(added_guids) == {f"REG_SZ '{GUID_IDE}'"}
    assert not any("*azt0502" in e.key or "*pnp0600" in e.key for e in acct.edits)
    # Starts: only the IDE boot driver that is off changes; atapi is already 0; others keep theirs
    starts = {e.key.rsplit("\\", 1)[-1].lower(): e for e in acct.edits if e.name == "Start"}
    assert starts["intelide"].status == "changed" and starts["intelide"].old == "REG_DWORD 3"
    assert starts["atapi"].status == "kept" and starts["atapi"].why == "already so"
    assert starts["pciide"].status == "kept" and starts["msahci"].status == "kept"
    counts = acct.counts()["built-in"]
    assert counts["changed"] == 2 and counts["kept"] >= 27 + 1 and counts["added"] > 100
    # written with hivex: exactly these edits, and a second run finds nothing left to do
    hive.apply_reg(win7, regfile.to_reg_text(acct.write), r"HKEY_LOCAL_MACHINE\SYSTEM", step="test")
    assert hivex.walk(win7, step="test") is None
    again = edits.account(_mergeide(), edits.RegfView(regf.check(win7.read_bytes())))
    assert set(again.counts()["built-in"]) == {"kept"} and again.write == ()


def test_user_reg_overrides_an_entry_the_builtin_keeps(win7: Path, tmp_path: Path) -> None:
    dev = next(iter(VENDOR_IDE))
    reg = tmp_path / "mine.reg"
    reg.write_text("Windows Registry Editor Version 5.00\n\n[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet"
                   f"\\Control\\CriticalDeviceDatabase\\{dev}]\n\"Service\"=\"pciide\"\n")
    ops = _mergeide() + plan(regfile.parse_file(reg), "ControlSet001")["SYSTEM"]
    by_source = [e for e in edits.account(ops, edits.RegfView(regf.Hive(win7.read_bytes()))).edits
                 if e.key.endswith(dev) and e.name == "Service"]
    assert [(e.source, e.status) for e in by_source] == [("built-in", "kept"), (str(reg), "changed")]


def test_sata_changes_the_ahci_start_not_the_ide_ones(win7: Path) -> None:
    acct = edits.account(_mergeide("sata"), edits.RegfView(regf.Hive(win7.read_bytes())))
    changed = {e.key.rsplit("\\", 1)[-1].lower() for e in acct.edits
               if e.status == "changed" and e.name == "Start"}
    assert "msahci" in changed and "intelide" not in changed


def test_start_only_sets_create_no_service_keys(tmp_path: Path) -> None:
    # a Windows 10 hive without pciide: the nt62 set must not create a Services\pciide holding only Start
    path = hives.build(tmp_path / "SYSTEM", hives.win10_lines(services=3))
    hive.apply_reg(path, "Windows Registry Editor Version 5.00\n\n[-HKEY_LOCAL_MACHINE\\SYSTEM\\ControlSet001"
                   "\\Services\\pciide]\n", r"HKEY_LOCAL_MACHINE\SYSTEM", step="test")
    acct = edits.account(_mergeide("ide", 10, 0), edits.RegfView(regf.Hive(path.read_bytes())))
    by = _by(acct)
    assert by[(f"{SVC}\\pciide".lower(), None)].why == "no key pciide in the guest"
    assert not any("pciide" in op.key.lower() for op in acct.write)
    assert by[(f"{SVC}\\intelide".lower(), "start")].status == "changed"
    assert by[(f"{SVC}\\storahci".lower(), "start")].status == "kept"  # not needed to boot from ide


def test_plan_counts_from_inspects_snapshot_match_the_merge(win7: Path, tmp_path: Path) -> None:
    h = regf.Hive(win7.read_bytes())
    # what inspect records: the keys of every built-in set and of the guest fixes (AutoReboot here)
    bare = ImageConfig(id="w7", source=tmp_path / "w7.raw", registry=(), workdir=tmp_path)
    guest_ops, _ = collect_ops(MergeInput.from_config(bare, W7))
    assert guest_ops and {op.file for op in guest_ops} == {fixes.SOURCE}
    snap = edits.snapshot(h, plan([*guest_ops, *builtin.snapshot_ops(W7)], "ControlSet001")["SYSTEM"])
    ops = plan([*guest_ops, *builtin.builtin_ops("mergeide", 6, 1, "ide")], "ControlSet001")["SYSTEM"]
    planned = edits.account(ops, edits.SnapshotView(snap)).counts()
    assert planned == edits.account(ops, edits.RegfView(h)).counts()
    reg = tmp_path / "extra.reg"
    reg.write_text("Windows Registry Editor Version 5.00\n\n[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet"
                   "\\Services\\atapi]\n\"Start\"=dword:00000003\n\"DisplayName\"=-\n\n"
                   "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\Gho2kvmTest]\n\"Start\"=dword:00000004\n")
    facts = dataclasses.replace(W7, registry_snapshot={"SYSTEM": snap})
    image = ImageConfig(id="w7", source=tmp_path / "w7.raw", registry=("mergeide", str(reg)),
                        workdir=tmp_path)
    (line,) = plan_edits(image, facts)
    # atapi is in inspect's snapshot (a built-in set touches it), the new service is not
    builtin_counts = edits.account(ops, edits.RegfView(h)).counts()
    assert line.startswith(f"image 'w7': SYSTEM hive: {edits.summary(builtin_counts)}; ")
    assert line.endswith(f"{reg}: 1 changed, 1 deleted, 2 unknown")
    # the same user file on the hive itself: exactly what it says
    user = edits.account(plan(regfile.parse_file(reg), "ControlSet001")["SYSTEM"], edits.RegfView(h))
    assert [(e.status, e.name) for e in user.edits] == [("changed", "Start"), ("deleted", "DisplayName"),
                                                        ("added", None), ("added", "Start")]
    assert user.counts() == {str(reg): {"changed": 1, "deleted": 1, "added": 2}}


# ------------------------------------------------------------------------------ dirty hives

def _examine(d: hives.DirtyHive) -> hivefile.Examined:
    names = hivefile.log_names(d.system.name, list(d.logs))
    return hivefile.examine_files("SYSTEM", d.system, [d.logs[n] for n in names])


def test_dirty_win10_logs_are_replayed(tmp_path: Path) -> None:
    d = hives.dirty_win10(tmp_path)
    ex = _examine(d)
    f = ex.facts
    assert (f.dirty, f.primary_seq, f.secondary_seq) == (True, 4317, 4316)
    assert f.logs_found == ("SYSTEM.LOG", "SYSTEM.LOG1", "SYSTEM.LOG2")
    assert (f.entries_replayed, f.replayed_seqs, f.values_recovered, f.warning) == (2, (4316, 4317), 7, None)
    assert ex.data is not None and ex.data[regf.BASE:] == d.expected.read_bytes()[regf.BASE:]
    base = regf.BaseBlock.parse(ex.data)
    assert not base.dirty and base.primary_seq == 4318  # newer than every log entry
    out = hivefile.write_copy(ex, tmp_path / "replayed")
    assert hivex.walk(out, step="test") is None
    cls = r"\ControlSet001\Control\Class\{4d36e967-e325-11ce-bfc1-08002be10318}\0001"
    h = regf.Hive(ex.data)
    assert h.key_values(cls)["driverdesc"].data == regfile.encode_sz("Disk drive")  # type: ignore[index]
    assert h.key_values(r"\ControlSet001\Services\storahci")["start"].data == b"\3\0\0\0"  # type: ignore[index]
    assert "displayname" not in h.key_values(r"\ControlSet001\Services\svc0001")  # type: ignore[operator]
    assert h.key_values(r"\ControlSet001\Services\NewFromLog") is not None
    # hivex's own commit keeps the hive clean and above the logs: Windows ignores them afterwards
    hive.apply_reg(out, "Windows Registry Editor Version 5.00\n\n[HKEY_LOCAL_MACHINE\\SYSTEM\\X]\n",
                   r"HKEY_LOCAL_MACHINE\SYSTEM", step="test")
    after = regf.BaseBlock.parse(out.read_bytes())
    logs = [txlog.read_log(n, p.read_bytes()) for n, p in d.logs.items()]
    assert not after.dirty and after.secondary_seq > max(s for lg in logs for s in lg.seqs)


def test_truncated_log_replays_up_to_the_bad_entry(tmp_path: Path) -> None:
    d = hives.dirty_win10(tmp_path, truncate_log2=True)
    ex = _examine(d)
    assert ex.facts.entries_replayed == 1 and ex.facts.replayed_seqs == (4316, 4316)
    assert ex.data is not None and ex.data[regf.BASE:] == d.expected.read_bytes()[regf.BASE:]
    assert ex.facts.warning is not None and "4317/4316" in ex.facts.warning
    assert "SYSTEM.LOG2: log entry at 0x200 (seq 4317) truncated" in ex.facts.warning


def test_a_corrupted_entry_hash_stops_the_replay(tmp_path: Path) -> None:
    d = hives.dirty_win10(tmp_path)
    log2 = bytearray(d.logs["SYSTEM.LOG2"].read_bytes())
    log2[txlog.SECTOR + 200] ^= 0xFF
    d.logs["SYSTEM.LOG2"].write_bytes(bytes(log2))
    ex = _examine(d)
    assert ex.facts.entries_replayed == 1 and "wrong hash" in (ex.facts.replay_stopped or "")


def test_old_format_log_is_replayed(tmp_path: Path) -> None:
    d = hives.old_format_dirty(tmp_path)
    ex = hivefile.examine_files("SYSTEM", d.system, [d.logs["system.LOG"]])
    assert (ex.facts.entries_replayed, ex.facts.values_recovered) == (1, 7)
    assert ex.data is not None and ex.data[regf.BASE:] == d.expected.read_bytes()[regf.BASE:]
    # a log of another write (timestamp differs) is not applied
    log = bytearray(d.logs["system.LOG"].read_bytes())
    struct.pack_into("<Q", log, 12, 1)
    struct.pack_into("<I", log, 0x1FC, regf.checksum(log[:regf.BASE]))
    d.logs["system.LOG"].write_bytes(bytes(log))
    ex = hivefile.examine_files("SYSTEM", d.system, [d.logs["system.LOG"]])
    assert ex.facts.entries_replayed == 0 and "205" in (ex.facts.warning or "")


def test_dirty_hive_without_logs_migrates_with_a_warning(tmp_path: Path) -> None:
    d = hives.dirty_win10(tmp_path)
    ex = hivefile.examine_files("SYSTEM", d.system, [])
    assert ex.data is not None and ex.facts.entries_replayed == 0
    assert ex.facts.warning is not None
    assert ex.facts.warning.startswith("SYSTEM hive is dirty (sequence numbers 4317/4316) and its logs "
                                       "hold nothing")


@pytest.mark.parametrize(("data", "expected"), [
    ("", 0x30ED35C100CD3C7D), ("af", 0x48E73FC77D75DDC1), ("e70f", 0xB5F6E1FC485DBFF8),
    ("8642dc59", 0x7008F2E87E9CF556), ("ab427ea8d10fc7", 0xE11847E4F0678C41),
])
def test_marvin32_reference_vectors(data: str, expected: int) -> None:
    # the .NET runtime's Marvin test vectors (seed 0x4FB61A001BDBCC; hi << 32 | lo)
    assert txlog.marvin32(bytes.fromhex(data), 0x4FB61A001BDBCC) == expected


# ------------------------------------------------------------------------------ damaged hives

@pytest.mark.parametrize(("kind", "phrase"), [
    ("checksum", "base block checksum is wrong and no log holds a valid copy"),
    ("truncated", "hive bins truncated at 0x"),
    ("outside", "subkey list at 0x7fff0000 lies outside the hive bins"),
    ("loop", "subkey list loop: key '\\ControlSet001\\Services\\"),
])
def test_damaged_hive_is_one_line_and_refused_by_plan(win7: Path, tmp_path: Path, kind: str,
                                                      phrase: str) -> None:
    bad = hives.damage(win7, tmp_path / "SYSTEM", kind)
    ex = hivefile.examine_files("SYSTEM", bad, [])
    assert ex.data is None and hivex.walk(bad, step="test") is not None
    line = ex.facts.damage_line("w10")
    assert line.startswith(f"image 'w10': SYSTEM hive is damaged: {phrase}")
    assert line.endswith("repair it in Windows (chkdsk, System Restore) or migrate with registry: []")
    assert "\n" not in line and "/tmp" not in line and "perl" not in line.lower() and "exit" not in line
    facts = dataclasses.replace(W7, image_id="w10", hives=(ex.facts,))
    image = ImageConfig(id="w10", source=tmp_path / "w10.raw", registry=("mergeide",), workdir=tmp_path)
    refusals, _ = plan_warnings(image, facts)
    assert refusals == [line]
    assert plan_warnings(dataclasses.replace(image, registry=()), facts)[0] == []
    assert line in facts.warnings
