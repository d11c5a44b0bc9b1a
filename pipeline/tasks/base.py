"""The base of every per-image step: receipts, fingerprints, cheap ``complete()``, canonical log line.

A task is wiring only: :meth:`ImageTask.step_input` builds the step's input dataclass from the config
and the typed results of the steps before it (:meth:`ImageTask.upstream_result`), :meth:`ImageTask.execute`
calls the step function, and the base stores a :class:`~pipeline.core.receipts.Receipt` of its result.
The fingerprint is derived from the input (:func:`pipeline.core.receipts.fingerprint_of`).

Luigi traps designed around:
- ``complete()`` and ``requires()`` never raise (an exception there leaves a task UNKNOWN): any
  problem reads as "not complete" and the real error surfaces from ``run()``.
- completeness is the step's *receipt*, written last and atomically; artifacts are atomic too, so a
  killed step never looks complete.
- the process exit code is set from luigi's result by :mod:`pipeline.app.runner` (and ``[retcode]``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

import luigi

from pipeline import __version__
from pipeline.core import atomic, log, receipts
from pipeline.core.config import Config, ImageConfig, load_config
from pipeline.core.errors import Gho2KvmError, InputError, plain_error
from pipeline.core.receipts import Outcome, R, Receipt
from pipeline.core.settings import Settings
from pipeline.steps.vm_source import resolve_config

_config_cache: dict[tuple[str, int], Config] = {}
_settings: dict[str, Settings] = {}  # config path → the settings the CLI resolved (flags included)

#: ``(image_id, step, event, percent, message)``; event: start | progress | done | failed
ProgressSink = Callable[[str, str, str, "float | None", "str | None"], None]
AfterWork = Callable[["ImageTask"], None]


@dataclass
class Hooks:
    """What the application plugs into the tasks of this process, explicitly (nothing at import);
    luigi's worker processes are forked, so they inherit it."""

    #: progress events for the terminal display (:func:`pipeline.app.runner.migrate` sets it)
    progress: ProgressSink | None = None
    #: test seam, never set in production: called with the task after its work, before its receipt
    #: is written (the worst moment for resumability); ``tests/support/inject_cli.py`` sets it
    after_work: AfterWork | None = None
    #: test seam, never set in production: called with a point's name at named moments inside a
    #: step's work (``convert-commit``: the overlay committed, the final disk not yet renamed)
    point: Callable[[str, ImageTask[Any]], None] | None = None

    def at(self, name: str, task: ImageTask[Any]) -> None:
        if self.point is not None:
            self.point(name, task)


hooks = Hooks()


def use_config(cfg: Config) -> None:
    """Make the tasks of this process (and of the workers it forks) see ``cfg`` as the CLI built it:
    its settings (YAML, environment, flags) also hold when the file is reloaded after an edit."""
    path = os.path.abspath(cfg.path)
    _settings[path] = cfg.settings
    key = (path, os.stat(path).st_mtime_ns)
    _config_cache[key] = cfg
    _vm_stamps[key] = _vm_stamp(cfg)


def get_config(path: str) -> Config:
    """Load (once per file version) the config named by a task parameter."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns)
    if key in _config_cache and _vm_stamp(_config_cache[key]) != _vm_stamps.get(key):
        del _config_cache[key]  # a VM's .vmx/.ovf changed since: its settings are read again
    if key not in _config_cache:
        cfg = resolve_config(load_config(path))
        if key[0] in _settings:
            cfg = dataclasses.replace(cfg, settings=_settings[key[0]])
        _config_cache[key] = cfg
        _vm_stamps[key] = _vm_stamp(cfg)
    return _config_cache[key]


_vm_stamps: dict[tuple[str, int], tuple[tuple[str, int], ...]] = {}


def _vm_stamp(cfg: Config) -> tuple[tuple[str, int], ...]:
    """(path, mtime) of every VM description (.vmx/.ovf) the config's images came from."""
    out = []
    for img in cfg.images:
        if img.vm is not None:
            try:
                out.append((str(img.vm), os.stat(img.vm).st_mtime_ns))
            except OSError:
                out.append((str(img.vm), -1))
    return tuple(out)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


U = TypeVar("U", bound=receipts.StepResult)
T = TypeVar("T", bound="ImageTask[Any]")


class ImageTask(luigi.Task, Generic[R]):
    """One step of one image. Subclasses set ``step`` and ``result_type`` (a class with
    ``from_dict``) and implement ``step_input``/``execute``."""

    config_path = luigi.Parameter(description="path of the YAML config the image comes from")
    image_id = luigi.Parameter(description="id of the image in the config")

    step: ClassVar[str] = "?"
    result_type: ClassVar[Any]

    # ------------------------------------------------------------------ wiring
    @property
    def config(self) -> Config:
        return get_config(str(self.config_path))

    @property
    def image(self) -> ImageConfig:
        return self.config.image(str(self.image_id))

    @property
    def force_tcg(self) -> bool:
        """``settings.force_tcg`` (YAML, ``GHO2KVM_FORCE_TCG`` or ``--force-tcg``; resolved once)."""
        return self.config.settings.force_tcg

    @property
    def receipt_path(self) -> Path:
        return self.image.image_dir / f"{self.step}.json"

    @property
    def error_path(self) -> Path:
        return self.image.image_dir / f"{self.step}.error.json"

    def upstream(self) -> ImageTask[Any] | None:
        return None

    def requires(self) -> list[ImageTask[Any]]:
        try:
            up = self.upstream()
        except Exception:  # never raise here: the error surfaces from run()
            return []
        return [up] if up is not None else []

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.receipt_path))

    def receipt(self) -> dict[str, Any] | None:
        """The receipt as stored (JSON)."""
        return receipts.read(self.receipt_path)

    def typed_receipt(self) -> Receipt[R] | None:
        """The receipt with its typed result; None when absent or of an older shape."""
        return receipts.parse_receipt(self.receipt(), self.result_type.from_dict)

    def result(self) -> R | None:
        r = self.typed_receipt()
        return r.result if r is not None else None

    def upstream_task(self, task: type[T]) -> T | None:
        """The earlier step ``task`` of this image's chain, or None when the chain has none."""
        up = self.upstream()
        while up is not None and not isinstance(up, task):
            up = up.upstream()
        return up

    def upstream_result(self, task: type[ImageTask[U]]) -> U:
        """The typed result of the earlier step ``task`` of this image (raises when it has none)."""
        up = self.upstream_task(task)
        if up is None:
            raise InputError(f"no {task.step} step before {self.step}", image_id=str(self.image_id),
                             step=self.step)
        res: U | None = up.result()
        if res is None:
            raise InputError(f"{task.step} has not produced a result yet", image_id=str(self.image_id),
                             step=self.step)
        return res

    def step_input(self) -> Any:
        """The step function's input dataclass, from the config and the upstream results."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """Everything the step's result depends on, from stat and small files only: the step's
        input (:func:`receipts.fingerprint_of`) and the run of the step before."""
        up = self.upstream()
        fp: dict[str, Any] = {"gho2kvm": __version__}
        if up is not None:
            fp["upstream_run_id"] = (up.receipt() or {}).get("run_id")
        fp.update(receipts.fingerprint_of(self.step_input()))
        return fp

    # ------------------------------------------------------------------ completeness
    def stale_reason(self) -> str | None:
        """None when this step and every step before it are complete; else why not."""
        up = self.upstream()
        if up is not None:
            why = up.stale_reason()
            if why is not None:
                return f"{up.step}: {why}"
        return self.own_stale_reason()

    def own_stale_reason(self) -> str | None:
        """None when this step's receipt is current for its inputs and outputs (upstream not asked)."""
        raw = self.receipt()
        if raw is not None and self.typed_receipt() is None:
            return "receipt of an older version (result unreadable)"
        return receipts.why_stale(raw, self.fingerprint())

    def complete(self) -> bool:
        try:
            return self.stale_reason() is None
        except Exception:
            return False

    # ------------------------------------------------------------------ running
    def execute(self) -> Outcome[R]:
        """Do the work: call the step function on :meth:`step_input`; return its result and files."""
        raise NotImplementedError

    def progress(self, percent: float | None = None, message: str | None = None) -> None:
        try:
            if percent is not None:
                self.set_progress_percentage(round(percent, 1))  # type: ignore[misc]
            if message is not None:
                self.set_status_message(message)  # type: ignore[misc]
        except Exception:  # progress is best effort (no scheduler attached in unit tests)
            pass
        _report(str(self.image_id), self.step, "progress", percent, message)

    def fingerprint_after(self, fingerprint: dict[str, Any], out: Outcome[R]) -> dict[str, Any]:
        """The fingerprint the receipt stores: the one taken before the work, plus inputs known only
        after it (a VMDK's extent files), so that the receipt is written once, complete."""
        return fingerprint

    def run(self) -> None:
        from pipeline.steps import sources

        image = self.image
        # the one path rule again (the config was checked before the run; things may have changed),
        # then <workdir>/<id>/ made with gho2kvm's marker: nothing is written before this
        sources.claim(self.config, image, self.step)
        # One step of one image runs in one process at a time, also with several `gho2kvm migrate`
        # processes or luigid handing a task out again after a worker's stale completeness check:
        # wait for the step's lock, re-check, and skip the work if another worker just finished it.
        with _step_lock(image.image_dir / f".{self.step}.lock"), log.bind(image_id=image.id, task=self.step):
            if self.complete():
                log.get().info("step already done by another worker")
                return
            self._run_locked(image)

    def _run_locked(self, image: ImageConfig) -> None:
        started = now_iso()
        t0 = time.monotonic()
        logger = log.get()
        logger.info("step started")
        _report(image.id, self.step, "start")
        # receipt/error-record temps of a killed run of this step (we hold the step's lock)
        for made in (self.receipt_path, self.error_path):
            atomic.remove_stale_temps(image.image_dir, f"{made.name}{atomic.TMP_MARK}")
        fingerprint = self.fingerprint()
        try:
            out = self.execute()
            if hooks.after_work is not None:
                hooks.after_work(self)
        except BaseException as e:
            duration = round(time.monotonic() - t0, 2)
            msg = error_line(e)
            record = {"step": self.step, "image_id": image.id, "error": msg, "started": started,
                      "finished": now_iso(), "duration_s": duration,
                      "refused": isinstance(e, InputError)}  # bad input: the CLI exits 2
            details = getattr(e, "details", None)  # e.g. a failed boot check's verdict
            if isinstance(details, dict):
                record["details"] = details
            atomic.write_json(self.error_path, record)
            logger.error("step failed", duration_s=duration, error=msg)
            _report(image.id, self.step, "failed", message=msg)
            raise
        fingerprint = self.fingerprint_after(fingerprint, out)
        outputs = {name: receipts.output_stamp(Path(p)) for name, p in out.outputs.items()}
        duration = round(time.monotonic() - t0, 2)
        receipt = Receipt(
            step=self.step, image_id=image.id, run_id=receipts.new_run_id(), started=started,
            finished=now_iso(), duration_s=duration, fingerprint=fingerprint, outputs=outputs,
            bytes_read=out.bytes_read,
            bytes_written=out.bytes_written if out.bytes_written is not None
            else sum(o["allocated"] for o in outputs.values()),
            result=out.result)
        receipts.write(self.receipt_path, receipt.to_dict())
        self.error_path.unlink(missing_ok=True)
        # the canonical line: one per task
        logger.info("step done", duration_s=duration, bytes_read=receipt.bytes_read,
                    bytes_written=receipt.bytes_written, warnings=len(receipt.warnings))
        _report(image.id, self.step, "done")

    def on_failure(self, exception: BaseException) -> str:
        line = error_line(exception)
        if isinstance(exception, Gho2KvmError):
            return line
        return f"[image {self.image_id}, step {self.step}] {line}"


def _report(image_id: str, step: str, event: str, percent: float | None = None,
            message: str | None = None) -> None:
    if hooks.progress is not None:
        hooks.progress(image_id, step, event, percent, message)


def error_line(e: BaseException) -> str:
    """The one-line error a failed step records in ``<step>.error.json``."""
    return e.one_line() if isinstance(e, Gho2KvmError) else plain_error(e)


@contextlib.contextmanager
def _step_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
