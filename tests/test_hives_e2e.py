"""Dirty and damaged SYSTEM hives through the real CLI (issue #20): few appliance launches.

* ``w10d``: a Windows 10 disk whose ``system`` hive is dirty (4317/4316) with ``system.LOG1`` /
  ``system.LOG2`` holding its newest state: ``migrate`` (inspect + registry-merge share one launch)
  replays the logs into the hive it edits; one read-only session reads the final disk back.
* ``w10bad``: a Windows 10 disk whose ``system`` hive has a subkey list outside the hive:
  ``inspect`` says so in one line, ``plan`` refuses, ``migrate`` stops before writing anything,
  ``registry: []`` migrates it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.fakedisk import WIN10
from pipeline.registry import regf
from pipeline.tools.guestfs import Guestfish
from tests.support import hives
from tests.support.fx_disks import build_disk, private_copy
from tests.support.fx_pipeline import make_config, receipt, run_cli

pytestmark = pytest.mark.guestfs
LOGS = ("system.LOG", "system.LOG1", "system.LOG2")
DEFAULTS = {"libvirt_uri": "test:///default", "memory_mib": 256, "format": "raw"}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def dirty(force_tcg_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = hives.cached_dirty_win10()
    files = (("system", str(d.system)), *((n, str(d.logs[n.upper()])) for n in LOGS))
    spec = dataclasses.replace(WIN10, hostname="W10DIRTY", config_files=files)
    base = tmp_path_factory.mktemp("dirty")
    source = private_copy(build_disk("win10-dirty.raw", spec), base / "src")
    config = make_config(base, [{"id": "w10d", "source": source, "registry": ["mergeide"]}],
                         defaults=DEFAULTS)
    proc = run_cli("migrate", "--config", str(config))
    plan = run_cli("plan", "--config", str(config))
    back = base / "back"
    back.mkdir()
    final = base / "images" / "w10d.raw"
    if final.exists():
        with Guestfish([(final, "raw", True)], image_id=None, step="test-readback", force_tcg=True) as g:
            g("mount-ro", "/dev/sda1", "/")
            for name in ("system", *LOGS):
                g("download", f"/WINDOWS/system32/config/{name}", str(back / name))
    return {"proc": proc, "plan": plan, "base": base, "back": back, "hive": d}


def test_dirty_hive_inspected_from_its_logs(dirty: dict[str, Any]) -> None:
    assert dirty["proc"].returncode == 0, dirty["proc"].stderr[-3000:]
    facts = receipt(dirty["base"], "w10d", "inspect")["result"]
    (system,) = [h for h in facts["hives"] if h["name"] == "SYSTEM"]
    assert system["dirty"] is True and (system["primary_seq"], system["secondary_seq"]) == (4317, 4316)
    assert system["logs_found"] == list(LOGS)
    assert (system["entries_replayed"], system["values_recovered"], system["damaged"]) == (2, 7, None)
    # the services are read from the replayed hive: LOG1 turned storahci off (the primary says 0)
    assert facts["services"]["storahci"] == 3


def test_dirty_hive_replayed_then_edited_and_logs_left(dirty: dict[str, Any]) -> None:
    merged = receipt(dirty["base"], "w10d", "registry-merge")["result"]
    system = merged["hives"]["SYSTEM"]
    assert (system["dirty"], system["entries_replayed"], system["values_recovered"]) == (True, 2, 7)
    # mergeide's two Starts, and the guest fixes' AutoReboot=0 (this hive has no CrashControl key)
    assert system["counts"] == {"built-in": {"added": 1, "changed": 2, "kept": 3}}
    added = [(e["key"].rsplit("\\", 1)[-1], e["name"]) for e in system["edits"] if e["status"] == "added"]
    assert len(added) == 1 and added[0][0] == "CrashControl", added
    changed = {(e["key"].rsplit("\\", 1)[-1], e["name"]): (e["old"], e["new"])
               for e in system["edits"] if e["status"] == "changed"}
    assert changed == {("intelide", "Start"): ("REG_DWORD 3", "REG_DWORD 0"),
                       ("atapi", "Start"): ("REG_DWORD 3", "REG_DWORD 0")}
    # plan shows the same counts (from inspect's snapshot)
    assert "registry: image 'w10d': SYSTEM hive: built-in: 1 added, 2 changed, 3 kept" in dirty["plan"].stdout
    back = dirty["back"]
    h = regf.check((back / "system").read_bytes())
    assert not h.base.dirty and h.base.secondary_seq > 4317
    assert h.key_values(r"\ControlSet001\Services\NewFromLog") is not None  # only in LOG2
    assert h.key_values(r"\ControlSet001\Services\storahci")["start"].data == b"\3\0\0\0"  # type: ignore[index]
    assert h.key_values(r"\ControlSet001\Services\intelide")["start"].data == b"\0\0\0\0"  # type: ignore[index]
    # the logs are left as Windows wrote them: older than the hive, Windows ignores them
    for name in LOGS:
        assert _sha(back / name) == _sha(dirty["hive"].logs[name.upper()]), name


@pytest.fixture(scope="module")
def damaged(force_tcg_env: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    bad = hives.cached_damaged_win10("outside")
    spec = dataclasses.replace(WIN10, hostname="W10BAD", config_files=(("system", str(bad)),))
    base = tmp_path_factory.mktemp("damaged")
    source = private_copy(build_disk("win10-damaged.raw", spec), base / "src")
    image = {"id": "w10bad", "source": source, "registry": ["mergeide"]}
    config = make_config(base, [image], defaults=DEFAULTS)
    out: dict[str, Any] = {"base": base}
    out["inspect"] = run_cli("inspect", "--config", str(config), "--image", "w10bad")
    out["plan"] = run_cli("plan", "--config", str(config))
    out["migrate"] = run_cli("migrate", "--config", str(config))
    out["overlay_after_refusal"] = (base / "work" / "w10bad" / "overlay.qcow2").exists()
    out["refusal"] = json.loads((base / "work" / "w10bad" / "registry-merge.error.json").read_text())
    make_config(base, [{**image, "registry": []}], defaults=DEFAULTS)
    out["plain"] = run_cli("migrate", "--config", str(config))
    return out


LINE = "image 'w10bad': SYSTEM hive is damaged: subkey list at 0x7fff0000 lies outside the hive bins"


def test_damaged_hive_one_line_in_inspect_and_plan(damaged: dict[str, Any]) -> None:
    ins = damaged["inspect"]
    assert ins.returncode == 0, ins.stderr[-2000:]
    lines = [ln for ln in ins.stderr.splitlines() if "hive is damaged" in ln and not ln.startswith("{")]
    assert [ln.split(" lies outside")[0] for ln in lines] == [LINE.split(" lies outside")[0]]
    assert lines[0].endswith("or migrate with registry: []")
    facts = json.loads(ins.stdout)
    assert facts["os"] == "windows"
    plan = damaged["plan"]
    assert plan.returncode == 2  # a refusal (docs/safety.md)
    refused = [ln for ln in plan.stdout.splitlines() if ln.startswith("REFUSED: ")]
    assert refused == ["REFUSED: " + lines[0]]


def test_damaged_hive_refused_by_migrate_and_registry_none_migrates(damaged: dict[str, Any]) -> None:
    mig = damaged["migrate"]
    assert mig.returncode != 0
    err = damaged["refusal"]
    assert "image 'w10bad': SYSTEM hive is damaged: subkey list at 0x7fff0000 lies outside" in err["error"]
    assert "\n" not in err["error"]
    for internal in ("/tmp", ".pm", "perl", "exit 9", "hivex_open"):
        assert internal not in err["error"]
    assert damaged["overlay_after_refusal"] is False
    plain = damaged["plain"]
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert (damaged["base"] / "images" / "w10bad.raw").exists()
