"""The one wrapper every external program runs through.

argv list (never a shell), a timeout, captured stdout/stderr, secrets redacted, and a typed
:class:`~pipeline.errors.ToolError` naming the image, the step and the tool's own message.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import ToolError

REDACTED = "***"


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def redact(argv: Sequence[str], secrets: Sequence[str]) -> list[str]:
    out = []
    for arg in argv:
        for s in secrets:
            if s:
                arg = arg.replace(s, REDACTED)
        out.append(arg)
    return out


def _tool_message(stderr: str, stdout: str) -> str:
    text = stderr.strip() or stdout.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "(no output)"
    # The last lines usually carry the actual error; keep it to one line.
    return " | ".join(lines[-3:])[:800]


def run(
    argv: Sequence[str],
    *,
    step: str,
    image_id: str | None = None,
    timeout: float | None = 3600,
    input: str | bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
    secrets: Sequence[str] = (),
    check: bool = True,
    on_stdout: Callable[[str], None] | None = None,
) -> Result:
    """Run ``argv`` and return its output; raise :class:`ToolError` on failure.

    ``env`` entries are added to the current environment. ``on_stdout`` receives stdout chunks
    as they arrive (split on ``\\r`` and ``\\n``), for progress parsing.
    """
    argv = [str(a) for a in argv]
    shown = redact(argv, secrets)
    tool = os.path.basename(argv[0])
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise ToolError(
            f"{tool}: not found ({e.strerror}); is it installed?",
            tool=tool, argv=shown, returncode=None, image_id=image_id, step=step,
        ) from None
    out_chunks: list[str] = []
    err_chunks: list[str] = []

    def pump(stream, sink: list[str], callback: Callable[[str], None] | None) -> None:
        buf = ""
        while True:
            data = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
            if not data:
                break
            text = data.decode("utf-8", "replace")
            sink.append(text)
            if callback:
                buf += text
                parts = buf.replace("\r", "\n").split("\n")
                buf = parts.pop()
                for part in parts:
                    if part.strip():
                        callback(part)
        if callback and buf.strip():
            callback(buf)

    threads = [
        threading.Thread(target=pump, args=(proc.stdout, out_chunks, on_stdout), daemon=True),
        threading.Thread(target=pump, args=(proc.stderr, err_chunks, None), daemon=True),
    ]
    for t in threads:
        t.start()
    if input is not None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(input.encode() if isinstance(input, str) else input)
            proc.stdin.close()
        except BrokenPipeError:
            pass
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        for t in threads:
            t.join(5)
        raise ToolError(
            f"{tool} timed out after {timeout:.0f}s: {_tool_message(''.join(err_chunks), '')}",
            tool=tool, argv=shown, returncode=None, stderr="".join(err_chunks),
            image_id=image_id, step=step,
        ) from None
    except BaseException:
        _kill_group(proc)
        raise
    for t in threads:
        t.join()
    stdout = "".join(out_chunks)
    stderr = "".join(err_chunks)
    for s in secrets:
        if s:
            stdout = stdout.replace(s, REDACTED)
            stderr = stderr.replace(s, REDACTED)
    result = Result(shown, rc, stdout, stderr, time.monotonic() - start)
    if check and rc != 0:
        raise ToolError(
            f"{tool} failed (exit {rc}): {_tool_message(stderr, stdout)}",
            tool=tool, argv=shown, returncode=rc, stderr=stderr, stdout=stdout,
            image_id=image_id, step=step,
        )
    return result


def pid_alive(pid: int) -> bool:
    """True if process ``pid`` exists and is not a zombie (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
