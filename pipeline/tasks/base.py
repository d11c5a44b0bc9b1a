"""The base of every per-image step: receipts, fingerprints, cheap ``complete()``, canonical log line.

Luigi traps designed around:
- ``complete()`` and ``requires()`` never raise (an exception there leaves a task UNKNOWN): any
  problem reads as "not complete" and the real error surfaces from ``run()``.
- completeness is the step's *receipt*, written last and atomically; artifacts are atomic too, so a
  killed step never looks complete.
- the process exit code is set from luigi's result by :mod:`pipeline.app.runner` (and ``[retcode]``).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import luigi

from pipeline import __version__
from pipeline.app import progress
from pipeline.core import atomic, log, receipts
from pipeline.core.config import Config, ImageConfig, load_config
from pipeline.core.env import force_tcg_from_env
from pipeline.core.errors import Gho2KvmError

_config_cache: dict[tuple[str, int], Config] = {}


def get_config(path: str) -> Config:
    """Load (once per file version) the config named by a task parameter."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_mtime_ns)
    if key not in _config_cache:
        _config_cache[key] = load_config(path)
    return _config_cache[key]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ImageTask(luigi.Task):
    """One step of one image. Subclasses set ``step`` and implement ``fingerprint``/``execute``."""

    config_path = luigi.Parameter(description="path of the YAML config the image comes from")
    image_id = luigi.Parameter(description="id of the image in the config")

    step: ClassVar[str] = "?"

    # ------------------------------------------------------------------ wiring
    @property
    def config(self) -> Config:
        return get_config(str(self.config_path))

    @property
    def image(self) -> ImageConfig:
        return self.config.image(str(self.image_id))

    @property
    def force_tcg(self) -> bool:
        return self.config.settings.force_tcg or force_tcg_from_env()

    @property
    def receipt_path(self) -> Path:
        return self.image.image_dir / f"{self.step}.json"

    @property
    def error_path(self) -> Path:
        return self.image.image_dir / f"{self.step}.error.json"

    def upstream(self) -> ImageTask | None:
        return None

    def requires(self) -> list[ImageTask]:
        try:
            up = self.upstream()
        except Exception:  # never raise here: the error surfaces from run()
            return []
        return [up] if up is not None else []

    def output(self) -> luigi.LocalTarget:
        return luigi.LocalTarget(str(self.receipt_path))

    def receipt(self) -> dict[str, Any] | None:
        return receipts.read(self.receipt_path)

    def upstream_receipt(self) -> dict[str, Any]:
        up = self.upstream()
        r = up.receipt() if up is not None else None
        return r or {}

    def fingerprint(self) -> dict[str, Any]:
        """Everything the step's result depends on, from stat and small files only."""
        up = self.upstream()
        fp: dict[str, Any] = {"gho2kvm": __version__}
        if up is not None:
            fp["upstream_run_id"] = (up.receipt() or {}).get("run_id")
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
        return receipts.why_stale(self.receipt(), self.fingerprint())

    def complete(self) -> bool:
        try:
            return self.stale_reason() is None
        except Exception:
            return False

    # ------------------------------------------------------------------ running
    def execute(self) -> dict[str, Any]:
        """Do the work; return ``{"result": ..., "outputs": {name: path}, "bytes_read": n, ...}``."""
        raise NotImplementedError

    def progress(self, percent: float | None = None, message: str | None = None) -> None:
        try:
            if percent is not None:
                self.set_progress_percentage(round(percent, 1))  # type: ignore[misc]
            if message is not None:
                self.set_status_message(message)  # type: ignore[misc]
        except Exception:  # progress is best effort (no scheduler attached in unit tests)
            pass
        progress.report(str(self.image_id), self.step, "progress", percent, message)

    def fingerprint_after(self, fingerprint: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        """The fingerprint the receipt stores: the one taken before the work, plus inputs known only
        after it (a VMDK's extent files), so that the receipt is written once, complete."""
        return fingerprint

    def run(self) -> None:
        image = self.image
        image.image_dir.mkdir(parents=True, exist_ok=True)
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
        progress.report(image.id, self.step, "start")
        fingerprint = self.fingerprint()
        try:
            out = self.execute()
            _inject_failure(self.step, "after")
        except BaseException as e:
            duration = round(time.monotonic() - t0, 2)
            msg = error_line(e)
            record = {"step": self.step, "image_id": image.id, "error": msg, "started": started,
                      "finished": now_iso(), "duration_s": duration}
            details = getattr(e, "details", None)  # e.g. a failed boot check's verdict
            if isinstance(details, dict):
                record["details"] = details
            atomic.write_json(self.error_path, record)
            logger.error("step failed", duration_s=duration, error=msg)
            progress.report(image.id, self.step, "failed", message=msg)
            raise
        fingerprint = self.fingerprint_after(fingerprint, out)
        outputs = {name: receipts.output_stamp(Path(p)) for name, p in out.get("outputs", {}).items()}
        duration = round(time.monotonic() - t0, 2)
        receipt = {
            "step": self.step,
            "image_id": image.id,
            "run_id": receipts.new_run_id(),
            "started": started,
            "finished": now_iso(),
            "duration_s": duration,
            "fingerprint": fingerprint,
            "outputs": outputs,
            "bytes_read": out.get("bytes_read", 0),
            "bytes_written": out.get("bytes_written", sum(o["allocated"] for o in outputs.values())),
            "warnings": out.get("result", {}).get("warnings", []) if isinstance(out.get("result"), dict)
            else [],
            "result": out.get("result", {}),
        }
        receipts.write(self.receipt_path, receipt)
        self.error_path.unlink(missing_ok=True)
        # the canonical line: one per task
        logger.info("step done", duration_s=duration, bytes_read=receipt["bytes_read"],
                    bytes_written=receipt["bytes_written"], warnings=len(receipt["warnings"]))
        progress.report(image.id, self.step, "done")

    def on_failure(self, exception: BaseException) -> str:
        line = error_line(exception)
        if isinstance(exception, Gho2KvmError):
            return line
        return f"[image {self.image_id}, step {self.step}] {line}"


def error_line(e: BaseException) -> str:
    """The one-line error a failed step records in ``<step>.error.json``."""
    return e.one_line() if isinstance(e, Gho2KvmError) else f"{type(e).__name__}: {e}"


@contextlib.contextmanager
def _step_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _inject_failure(step: str, when: str) -> None:
    """Test hook: ``GHO2KVM_INJECT_FAILURE=<step>[:kill]`` fails (or SIGKILLs) a step after its work,
    before its receipt is written: the worst moment for resumability."""
    spec = os.environ.get("GHO2KVM_INJECT_FAILURE", "")
    if not spec:
        return
    name, _, how = spec.partition(":")
    if name != step:
        return
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise RuntimeError(f"injected failure in {step} ({when} its work)")
