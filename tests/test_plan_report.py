"""``gho2kvm plan`` and ``gho2kvm report`` against a real migration, and change-driven re-runs: a
changed input re-runs its step and every step after it, nothing else, and ``plan`` says so first
without touching a file.

One XP image (with a user ``.reg`` file) is migrated once; then, cheapest first: ``memory_mib``
(xml-render onward), ``format`` (convert onward), the ``.reg`` content (registry-merge onward, one
appliance), the source's mtime (inspect onward, one appliance for both). A second image whose source is
truncated fails in inspect before any appliance launch, for the failed-image plan and report.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.report import human_bytes
from tests.support.fx_disks import private_copy
from tests.support.fx_pipeline import log_events, make_config, run_cli

pytestmark = [pytest.mark.guestfs, pytest.mark.usefixtures("force_tcg_env")]

STEPS = ("inspect", "registry-merge", "convert", "xml-render", "define")
REG = ("Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Gho2kvmPlanTest]\r\n"
       '"Value"="{}"\r\n')


class Env:
    def __init__(self, base: Path, source: Path, reg: Path) -> None:
        self.base, self.source, self.reg = base, source, reg
        self.work = base / "work"
        self.defaults: dict[str, Any] = {"memory_mib": 512, "format": "raw"}
        self.extra: list[dict[str, Any]] = []
        self.config = base / "config.yaml"

    def write(self, **defaults: Any) -> Path:
        self.defaults.update(defaults)
        images = [{"id": "xp", "source": self.source, "registry": ["mergeide", str(self.reg)]}, *self.extra]
        return make_config(self.base, images, defaults=dict(self.defaults))

    def run_ids(self, image: str = "xp") -> dict[str, str | None]:
        out = {}
        for step in STEPS:
            p = self.work / image / f"{step}.json"
            out[step] = json.loads(p.read_text())["run_id"] if p.exists() else None
        return out

    def cli(self, cmd: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(cmd, "--config", str(self.config), *args)


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its mtime and size."""
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            st = os.stat(os.path.join(dirpath, f))
            out[os.path.join(dirpath, f)] = (st.st_mtime_ns, st.st_size)
    return out


def plan_actions(proc: subprocess.CompletedProcess[str], image: str = "xp") -> dict[str, str]:
    out = {}
    for ln in proc.stdout.splitlines():
        m = re.match(rf"^{re.escape(image)}\s+(\S+)\s+(.*)$", ln)
        if m and m.group(1) in STEPS:
            out[m.group(1)] = m.group(2)
    return out


def started(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [e["task"] for e in log_events(proc) if e.get("event") == "step started"]


def launches(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [e["task"] for e in log_events(proc) if e.get("event") == "appliance launched"]


def plan_then_migrate(env: Env, expected_first: str, reason: str) -> subprocess.CompletedProcess[str]:
    """Plan (touching nothing) names ``reason`` for ``expected_first``; migrate then runs exactly it and
    the steps after it."""
    before_files = snapshot(env.base)
    before = env.run_ids()
    plan = env.cli("plan")
    assert plan.returncode == 0, plan.stderr
    assert snapshot(env.base) == before_files, "plan must not create or modify any file"
    i = STEPS.index(expected_first)
    actions = plan_actions(plan)
    assert all(actions[s] == "skip (up to date)" for s in STEPS[:i]), plan.stdout
    assert actions[expected_first].startswith("RUN: input changed: "), plan.stdout
    assert reason in actions[expected_first], plan.stdout
    # later steps run too: because an earlier step runs, or for a change of their own (format)
    assert all(actions[s].startswith("RUN: ") for s in STEPS[i + 1:]), plan.stdout
    assert actions["define"] == "RUN: an earlier step runs", plan.stdout
    assert f"{len(STEPS) - i} step(s) to run in 1 image(s), {i} up to date" in plan.stdout

    run = env.cli("migrate")
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert started(run) == list(STEPS[i:])
    after = env.run_ids()
    assert all(after[s] == before[s] for s in STEPS[:i]), "earlier steps must not run again"
    assert all(after[s] != before[s] for s in STEPS[i:])
    again = env.cli("plan")
    assert "0 step(s) to run in 0 image(s), 5 up to date" in again.stdout, again.stdout
    return run


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, xp_raw: Path) -> Env:
    base = tmp_path_factory.mktemp("planreport")
    reg = base / "src" / "extra.reg"
    source = private_copy(xp_raw, base / "src")
    reg.write_text(REG.format("one"), encoding="utf-8")
    e = Env(base, source, reg)
    e.write()
    first = e.cli("migrate")
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    return e


def test_plan_of_a_fresh_config_runs_everything_and_touches_nothing(tmp_path: Path, xp_raw: Path) -> None:
    cfg = make_config(tmp_path, [{"id": "a", "source": xp_raw}, {"id": "b", "source": xp_raw}])
    before = snapshot(tmp_path)
    plan = run_cli("plan", "--config", str(cfg))
    assert plan.returncode == 0, plan.stderr
    assert snapshot(tmp_path) == before
    assert not (tmp_path / "work").exists()
    for image in ("a", "b"):
        actions = plan_actions(plan, image)
        assert list(actions) == list(STEPS)
        assert set(actions.values()) == {"RUN: no receipt (never ran, or did not finish)"}
    assert "10 step(s) to run in 2 image(s), 0 up to date" in plan.stdout
    only = run_cli("plan", "--config", str(cfg), "--image", "b")
    assert "5 step(s) to run in 1 image(s)" in only.stdout and not plan_actions(only, "a")


def test_memory_change_reruns_xml_render_onward(env: Env) -> None:
    env.write(memory_mib=1024)
    plan_then_migrate(env, "xml-render", "domain.memory_mib 512 → 1024")
    assert '<memory unit="MiB">1024</memory>' in (env.work / "xp" / "domain.xml").read_text()


def test_format_change_reruns_convert_onward(env: Env) -> None:
    env.write(format="qcow2")
    run = plan_then_migrate(env, "convert", "format 'raw' → 'qcow2'")
    assert launches(run) == []
    assert (env.base / "images" / "xp.qcow2").is_file()


def test_reg_content_change_reruns_registry_merge_onward(env: Env) -> None:
    env.reg.write_text(REG.format("two"), encoding="utf-8")
    run = plan_then_migrate(env, "registry-merge", f"registry[1] {env.reg} modified (content")
    assert launches(run) == ["registry-merge"]


def test_source_mtime_change_reruns_everything(env: Env) -> None:
    st = env.source.stat()
    os.utime(env.source, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    run = plan_then_migrate(env, "inspect", f"disk {env.source} modified (mtime)")
    assert launches(run) == ["inspect"], "registry-merge takes inspect's appliance over"


def test_plan_and_report_with_a_failed_image(env: Env) -> None:
    bad = env.base / "src" / "bad.raw"
    bad.write_bytes(b"\0" * 1000)
    env.extra = [{"id": "bad", "source": bad}]
    env.write()
    run = env.cli("migrate")
    assert run.returncode == 2  # the only image not done was refused (bad input)
    assert launches(run) == []
    row = next(ln for ln in run.stdout.splitlines() if ln.startswith("bad "))
    assert re.match(r"^bad\s+inspect\s+failed\s+[\d.]+\s+-\s+-\s+inspect: \[image bad, step inspect\] "
                    r".*not a multiple of 512", row), run.stdout
    assert re.search(r"^xp\s+define\s+done", run.stdout, re.M)

    before = snapshot(env.base)
    plan = env.cli("plan")
    assert snapshot(env.base) == before
    actions = plan_actions(plan, "bad")
    expected = ("RUN: no receipt (never ran, or did not finish); "
                "last attempt failed: [image bad, step inspect]")
    assert actions["inspect"].startswith(expected), plan.stdout
    assert "not a multiple of 512" in actions["inspect"]
    assert all(a == "skip (up to date)" for a in plan_actions(plan).values())
    assert "5 step(s) to run in 1 image(s), 5 up to date" in plan.stdout

    rep = env.cli("report")
    assert rep.returncode == 0, rep.stderr
    md_path, html_path = env.work / "report.md", env.work / "report.html"
    assert rep.stdout.split() == [str(md_path), str(html_path)]
    changed = {p for p, v in snapshot(env.base).items() if before.get(p) != v}
    assert changed == {str(md_path), str(html_path)}, "report writes its two files and nothing else"
    md = md_path.read_text()
    images = {c[0]: c for c in _md_rows(md, "| image | status |")}
    assert images["xp"][1:4] == ["done", "define", "5/5"]
    assert images["bad"][1:4] == ["failed", "inspect", "0/5"]  # the step reached: the failed one
    assert images["bad"][5] == "-"  # no boot check
    assert "not a multiple of 512" in images["bad"][6]
    steps = {(c[0], c[1]): c for c in _md_rows(md, "| image | step |")}
    assert len(steps) == 10
    for step in STEPS:
        r = json.loads((env.work / "xp" / f"{step}.json").read_text())
        c = steps[("xp", step)]
        assert c[2] == "done"
        assert (c[3], c[4]) == (r["started"], r["finished"])
        assert float(c[5]) == r["duration_s"]
        assert (c[6], c[7]) == (human_bytes(r["bytes_read"]), human_bytes(r["bytes_written"]))
        for out in r["outputs"].values():
            assert out["path"] in c[8]
        for w in r["warnings"]:
            assert w.replace("|", "\\|") in c[9]
    assert str(env.base / "images" / "xp.qcow2") in steps[("xp", "convert")][8]
    assert str(env.work / "xp" / "overlay.qcow2") in steps[("xp", "registry-merge")][8]
    assert steps[("xp", "convert")][6] not in ("", "0 B")
    bad_inspect = steps[("bad", "inspect")]
    assert bad_inspect[2] == "failed" and bad_inspect[3] and bad_inspect[4]
    assert bad_inspect[9].startswith("error: [image bad, step inspect]")
    assert all(steps[("bad", s)][2] == "not run" for s in STEPS[1:])

    page = html_path.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"<(script|link|img)\b|\bsrc=|https?://", page), "self-contained: nothing external"
    assert "<tr class='failed'><td>bad</td><td>inspect</td><td>failed</td>" in page
    assert page.count("<tr class='done'>") == 1 + 5  # the xp image row and its five steps
    assert "not a multiple of 512" in page


def _md_rows(md: str, header: str) -> list[list[str]]:
    lines = md.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(header))
    rows = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", ln.strip())[1:-1]])
    return rows
