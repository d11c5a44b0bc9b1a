"""One appliance per image (issue #14 goal 1): inspect leaves its appliance to registry-merge.

Through the real CLI with real libguestfs, on a private copy of the phony XP disk (monolithicSparse
VMDK), in one module-scoped sequence of runs (each costs one appliance launch, 30-120 s under TCG):

1. ``--workers 2`` (every step in a forked luigi worker process): inspect launches, registry-merge
   takes the appliance over; 1 launch.
2. ``extra.reg`` changed: only registry-merge re-runs, with a launch of its own; 1 launch.
3. the source touched and ``inject="inspect:kill"``: the process dies right after inspect
   left its appliance (the worst moment); the appliance dies with it.
4. re-run: inspect re-runs and hands over again; the result is the one of run 2.

The launch log (``<image dir>/appliances.jsonl``) names every appliance's guestfish and qemu pids:
none may be alive once a run is over. The fast tests below check the two run.py pieces the sharing
stands on (start a background tool; the watchdog's idle shutdown) with ``sh`` and ``sleep``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import ToolError
from pipeline.tools import run
from pipeline.tools.guestfs import HANDOFF, Appliances
from tests.support.fx_disks import private_copy
from tests.support.fx_pipeline import REPO, log_events, make_config, run_cli

REG = ("Windows Registry Editor Version 5.00\r\n\r\n"
       "[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\Gho2kvmShare]\r\n\"Round\"=dword:{:08x}\r\n")


def alive(pid: int | None) -> bool:
    return pid is not None and run.process_start(pid) is not None


def gone_soon(pids: list[int], seconds: float = 15) -> list[int]:
    """The pids still alive after waiting up to ``seconds`` for them to go (a killed run's watchdog
    polls twice a second, libguestfs' recovery process every second)."""
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@dataclass
class Run:
    proc: subprocess.CompletedProcess[str]
    events: list[dict[str, Any]]  # launch-log entries this run added
    left: list[int]  # guestfish/qemu pids of those entries still alive after the run
    leftovers: list[str]  # hand-over files, shared overlays and temps in the image folder
    receipts: dict[str, dict[str, Any]] = field(default_factory=dict)

    def started(self) -> list[str]:
        return [e["task"] for e in log_events(self.proc) if e.get("event") == "step started"]

    def launches(self) -> list[str]:
        return [e["step"] for e in self.events if e["event"] == "launch"]

    def take_overs(self) -> list[str]:
        return [e["step"] for e in self.events if e["event"] == "take-over"]


@dataclass
class Runs:
    shared: Run
    reg_changed: Run
    killed: Run
    resumed: Run


@pytest.fixture(scope="module")
def runs(xp_vmdk: Any, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    base = tmp_path_factory.mktemp("share")
    source = private_copy(xp_vmdk("monolithicSparse"), base / "src")
    reg = base / "extra.reg"
    reg.write_text(REG.format(1), encoding="utf-8")
    config = make_config(base, [{"id": "xp", "source": source, "format": "raw",
                                 "registry": ["mergeide", str(reg)]}],
                         defaults={"libvirt_uri": "test:///default", "memory_mib": 256})
    work = base / "work" / "xp"
    appliances = Appliances(work)

    def migrate(*args: str, inject: str | None = None) -> Run:
        before = len(appliances.events())
        proc = run_cli("migrate", "--config", str(config), *args, inject=inject)
        events = appliances.events()[before:]
        pids = [p for e in events for p in (e.get("pid"), e.get("qemu_pid")) if isinstance(p, int)]
        left = gone_soon(pids)
        leftovers = sorted(p.name for p in work.iterdir()
                           if p.name.startswith(HANDOFF) or "shared-overlay" in p.name or ".tmp-" in p.name)
        receipts = {s: json.loads((work / f"{s}.json").read_text())
                    for s in ("inspect", "registry-merge", "convert") if (work / f"{s}.json").exists()}
        return Run(proc, events, left, leftovers, receipts)

    shared = migrate("--workers", "2")
    reg.write_text(REG.format(2), encoding="utf-8")
    reg_changed = migrate()
    os.utime(source)  # inspect is stale now
    killed = migrate(inject="inspect:kill")
    resumed = migrate()
    return Runs(shared, reg_changed, killed, resumed)


@pytest.mark.guestfs
def test_one_launch_per_image_with_forked_workers(runs: Runs) -> None:
    r = runs.shared
    assert r.proc.returncode == 0, r.proc.stdout + r.proc.stderr[-2000:]
    assert r.started() == ["inspect", "registry-merge", "convert", "xml-render", "define"]
    assert r.launches() == ["inspect"]
    assert r.take_overs() == ["registry-merge"]
    launched = [e["task"] for e in log_events(r.proc) if e.get("event") == "appliance launched"]
    assert launched == ["inspect"]
    merge = r.receipts["registry-merge"]["result"]
    assert merge["appliance_shared"] is True and merge["appliance_launches"] == 0
    assert merge["hives"]["SYSTEM"]["verified"] is True
    assert r.receipts["convert"]["result"]["verified"] is True
    assert r.left == [] and r.leftovers == []


@pytest.mark.guestfs
def test_changed_reg_file_reruns_only_registry_merge_with_its_own_launch(runs: Runs) -> None:
    r = runs.reg_changed
    assert r.proc.returncode == 0, r.proc.stdout + r.proc.stderr[-2000:]
    assert r.started() == ["registry-merge", "convert", "xml-render", "define"]
    assert r.launches() == ["registry-merge"] and r.take_overs() == []
    merge = r.receipts["registry-merge"]["result"]
    assert merge["appliance_shared"] is False and merge["appliance_launches"] == 1
    assert merge["hives"]["SYSTEM"]["verified"] is True
    assert r.receipts["inspect"]["run_id"] == runs.shared.receipts["inspect"]["run_id"]
    assert r.left == [] and r.leftovers == []


@pytest.mark.guestfs
def test_killed_after_inspect_left_its_appliance(runs: Runs) -> None:
    r = runs.killed
    assert r.proc.returncode == -9, r.proc.stdout + r.proc.stderr[-2000:]
    assert r.started() == ["inspect"] and r.launches() == ["inspect"]
    # killed before its receipt: the receipt is still the one of the first run
    assert r.receipts["inspect"]["run_id"] == runs.reg_changed.receipts["inspect"]["run_id"]
    assert r.left == [], "the appliance outlived the killed run"


@pytest.mark.guestfs
def test_resume_after_kill_shares_again_and_gives_the_same_result(runs: Runs) -> None:
    r = runs.resumed
    assert r.proc.returncode == 0, r.proc.stdout + r.proc.stderr[-2000:]
    assert r.started() == ["inspect", "registry-merge", "convert", "xml-render", "define"]
    assert r.launches() == ["inspect"] and r.take_overs() == ["registry-merge"]
    before, after = runs.reg_changed.receipts, r.receipts
    assert after["inspect"]["result"] == {**before["inspect"]["result"],
                                         "appliance_seconds": after["inspect"]["result"]["appliance_seconds"]}
    b, a = before["registry-merge"]["result"], after["registry-merge"]["result"]
    assert a["hives"] == b["hives"] and a["disk_signature"] == b["disk_signature"]
    assert a["appliance_shared"] is True
    assert after["convert"]["result"]["verified"] is True
    # the killed run's hand-over was discarded, its overlay removed
    assert r.left == [] and r.leftovers == []


# ---------------------------------------------------------------------------------------------- fast


def test_start_daemon_returns_the_server_pid_and_it_dies_with_its_owner(tmp_path: Path) -> None:
    pidfile = tmp_path / "server.pid"
    code = ("from pathlib import Path\nimport time\nfrom pipeline.tools import run\n"
            "pid = run.start_daemon(['sh', '-c', 'sleep 300 </dev/null >/dev/null 2>&1 & echo PID=$!'], "
            f"step='t', log=Path('{tmp_path}/log'), pid_from=lambda s: int(s.split('=')[1]))\n"
            f"open('{pidfile}', 'w').write(str(pid))\ntime.sleep(300)\n")
    owner = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO))
    try:
        deadline = time.monotonic() + 30
        while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        server = int(pidfile.read_text())
        assert alive(server)
    finally:
        owner.kill()
        owner.wait()
    assert gone_soon([server]) == [], "the server outlived the process that started it"


def test_start_daemon_errors_name_step_image_and_the_tools_message(tmp_path: Path) -> None:
    log = tmp_path / "log"
    with pytest.raises(ToolError) as e:
        run.start_daemon(["sh", "-c", "echo 'no such drive' >&2; exit 3"], step="inspect", image_id="xp",
                         log=log, pid_from=lambda s: None)
    assert e.value.returncode == 3 and "no such drive" in e.value.one_line()
    assert "image xp" in e.value.one_line() and "step inspect" in e.value.one_line()
    with pytest.raises(ToolError, match="timed out after 1 s"):
        run.start_daemon(["sh", "-c", "echo waiting >&2; exec sleep 30"], step="inspect", log=log,
                         pid_from=lambda s: None, timeout=1)
    with pytest.raises(ToolError, match="not found"):
        run.start_daemon(["/nonexistent/guestfish"], step="inspect", log=log, pid_from=lambda s: None)


def test_idle_daemon_is_shut_down_and_its_files_removed(tmp_path: Path) -> None:
    """What an appliance left by inspect and never taken over goes through."""
    daemon = subprocess.Popen(["sleep", "300"], start_new_session=True)
    overlay = tmp_path / "overlay"
    overlay.write_text("x")
    handoff = tmp_path / "handoff.json"
    handoff.write_text(json.dumps({"remove": [str(overlay)]}))
    try:
        run.watch_daemon(daemon.pid, idle=(handoff, 1.0))
        deadline = time.monotonic() + 20
        while daemon.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.poll() is not None, "the idle daemon was not shut down"
        deadline = time.monotonic() + 10
        while list(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(tmp_path.iterdir()) == []
    finally:
        if daemon.poll() is None:
            daemon.kill()
        daemon.wait()
        run.unwatch_daemon(daemon.pid)


def test_claimed_daemon_is_not_shut_down_when_idle(tmp_path: Path) -> None:
    daemon = subprocess.Popen(["sleep", "300"], start_new_session=True)
    handoff = tmp_path / "handoff.json"
    handoff.write_text("{}")
    try:
        run.watch_daemon(daemon.pid, idle=(handoff, 1.0))
        os.rename(handoff, tmp_path / "claimed")  # what registry-merge does when it takes it over
        time.sleep(3)  # three idle periods: nothing may happen
        assert daemon.poll() is None
        assert (tmp_path / "claimed").exists()
    finally:
        run.unwatch_daemon(daemon.pid)
        daemon.kill()
        daemon.wait()
