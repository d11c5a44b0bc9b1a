"""The status of every step, one rule for the summary (:mod:`runner`), ``plan`` and ``report``.

Read from receipts, error records and ``stat`` only — what ``complete()`` reads:

- **done**: the step's receipt matches its fingerprint and every step before it is done;
- **failed**: not done, and its error record is not older than its receipt (the last attempt failed);
- **stale**: not done, with a receipt (an input changed, or an earlier step is not done);
- **not run**: no receipt and no error record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from pipeline.core import receipts
from pipeline.core.config import Config, ImageConfig
from pipeline.tasks import chain
from pipeline.tasks.base import ImageTask


class StepState(StrEnum):
    DONE = "done"
    FAILED = "failed"
    STALE = "stale"
    NOT_RUN = "not run"


@dataclass(frozen=True)
class StepStatus:
    task: ImageTask
    state: StepState
    receipt: dict[str, Any] | None
    error: dict[str, Any] | None  # the error record of the last attempt, when it failed (state failed)
    own: str | None  # why the step itself is out of date (None: its receipt matches its inputs)
    own_unknown: bool  # its fingerprint could not be taken (``own`` holds the exception)
    why: str | None  # why it is not done: ``own``, or ``<earlier step>: <its why>``; None when done
    upstream_done: bool

    @property
    def step(self) -> str:
        return self.task.step


def failed_attempt(receipt: dict[str, Any] | None, error: dict[str, Any] | None) -> dict[str, Any] | None:
    """``error`` when it records the last attempt: not older than the receipt (or no receipt)."""
    if error is None:
        return None
    if receipt is not None and str(error.get("finished") or "") < str(receipt.get("finished") or ""):
        return None
    return error


def chain_status(tasks: list[ImageTask]) -> list[StepStatus]:
    """The status of each step of one image's chain (``tasks`` in order, first step first)."""
    out: list[StepStatus] = []
    upstream_done, upstream_why, upstream_step = True, None, ""
    for task in tasks:
        receipt = task.receipt()
        unknown = False
        try:
            # the task's own rule (an adopted .gho disk, an old receipt); no receipt needs no fingerprint
            own = receipts.why_stale(None, {}) if receipt is None else task.own_stale_reason()
        except Exception as e:  # e.g. the disk ghost-convert will produce is not known yet
            own, unknown = f"{type(e).__name__}: {e}", True
        done = upstream_done and own is None
        why = None if done else (own if upstream_done else f"{upstream_step}: {upstream_why}")
        error = None if done else failed_attempt(receipt, receipts.read(task.error_path))
        if done:
            state = StepState.DONE
        elif error is not None:
            state = StepState.FAILED
        elif receipt is not None:
            state = StepState.STALE
        else:
            state = StepState.NOT_RUN
        out.append(StepStatus(task, state, receipt, error, own, unknown, why, upstream_done))
        upstream_done, upstream_why, upstream_step = done, why, task.step
    return out


def step_status(task: ImageTask) -> StepStatus:
    """The status of one step (its earlier steps are read too: a step is done only when they are)."""
    tasks = [task]
    while (up := tasks[0].upstream()) is not None:
        tasks.insert(0, up)
    return chain_status(tasks)[-1]


def image_chains(cfg: Config, only: str | None = None) -> Iterator[tuple[ImageConfig, list[ImageTask]]]:
    """Every image of ``cfg`` (or just ``only``) with its steps in order."""
    path = str(cfg.path.absolute())
    for img in cfg.images:
        if only and img.id != only:
            continue
        yield img, chain(path, img.id)
