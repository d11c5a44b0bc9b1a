"""Typed errors. Every message is one line naming the image, the step and what went wrong."""

from __future__ import annotations


class Gho2KvmError(Exception):
    """Base class: a failure the user should see as one clear line."""

    #: deterministic failures (bad input) are never retried; transient ones may be.
    transient = False

    def __init__(self, message: str, *, image_id: str | None = None, step: str | None = None) -> None:
        self.message = message
        self.image_id = image_id
        self.step = step
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.image_id:
            where.append(f"image {self.image_id}")
        if self.step:
            where.append(f"step {self.step}")
        prefix = f"[{', '.join(where)}] " if where else ""
        return prefix + " ".join(self.message.split())


class InputError(Gho2KvmError):
    """The user's input (config, source image, .reg file) is not acceptable."""


class ToolError(Gho2KvmError):
    """An external program failed; carries its argv (redacted), exit code and stderr."""

    def __init__(
        self,
        message: str,
        *,
        tool: str,
        argv: list[str],
        returncode: int | None,
        stderr: str = "",
        stdout: str = "",
        image_id: str | None = None,
        step: str | None = None,
    ) -> None:
        self.tool = tool
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        self.stdout = stdout
        super().__init__(message, image_id=image_id, step=step)


class TransientError(Gho2KvmError):
    """A failure worth retrying later (e.g. libvirt daemon unreachable)."""

    transient = True
