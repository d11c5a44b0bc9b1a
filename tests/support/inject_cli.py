"""``python tests/support/inject_cli.py STEP[:kill] ARGS...``: the gho2kvm CLI with a failure injected into
STEP after its work, before its receipt is written (the worst moment for resumability), or at a named
point inside a step's work (``convert-commit``: pipeline.tasks.base.hooks.at).

The test seam is ``pipeline.tasks.base.hooks.after_work``; production never sets it. Luigi's
worker processes are forked from this one, so they inherit the hook.
"""

from __future__ import annotations

import os
import signal
import sys

from pipeline.app.cli import main
from pipeline.tasks.base import ImageTask, hooks


def fail_after(spec: str):  # type: ignore[no-untyped-def]
    """The hook for ``STEP`` (raise) or ``STEP:kill`` (SIGKILL the process running the step)."""
    name, _, how = spec.partition(":")

    def hook(task: ImageTask) -> None:
        if task.step != name:
            return
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure in {task.step} (after its work)")

    return hook


def fail_at(spec: str):  # type: ignore[no-untyped-def]
    """The hook for a named point inside a step's work (``convert-commit[:kill]``)."""
    name, _, how = spec.partition(":")

    def hook(point: str, task: ImageTask) -> None:
        if point != name:
            return
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected failure in {task.step} (at {point})")

    return hook


if __name__ == "__main__":
    spec, *args = sys.argv[1:]
    hooks.after_work = fail_after(spec)
    hooks.point = fail_at(spec)
    sys.exit(main(args))
