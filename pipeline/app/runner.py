"""Run the pipeline with luigi; turn the result into an exit code and a summary table.

- exit 0 when every selected image is done, 2 when every image that is not done was refused for bad
  input (a step's ``InputError``), 1 when any failed otherwise or was not reached (config, path-rule
  and usage errors exit 2 from :mod:`pipeline.app.cli` before anything runs);
- the summary names, per image, the last step reached, the status, the seconds spent in this run,
  the steps this run executed, the boot check's verdict and the error (``<step>: <message>``);
- failures luigi sees outside ``ImageTask.run`` (a worker process killed, a dependency found
  incomplete at run time) are recorded in ``<step>.error.json`` too, so summary, plan and report
  show them;
- with a central scheduler (luigid) workers stay alive while other workers run tasks they wait for
  (``keep_alive``), and tasks luigid disabled after a failure in an earlier run are re-enabled:
  re-running ``gho2kvm migrate`` is the retry (``retry_count = 0`` in ``luigi.cfg`` keeps a
  deterministic failure from being retried *within* a run).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import luigi

from pipeline.app import progress
from pipeline.app.status import StepState, chain_status, image_chains
from pipeline.core import atomic, log, receipts
from pipeline.core.choices import Scheduler
from pipeline.core.config import Config
from pipeline.core.errors import InputError
from pipeline.tasks import MigrateAll
from pipeline.tasks.base import ImageTask, error_line, hooks, now_iso, use_config
from pipeline.tools import guestfs, screen


@dataclass
class ImageStatus:
    image_id: str
    last_step: str  # last step reached: the failed one, else the last complete one ("-" when none)
    status: str  # done | failed | pending
    duration_s: float  # seconds spent on this image in this run (steps run + a failed attempt)
    error: str  # "<step>: <message>" when failed
    ran: list[str] = field(default_factory=list)  # steps executed by this run
    boot: str = "-"  # the boot check's verdict (``prompt 24.3s``), "-" without one
    refused: bool = False  # failed on bad input (an InputError): the run exits 2


def run_log_path(cfg: Config) -> Path:
    ts = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return cfg.images[0].workdir / "logs" / f"run-{ts}-{os.getpid()}.jsonl"


def migrate(cfg: Config, *, image: str | None = None, workers: int = 1) -> int:
    """Run every step of ``cfg``'s images (or of ``image``); ``cfg.settings`` (YAML, environment and
    flags, resolved once by the CLI) choose the scheduler and reach every task."""
    if image:
        cfg.image(image)  # unknown id → InputError (exit 2) before anything runs
    from pipeline.tools import virt

    use_config(cfg)
    record_failures()
    virt.quiet_errors()
    hooks.progress = progress.report
    scheduler = cfg.settings.scheduler
    kwargs: dict[str, Any] = {"workers": workers, "detailed_summary": True}
    url = None
    if scheduler is Scheduler.CENTRAL:
        url = cfg.settings.scheduler_url.rstrip("/")
        kwargs["scheduler_url"] = url
        kwargs["local_scheduler"] = False
        _central_worker_config()
    else:
        kwargs["local_scheduler"] = True
    log_file = run_log_path(cfg)
    log.configure(log_file=log_file)
    log.luigi_defers_to_us()
    logger = log.get()
    if url is not None:
        reenabled = reenable_disabled(url, cfg, image)
        if reenabled:
            logger.info("re-enabled tasks luigid disabled after an earlier failure", tasks=reenabled)
    logger.info("migration started", config=str(cfg.path), images=len(cfg.images), only=image,
                workers=workers, scheduler=scheduler, log_file=str(log_file))
    task = MigrateAll(config_path=str(cfg.path.absolute()), only=image or "")
    before = run_ids(cfg, image)
    t0 = time.monotonic()
    # inspect may leave its appliance to registry-merge; none outlives the build
    with progress.Display(enabled=None if cfg.settings.progress else False), \
            guestfs.sharing([img.image_dir for img in cfg.images]), virt.caps_once_per_run():
        result = luigi.build([task], **kwargs)
    statuses = summarize(cfg, image, before=before)
    print_summary(statuses)
    # the receipts are the truth: a worker sharing luigid reports tasks another worker finished as
    # "not run" (NOT_RUN), and a task that failed once but succeeded on a retry is done
    ok = all(s.status == "done" for s in statuses)
    if result.status.name == "SCHEDULING_FAILED":
        print(f"scheduling failed (is luigid reachable at {url}?)", file=sys.stderr)
    logger.info("migration finished", ok=ok, seconds=round(time.monotonic() - t0, 2),
                steps_run=sum(len(s.ran) for s in statuses),
                failed=[s.image_id for s in statuses if s.status == "failed"],
                pending=[s.image_id for s in statuses if s.status == "pending"], luigi=result.status.name)
    return 0 if ok else exit_code(statuses)


def exit_code(statuses: list[ImageStatus]) -> int:
    """0 when every image is done; 2 when every image that is not done was refused for bad input
    (docs/safety.md: refusals exit 2 in every command); else 1."""
    open_ = [s for s in statuses if s.status != "done"]
    if not open_:
        return 0
    return 2 if all(s.status == "failed" and s.refused for s in open_) else 1


# ---------------------------------------------------------------------------------------------- luigid


def _central_worker_config() -> None:
    conf = luigi.configuration.get_config()
    # a worker sharing luigid waits for the tasks another worker is running instead of exiting with
    # them "pending"; it leaves once nothing it asked for can still run
    conf.set("worker", "keep_alive", "true")
    if not conf.has_option("worker", "wait_jitter"):
        conf.set("worker", "wait_jitter", "1.0")


def _api(url: str, method: str, data: dict[str, Any], timeout: float = 10) -> Any:
    body = urllib.parse.urlencode({"data": json.dumps(data)}).encode()
    with urllib.request.urlopen(f"{url}/api/{method}", data=body, timeout=timeout) as resp:  # noqa: S310
        return json.loads(resp.read().decode()).get("response")


def reenable_disabled(url: str, cfg: Config, only: str | None = None) -> list[str]:
    """Re-enable this config's tasks that luigid disabled after a failure (for ``disable_persist``
    seconds, a day by default): a new ``gho2kvm migrate`` is the user's retry. Fails fast with an
    :class:`InputError` when luigid does not answer."""
    try:
        listed = _api(url, "task_list", {"status": "DISABLED", "upstream_status": "", "search": ""})
    except OSError as e:
        raise InputError(f"luigid not reachable at {url} ({getattr(e, 'reason', e)}); start it with "
                         f"`make luigid` or run with --scheduler local") from None
    ours = {t.task_id for _img, steps in image_chains(cfg, only) for t in steps}
    done = []
    for task_id in listed or {}:
        if task_id in ours:
            _api(url, "re_enable_task", {"task_id": task_id})
            done.append(task_id)
    return done


# ---------------------------------------------------------------------------------------------- failures


def _record_failure(task: ImageTask, message: str, *, always: bool) -> None:
    from pipeline.core import paths

    try:
        if not paths.owns_folder(task.error_path.parent):
            return  # never into a folder gho2kvm did not make (docs/safety.md)
        old = receipts.read(task.error_path)
        if not always and old is not None and old.get("error") == message:
            return  # ImageTask.run recorded it already, with its timing
        atomic.write_json(task.error_path, {"step": task.step, "image_id": str(task.image_id),
                                            "error": message, "started": None, "finished": now_iso(),
                                            "duration_s": 0.0})
    except Exception:  # recording is best effort; luigi's own result still fails the run
        pass


def record_failures() -> None:
    """Have luigi record the failures it sees outside ``ImageTask.run`` in ``<step>.error.json``
    (called by every command that runs tasks; registering twice is harmless)."""
    ImageTask.event_handler(luigi.Event.FAILURE)(_on_failure)
    ImageTask.event_handler(luigi.Event.PROCESS_FAILURE)(_on_process_failure)


def _on_failure(task: ImageTask, exception: BaseException) -> None:
    _record_failure(task, error_line(exception), always=False)


def _on_process_failure(task: ImageTask, error_msg: str) -> None:
    code = error_msg.rsplit(" ", 1)[-1]
    detail = f"exit code {code}"
    try:
        if int(code) < 0:
            detail += f", {signal.Signals(-int(code)).name}"
    except ValueError:
        pass
    _record_failure(task, f"worker process died unexpectedly ({detail}) before recording a result",
                    always=True)


# ---------------------------------------------------------------------------------------------- summary


def run_ids(cfg: Config, only: str | None = None) -> dict[tuple[str, str], str | None]:
    """(image id, step) → run_id of the current receipt (None when absent)."""
    return {(img.id, t.step): (t.receipt() or {}).get("run_id")
            for img, steps in image_chains(cfg, only) for t in steps}


def summarize(cfg: Config, only: str | None = None,
              before: dict[tuple[str, str], str | None] | None = None) -> list[ImageStatus]:
    out = []
    for img, steps in image_chains(cfg, only):
        last, status, error, duration, ran = "-", "pending", "", 0.0, []
        refused = False
        statuses = chain_status(steps)
        for st in statuses:
            r = st.receipt
            if r is not None and before is not None and r.get("run_id") != before.get((img.id, st.step)):
                ran.append(st.step)
                duration += float(r.get("duration_s") or 0)
        for i, st in enumerate(statuses):
            if st.state is StepState.DONE:
                last = st.step
                continue
            # the step that failed: this one, or a later one whose failure took an earlier step's
            # artifact with it (an adopted .gho disk moved away by a convert that then failed)
            failed = next((f for f in statuses[i:] if f.error is not None), None)
            if failed is not None and failed.error is not None:
                last, status, error = failed.step, "failed", f"{failed.step}: {failed.error.get('error', '')}"
                duration += float(failed.error.get("duration_s") or 0)
                refused = bool(failed.error.get("refused"))
            break
        else:
            status = "done"
        define = steps[-1]
        boot = screen.short(screen.recorded(define.receipt(), receipts.read(define.error_path)))
        out.append(ImageStatus(img.id, last, status, round(duration, 1), error, ran, boot, refused))
    return out


def print_summary(statuses: list[ImageStatus], file: Any = None) -> None:
    file = file or sys.stdout
    rows = [("image", "last step", "status", "seconds", "ran", "boot", "error")]
    rows += [(s.image_id, s.last_step, s.status, f"{s.duration_s:.1f}", ",".join(s.ran) or "-", s.boot,
              s.error) for s in statuses]
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    for r in rows:
        print(("  ".join(c.ljust(w) for c, w in zip(r[:6], widths, strict=True)) + "  " + r[6]).rstrip(),
              file=file)
    failed = sum(1 for s in statuses if s.status == "failed")
    pending = sum(1 for s in statuses if s.status == "pending")
    print(f"{len(statuses)} image(s): {len(statuses) - failed - pending} done, {failed} failed, "
          f"{pending} not finished", file=file)
