"""One ``step_status()`` for the summary, ``plan`` and ``report``: every state from hand-written
receipts and error records (fast: no appliance, no libvirt; fingerprints are stat only)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.app import plan, report, runner
from pipeline.app.status import StepState, chain_status, image_chains, step_status
from pipeline.core import atomic, receipts
from pipeline.core.config import load_config
from pipeline.tasks import chain
from pipeline.tasks.base import ImageTask
from tests.support.fx_pipeline import REPO, make_config
from tests.support.fx_receipts import XP_FACTS, stand_in

EARLY, LATE = "2026-01-01T10:00:00+00:00", "2026-01-01T11:00:00+00:00"


@pytest.fixture
def cfg_path(tmp_path: Path) -> Path:
    src = tmp_path / "d.raw"
    src.write_bytes(b"\0" * 4096)
    return make_config(tmp_path, [{"id": "a", "source": src}])


def steps(cfg_path: Path) -> list[ImageTask]:
    return chain(str(cfg_path), "a")


def done(task: ImageTask, finished: str = EARLY) -> None:
    task.image.image_dir.mkdir(parents=True, exist_ok=True)
    result = stand_in(task, XP_FACTS)  # a typed result the next step can read
    fp = task.fingerprint()
    if task.step == "inspect":
        fp = task.fingerprint_after(fp, receipts.Outcome(result))
    receipts.write(task.receipt_path, receipts.Receipt(
        step=task.step, image_id="a", run_id=receipts.new_run_id(), started=finished, finished=finished,
        duration_s=1.5, fingerprint=fp, outputs={}, bytes_read=0, bytes_written=0, result=result).to_dict())


def failed(task: ImageTask, finished: str) -> None:
    task.image.image_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(task.error_path, {"step": task.step, "image_id": "a", "error": "boom",
                                        "started": None, "finished": finished, "duration_s": 0.5})


def test_nothing_ran(cfg_path: Path) -> None:
    sts = chain_status(steps(cfg_path))
    assert [s.state for s in sts] == [StepState.NOT_RUN] * 5
    assert sts[0].why == "no receipt (never ran, or did not finish)"
    assert sts[1].why == "inspect: no receipt (never ran, or did not finish)"


def test_done_and_stale(cfg_path: Path) -> None:
    inspect, merge, *_ = steps(cfg_path)
    done(inspect)
    assert step_status(inspect).state is StepState.DONE and step_status(inspect).why is None
    done(merge)
    assert step_status(merge).state is StepState.DONE
    src = inspect.image.source
    src.write_bytes(b"\1" * 8192)  # the source changed: inspect is stale, and so is what follows
    st = step_status(merge)
    assert step_status(inspect).state is StepState.STALE
    assert st.state is StepState.STALE and st.own is None and st.why.startswith("inspect: input changed")


def test_failed_after_receipt_counts_failed_before_receipt_does_not(cfg_path: Path) -> None:
    inspect, merge, *_ = steps(cfg_path)
    done(inspect)
    done(merge, finished=EARLY)
    inspect.image.source.write_bytes(b"\1" * 8192)  # stale, re-run, failed again later
    done(inspect)
    failed(merge, finished=LATE)  # the last attempt failed (after the receipt)
    st = step_status(merge)
    assert (st.state, st.error and st.error["error"]) == (StepState.FAILED, "boom")
    failed(merge, finished="2026-01-01T09:00:00+00:00")  # an old failure, before the receipt
    st = step_status(merge)
    assert st.state is StepState.STALE and st.error is None


def test_failed_without_receipt_and_a_done_step_ignores_its_error(cfg_path: Path) -> None:
    inspect, merge, *_ = steps(cfg_path)
    failed(inspect, finished=LATE)
    assert step_status(inspect).state is StepState.FAILED
    done(inspect, finished=EARLY)  # up to date wins: complete() would skip it
    assert step_status(inspect).state is StepState.DONE
    assert step_status(merge).state is StepState.NOT_RUN


def test_summary_plan_and_report_agree(cfg_path: Path) -> None:
    inspect, merge, *_ = steps(cfg_path)
    done(inspect)
    failed(merge, finished=LATE)
    cfg = load_config(cfg_path)
    [summary] = runner.summarize(cfg)
    # the last step reached is the one whose error is shown
    assert (summary.last_step, summary.status, summary.error) == ("registry-merge", "failed",
                                                                  "registry-merge: boom")
    reasons = {step: why for _i, step, why in plan.plan_rows(cfg)}
    assert reasons["inspect"] == plan.UP_TO_DATE
    assert reasons["registry-merge"] == "no receipt (never ran, or did not finish); last attempt failed: boom"
    assert reasons["convert"] == "no receipt (never ran, or did not finish)"  # its own reason first
    rows = {r["step"]: r["status"] for r in report.rows(cfg)}
    assert rows == {"inspect": "done", "registry-merge": "failed", "convert": "not run",
                    "xml-render": "not run", "define": "not run"}
    [image] = report.image_rows(report.rows(cfg))
    assert (image["last step"], image["status"]) == (summary.last_step, summary.status)


def test_plan_says_an_earlier_step_runs_for_a_step_whose_own_inputs_are_unchanged(cfg_path: Path) -> None:
    tasks = steps(cfg_path)
    for t in tasks[:2]:
        done(t)
    tasks[0].image.source.write_bytes(b"\1" * 8192)
    reasons = [why for _i, _s, why in plan.plan_rows(load_config(cfg_path))]
    assert reasons[0].startswith("input changed: disk ") and reasons[1] == plan.EARLIER


def test_plan_quotes_a_changed_choice_as_the_user_wrote_it(tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(b"\0" * 512)
    path = make_config(tmp_path, [{"id": "a", "source": src}])
    tasks = chain(str(path), "a")
    for t in tasks[:3]:
        done(t)
    make_config(tmp_path, [{"id": "a", "source": src}], defaults={"format": "qcow2"})
    reasons = {s: why for _i, s, why in plan.plan_rows(load_config(path))}
    assert "format 'raw' → 'qcow2'" in reasons["convert"], reasons


def test_image_chains_selects_one_image(tmp_path: Path) -> None:
    src = tmp_path / "d.raw"
    src.write_bytes(b"\0" * 512)
    cfg = load_config(make_config(tmp_path, [{"id": "a", "source": src}, {"id": "b", "source": src}]))
    assert [i.id for i, _s in image_chains(cfg)] == ["a", "b"]
    [(img, tasks)] = list(image_chains(cfg, "b"))
    assert img.id == "b" and [t.step for t in tasks][-1] == "define"


def test_failure_recording_is_registered_explicitly(cfg_path: Path) -> None:
    """Importing the runner registers nothing; ``record_failures()`` (called by migrate and inspect)
    makes a worker's death land in ``<step>.error.json``."""
    code = f"""
import luigi, sys
from pipeline.app import runner
from pipeline.tasks import chain
t = chain({str(cfg_path)!r}, "a")[0]
from pipeline.core import paths
paths.claim_image_dir(t.image.image_dir, t.image.id)  # failure records go only into gho2kvm's folders
t.trigger_event(luigi.Event.PROCESS_FAILURE, t, "exit code -9")
print(t.error_path.exists())
runner.record_failures()
t.trigger_event(luigi.Event.PROCESS_FAILURE, t, "exit code -9")
print(t.error_path.read_text())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    first, record = out.stdout.split("\n", 1)
    assert first == "False"
    assert "worker process died unexpectedly (exit code -9, SIGKILL)" in record


def test_summary_names_a_later_failure_that_took_an_earlier_artifact(cfg_path: Path) -> None:
    """A failed step whose failure left an earlier step incomplete (an adopted .gho disk moved away by a
    convert that then failed): the summary says failed, with that step and its error — not 'pending'."""
    inspect, merge, convert, *_ = steps(cfg_path)
    done(inspect)
    done(merge)
    inspect.image.source.write_bytes(b"\1" * 8192)  # inspect's input gone as it was: not done any more
    failed(convert, finished=LATE)
    [summary] = runner.summarize(load_config(cfg_path))
    assert (summary.last_step, summary.status, summary.error) == ("convert", "failed", "convert: boom")
    inspect.image.source.write_bytes(b"\1" * 8192)
    done(inspect)
    done(merge)
    done(convert)  # a later run finished it: the old failure is not shown
    [summary] = runner.summarize(load_config(cfg_path))
    assert summary.status != "failed" and summary.error == ""
