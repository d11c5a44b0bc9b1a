"""Orchestration end to end through the real CLI: resume after a failed or killed step, exit codes and
the summary table, completeness that reads no disk, the TTY progress display, and two workers
sharing a real luigid.

Cost: appliance launches (≈ 30-50 s each under TCG here) are spent only where a step needs one:
one XP image migrated once, killed during registry-merge (the expensive resume case); the cheap
later steps are invalidated through the config fields they use and failed there; the inspect case
uses the small non-Windows disk (no registry-merge appliance); the luigid run adds one fresh
non-Windows image so that both workers really have work at the same time.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support.fx_disks import private_copy
from tests.support.fx_pipeline import REPO, log_events, make_config, path_shim, run_cli

pytestmark = [pytest.mark.guestfs, pytest.mark.usefixtures("force_tcg_env")]

STEPS = ("inspect", "registry-merge", "convert", "xml-render", "define")
LUIGID = REPO / ".venv" / "bin" / "luigid"


# ---------------------------------------------------------------------------------------------- helpers


class Env:
    """One workdir shared by the module's images; the config is rewritten to invalidate steps."""

    def __init__(self, base: Path, sources: dict[str, Path]) -> None:
        self.base = base
        self.sources = sources
        self.work = base / "work"
        self.defaults: dict[str, Any] = {"memory_mib": 512, "format": "raw"}
        self.config = base / "config.yaml"

    def write(self, ids: tuple[str, ...] = ("xp",), **defaults: Any) -> Path:
        self.defaults.update(defaults)
        images = [{"id": i, "source": self.sources[i.rstrip("0123456789") or i]} for i in ids]
        return make_config(self.base, images, defaults=dict(self.defaults))

    def run_ids(self, image: str) -> dict[str, str | None]:
        out = {}
        for step in STEPS:
            p = self.work / image / f"{step}.json"
            out[step] = json.loads(p.read_text())["run_id"] if p.exists() else None
        return out

    def migrate(self, *args: str, env: dict[str, str] | None = None,
                inject: str | None = None) -> subprocess.CompletedProcess[str]:
        return run_cli("migrate", "--config", str(self.config), *args, env=env, inject=inject)


def started(proc: subprocess.CompletedProcess[str], image: str | None = None) -> list[str]:
    return [e["task"] for e in log_events(proc)
            if e.get("event") == "step started" and (image is None or e.get("image_id") == image)]


def launches(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [e.get("task", "?") for e in log_events(proc) if e.get("event") == "appliance launched"]


def summary(proc: subprocess.CompletedProcess[str]) -> dict[str, dict[str, str]]:
    """The summary table on stdout: image → {last, status, seconds, ran, boot, error}."""
    lines = proc.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("image ") and "status" in ln)
    out = {}
    for ln in lines[head + 1:]:
        if re.match(r"^\d+ image\(s\):", ln):
            break
        parts = ln.split(None, 6)
        out[parts[0]] = dict(zip(("last", "status", "seconds", "ran", "boot", "error"), parts[1:] + [""] * 6,
                                 strict=False))
    return out


def temp_leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)




# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, xp_raw: Path, linux_raw: Path) -> Env:
    base = tmp_path_factory.mktemp("orch")
    return Env(base, {"xp": private_copy(xp_raw, base / "src"), "nw": private_copy(linux_raw, base / "src")})


@pytest.fixture(scope="module")
def xp_killed(env: Env) -> dict[str, Any]:
    """The expensive resume case: XP migrated with registry-merge SIGKILLed after its work (the whole
    single-worker process dies, as on an OOM kill or power loss), then re-run."""
    env.write()
    killed = env.migrate(inject="registry-merge:kill")
    after_kill = env.run_ids("xp")
    plan = run_cli("plan", "--config", str(env.config))
    resumed = env.migrate()
    return {"killed": killed, "after_kill": after_kill, "plan": plan, "resumed": resumed}


# ---------------------------------------------------------------------------------------------- resume


def test_resume_after_registry_merge_killed(env: Env, xp_killed: dict[str, Any]) -> None:
    killed, resumed = xp_killed["killed"], xp_killed["resumed"]
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert started(killed) == ["inspect", "registry-merge"]
    after = xp_killed["after_kill"]
    # killed after its work, before its receipt: the overlay is there, but the step is not complete
    assert after["inspect"] is not None and after["registry-merge"] is None
    plan = xp_killed["plan"].stdout
    assert re.search(r"xp\s+inspect\s+skip \(up to date\)", plan), plan
    assert re.search(r"xp\s+registry-merge\s+RUN: no receipt", plan), plan

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    assert started(resumed) == list(STEPS[1:]), "inspect must not run again"
    assert launches(resumed) == ["registry-merge"]
    now = env.run_ids("xp")
    assert now["inspect"] == after["inspect"]
    assert all(now[s] for s in STEPS)
    assert temp_leftovers(env.work / "xp") == []
    row = summary(resumed)["xp"]
    assert (row["last"], row["status"], row["ran"]) == ("define", "done", ",".join(STEPS[1:]))


_bump = iter(range(520, 10_000, 8))


@pytest.mark.parametrize("mode", ["", ":kill"])
@pytest.mark.parametrize("step", ["convert", "xml-render", "define"])
def test_resume_after_cheap_step_failure(env: Env, xp_killed: dict[str, Any], step: str, mode: str) -> None:
    assert xp_killed["resumed"].returncode == 0
    if step == "convert":  # the fields a step uses invalidate it and what follows, nothing before
        env.write(format="qcow2" if env.defaults["format"] == "raw" else "raw")
        first = "convert"
    else:
        env.write(memory_mib=next(_bump))
        first = "xml-render"
    before = env.run_ids("xp")
    # kill: two workers, so luigi runs the step in a child process and the parent reports its death
    workers = ["--workers", "2"] if mode else []
    failed = env.migrate(*workers, inject=step + mode)
    assert failed.returncode == 1, failed.stdout + failed.stderr[-2000:]
    i = STEPS.index(step)
    assert started(failed) == list(STEPS[STEPS.index(first): i + 1])
    row = summary(failed)["xp"]
    assert row["status"] == "failed"
    assert row["last"] == step  # the last step reached: the failed one
    if mode:
        assert row["error"].startswith(f"{step}: worker process died unexpectedly"), row
        assert "SIGKILL" in row["error"]
    else:
        assert row["error"] == f"{step}: RuntimeError: injected failure in {step} (after its work)", row
    assert (env.work / "xp" / f"{step}.error.json").exists()
    mid = env.run_ids("xp")
    assert mid[step] == before[step], "a failed step never writes its receipt"

    resumed = env.migrate()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    assert started(resumed) == list(STEPS[i:]), "steps before the failed one must not run again"
    assert launches(resumed) == []
    after = env.run_ids("xp")
    assert all(after[s] == mid[s] for s in STEPS[:i])
    assert all(after[s] != before[s] for s in STEPS[STEPS.index(first):])
    assert not (env.work / "xp" / f"{step}.error.json").exists()
    assert summary(resumed)["xp"]["status"] == "done"
    assert (env.base / "images" / f"xp.{env.defaults['format']}").is_file()


def test_failed_boot_check_fails_the_image_and_boots_again(env: Env, xp_killed: dict[str, Any]) -> None:
    """test:///default's screen is a grey picture: a desktop, so ``expect: prompt`` fails the check.
    One line, exit 1, the verdict in the summary and define.error.json, no define receipt: the next
    run boots again; the domain stays defined."""
    assert xp_killed["resumed"].returncode == 0
    env.write(boot_check={"seconds": 40, "expect": "prompt"})
    failed = env.migrate()
    assert failed.returncode == 1, failed.stdout + failed.stderr[-2000:]
    row = summary(failed)["xp"]
    assert (row["last"], row["status"]) == ("define", "failed"), row
    assert row["boot"] == "desktop" and row["error"].startswith(
        "define: [image xp, step define] boot check: expected prompt, the guest shows desktop"), row
    err = json.loads((env.work / "xp" / "define.error.json").read_text())
    assert err["details"]["boot_check"]["verdict"] == "desktop" and "\n" not in err["error"]
    assert Path(err["details"]["boot_check"]["screenshot"]).is_file()
    again = env.migrate()
    assert again.returncode == 1 and started(again) == ["define"]
    env.write(boot_check=12)  # short form: expect any; a desktop passes
    ok = env.migrate()
    assert ok.returncode == 0, ok.stdout + ok.stderr[-2000:]
    assert started(ok) == ["define"] and summary(ok)["xp"]["boot"] == "desktop"
    r = json.loads((env.work / "xp" / "define.json").read_text())["result"]["boot_check"]
    assert (r["verdict"], r["ok"], r["expect"]) == ("desktop", True, "any") and r["seconds_to_verdict"] < 12
    report = run_cli("report", "--config", str(env.config))
    assert report.returncode == 0
    page = (env.work / "report.html").read_text()
    assert "desktop" in page and "<img class='shot' alt='screenshot' src='data:image/png;base64," in page
    env.write(boot_check=0)


def test_resume_after_inspect_killed(env: Env) -> None:
    env.write(ids=("nw",))
    killed = env.migrate("--workers", "2", inject="inspect:kill")
    assert killed.returncode == 1, killed.stdout + killed.stderr[-2000:]
    row = summary(killed)["nw"]
    assert (row["last"], row["status"]) == ("inspect", "failed")
    assert row["error"].startswith("inspect: worker process died unexpectedly"), row
    assert env.run_ids("nw")["inspect"] is None

    resumed = env.migrate()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    assert started(resumed) == list(STEPS)
    # not Windows: registry-merge records a skip and launches no appliance
    assert launches(resumed) == ["inspect"]
    assert summary(resumed)["nw"]["status"] == "done"


# ---------------------------------------------------------------------------------------------- no-op


def test_noop_rerun_runs_no_tool(env: Env, xp_killed: dict[str, Any], tmp_path: Path) -> None:
    env.write()
    first = env.migrate()  # whatever the cheap tests left stale
    assert first.returncode == 0
    calls = tmp_path / "calls.log"
    t0 = time.monotonic()
    noop = env.migrate(env=path_shim(tmp_path / "shim", calls))
    seconds = time.monotonic() - t0
    assert noop.returncode == 0, noop.stdout + noop.stderr[-2000:]
    assert started(noop) == []
    assert not calls.exists(), calls.read_text()
    assert summary(noop)["xp"] == {"last": "define", "status": "done", "seconds": "0.0", "ran": "-",
                                   "boot": "-", "error": ""}
    assert seconds < 15


def test_complete_reads_no_disk_and_calls_no_libvirt(env: Env, xp_killed: dict[str, Any],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import libvirt

    from pipeline.tasks import chain

    cfg = env.write()
    assert env.migrate().returncode == 0
    img = env.work / "xp"
    final = env.base / "images" / f"xp.{env.defaults['format']}"
    disks = {env.sources["xp"].resolve(), (img / "overlay.qcow2").resolve(), final.resolve()}
    touched: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def guard(path: Any) -> None:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError):
            return
        if p in disks:
            touched.append(str(p))
            raise AssertionError(f"complete() opened {p}")

    def fake_open(file: Any, *a: Any, **k: Any) -> Any:
        guard(file)
        return real_open(file, *a, **k)

    def fake_os_open(path: Any, *a: Any, **k: Any) -> int:
        guard(path)
        return real_os_open(path, *a, **k)

    def forbidden(*a: Any, **k: Any) -> Any:
        touched.append(f"call {a!r}")
        raise AssertionError("complete() ran a program or opened libvirt")

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    for name in ("open", "openReadOnly", "openAuth"):
        monkeypatch.setattr(libvirt, name, forbidden)
    tasks = chain(str(cfg.absolute()), "xp")
    assert [t.step for t in tasks] == list(STEPS)
    assert all(t.complete() for t in tasks)
    assert touched == []
    # and the guard does bite: a stale step is reported stale, not complete, still without reading
    monkeypatch.setattr(builtins, "open", real_open)
    monkeypatch.setattr(io, "open", real_open)
    final.unlink()
    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(io, "open", fake_open)
    assert [t.complete() for t in chain(str(cfg.absolute()), "xp")] == [True, True, False, False, False]
    assert touched == []


# ---------------------------------------------------------------------------------------------- exit codes


def test_bad_config_exits_2_with_one_line_per_error(tmp_path: Path, xp_raw: Path) -> None:
    cfg = make_config(tmp_path, [{"id": "a", "source": xp_raw, "memory_mib": "lots"},
                                 {"id": "b", "source": xp_raw, "vcpu": 2}])
    proc = run_cli("migrate", "--config", str(cfg))
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(errors) == 2, proc.stderr
    assert re.match(rf"^{re.escape(str(cfg))}:\d+: image 'a': field 'memory_mib': ", errors[0])
    assert re.match(rf"^{re.escape(str(cfg))}:\d+: image 'b': field 'vcpu': unknown key", errors[1])
    assert "did you mean 'vcpus'" in errors[1]
    assert proc.stdout == ""
    assert not (tmp_path / "work").exists(), "nothing may run, not even a log file"


def test_unknown_image_exits_2(tmp_path: Path, xp_raw: Path) -> None:
    cfg = make_config(tmp_path, [{"id": "a", "source": xp_raw}])
    proc = run_cli("migrate", "--config", str(cfg), "--image", "nope")
    assert proc.returncode == 2
    assert "no image with id 'nope' (have: a)" in proc.stderr
    assert not (tmp_path / "work").exists()


# ---------------------------------------------------------------------------------------------- progress


def _run_on_pty(args: list[str]) -> tuple[int, str, str]:
    master, slave = pty.openpty()
    full = dict(os.environ, GHO2KVM_FORCE_TCG="1", TERM="xterm", COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=subprocess.PIPE,
                            stderr=slave, env=full, cwd=str(REPO))
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=120), out, b"".join(chunks).decode("utf-8", "replace")


def test_progress_bars_on_a_tty_only(env: Env, xp_killed: dict[str, Any]) -> None:
    env.write(format="qcow2" if env.defaults["format"] == "raw" else "raw")
    rc, out, tty = _run_on_pty(["migrate", "--config", str(env.config), "--workers", "2"])
    assert rc == 0, out + tty[-2000:]
    # one bar line per running image, drawn from the step's own progress calls, erased again
    assert re.search(r"xp\s+convert\s+\[[#·]{20}\]\s+(--|\d+)%", tty), tty[-3000:]
    assert re.search(r"xp\s+convert\s+\[#{20}\]\s+100%", tty), "qemu-img's progress reaches the bar"
    assert "\x1b[1F\x1b[J" in tty
    assert "done" in out

    env.write(format="qcow2" if env.defaults["format"] == "raw" else "raw")
    plain = env.migrate("--workers", "2")
    assert plain.returncode == 0
    assert started(plain) == ["convert", "xml-render", "define"]
    assert "\x1b[" not in plain.stderr and "[#" not in plain.stderr and "·" not in plain.stderr


# ---------------------------------------------------------------------------------------------- luigid


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api(url: str, method: str, data: dict[str, Any]) -> Any:
    q = urllib.parse.urlencode({"data": json.dumps(data)})
    with urllib.request.urlopen(f"{url}/api/{method}?{q}", timeout=5) as r:
        return json.loads(r.read())["response"]


@pytest.fixture()
def luigid(tmp_path: Path) -> Any:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "luigid.out", "w")  # noqa: SIM115
    argv = [str(LUIGID), "--address", "127.0.0.1", "--port", str(port),
            "--state-path", str(tmp_path / "state.pickle"), "--logdir", str(tmp_path / "logs")]
    proc = subprocess.Popen(argv, cwd=str(REPO), stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(100):
            try:
                _api(url, "task_list", {"status": "RUNNING", "upstream_status": "", "search": ""})
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "luigid.out").read_text()
                time.sleep(0.2)
        else:
            pytest.fail("luigid did not answer")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_two_workers_share_luigid(env: Env, xp_killed: dict[str, Any], luigid: str, tmp_path: Path) -> None:
    # xp and nw are migrated: a memory change leaves them xml-render + define; nw2 is new (inspect
    # launches an appliance for ≈ 30 s), so both workers have work at the same time
    assert xp_killed["resumed"].returncode == 0
    env.write(ids=("xp", "nw"))
    assert env.migrate().returncode == 0
    env.write(ids=("xp", "nw", "nw2"), memory_mib=next(_bump))
    argv = [sys.executable, "-m", "pipeline", "migrate", "--config", str(env.config),
            "--scheduler", "central", "--scheduler-url", luigid]
    full = dict(os.environ, GHO2KVM_FORCE_TCG="1")
    procs = [subprocess.Popen(argv, cwd=str(REPO), env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    seen: set[tuple[str, str, Any, Any]] = set()
    while any(p.poll() is None for p in procs):
        running = _api(luigid, "task_list", {"status": "RUNNING", "upstream_status": "", "search": ""})
        for t in (running or {}).values():
            seen.add((t["name"], t["params"].get("image_id"), t.get("status_message"),
                      t.get("progress_percentage")))
        time.sleep(0.5)
    results = [subprocess.CompletedProcess(argv, p.returncode, *p.communicate()) for p in procs]
    for r in results:
        assert r.returncode == 0, r.stdout + r.stderr[-3000:]
        assert {k: v["status"] for k, v in summary(r).items()} == {"xp": "done", "nw": "done", "nw2": "done"}
    runs = Counter((e["image_id"], e["task"]) for r in results for e in log_events(r)
                   if e.get("event") == "step started")
    expected = {("xp", "xml-render"), ("xp", "define"), ("nw", "xml-render"), ("nw", "define"),
                *(("nw2", s) for s in STEPS)}
    assert set(runs) == expected and set(runs.values()) == {1}, runs
    assert all(started(r) for r in results), "both workers should have run something"
    # the step's progress calls reach luigid while it runs
    assert ("Inspect", "nw2", "inspecting (one appliance launch)", 5) in seen, seen

    # a failure disables the task in luigid (retry_count = 0); the next run is the retry and runs it
    env.write(ids=("xp",), memory_mib=next(_bump))
    central = ["--scheduler", "central", "--scheduler-url", luigid]
    failed = env.migrate(*central, inject="define")
    assert failed.returncode == 1
    assert summary(failed)["xp"]["error"].startswith("define: RuntimeError: injected failure")
    disabled = _api(luigid, "task_list", {"status": "DISABLED", "upstream_status": "", "search": ""})
    assert any(t["name"] == "Define" for t in disabled.values()), disabled
    again = env.migrate(*central)
    assert again.returncode == 0, again.stdout + again.stderr[-2000:]
    assert started(again) == ["define"]


def test_unreachable_luigid_exits_2(env: Env, xp_killed: dict[str, Any]) -> None:
    env.write()
    proc = env.migrate("--scheduler", "central", "--scheduler-url", f"http://127.0.0.1:{_free_port()}")
    assert proc.returncode == 2
    assert "luigid not reachable at http://127.0.0.1:" in proc.stderr
    assert started(proc) == []
