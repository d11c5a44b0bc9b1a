"""The one wrapper every external program runs through.

argv list (never a shell), a timeout, captured stdout/stderr, secrets redacted, and a typed
:class:`~pipeline.core.errors.ToolError` naming the image, the step and the tool's own message.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.core.errors import ToolError

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


def _tool_message(stderr: str, stdout: str, empty: str = "(no output)") -> str:
    text = stderr.strip() or stdout.strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return empty
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
    start = time.monotonic()
    proc = _spawn(argv, shown=shown, step=step, image_id=image_id, env=env, cwd=cwd,
                  stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        return _finish(proc, argv=argv, shown=shown, tool=tool, step=step, image_id=image_id, timeout=timeout,
                       input=input, secrets=secrets, check=check, on_stdout=on_stdout, start=start)
    finally:
        _children.discard(proc.pid)


def _spawn(argv: list[str], *, shown: list[str], step: str, image_id: str | None,
           env: Mapping[str, str] | None, cwd: str | None, stdin: int,
           stderr: int | IO[bytes], stdout: int | IO[bytes] = subprocess.PIPE) -> subprocess.Popen:
    """Start ``argv`` the one way every tool starts: ``env`` added to the environment, its own session
    (a timeout kills the tool's children too), PR_SET_PDEATHSIG, tracked in ``_children``; a missing
    program is a :class:`ToolError` naming image and step."""
    tool = os.path.basename(argv[0])
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, env=full_env,
                                cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)
    except FileNotFoundError as e:
        raise ToolError(f"{tool}: not found ({e.strerror}); is it installed?", tool=tool, argv=shown,
                        returncode=None, image_id=image_id, step=step) from None
    _children.add(proc.pid)
    return proc


def _finish(proc: subprocess.Popen, *, argv: list[str], shown: list[str], tool: str, step: str,
            image_id: str | None, timeout: float | None, input: str | bytes | None, secrets: Sequence[str],
            check: bool, on_stdout: Callable[[str], None] | None, start: float) -> Result:
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
        said = _tool_message("".join(err_chunks), "", empty="")
        raise ToolError(
            f"{tool} timed out after {timeout:g} s" + (f"; its last output: {said}" if said else
                                                         " without any output"),
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


# ---------------------------------------------------------------------------------------------
# children die with us

#: process groups of the tools running now (each tool leads its own session)
_children: set[int] = set()
_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Callable[..., int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.prctl
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    return fn


_prctl = _load_prctl()  # resolved once here: the forked child only makes the call


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when gho2kvm dies, even by SIGKILL (Linux)."""
    parent = os.getppid()
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # gho2kvm died between fork and prctl
        os._exit(1)


#: daemons a tool left running for us (guestfish --listen): pid -> watchdog
_daemons: dict[int, subprocess.Popen] = {}

# Polls twice a second. It SIGKILLs the daemon when its owner is gone (the owner's start time no
# longer matches: exited, or the pid reused), and, with an idle file, when that file is still there
# ``idle`` seconds after its last change: then it first claims the file (renames it away, so that
# nobody can take the daemon any more), and after the kill removes the files the claimed JSON lists
# under "remove" and the claimed file itself. It exits as soon as the daemon does. A daemon has been
# re-parented away from us, so PR_SET_PDEATHSIG of the tool that started it does not reach it.
_WATCHDOG = """
import json, os, signal, sys, time
owner, owner_start, pid = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
idle_file, idle = (sys.argv[4], float(sys.argv[5])) if len(sys.argv) > 5 else (None, 0.0)
def start(p):
    try:
        with open('/proc/%d/stat' % p) as fh:
            fields = fh.read().rsplit(') ', 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in 'ZX' else fields[19]
def alive(p):
    try:
        os.kill(p, 0)
    except OSError:
        return False
    return start(p) is not None
while True:
    time.sleep(0.5)
    if not alive(pid):
        break
    if start(owner) != owner_start:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
        break
    if idle_file is None:
        continue
    try:
        expired = time.time() - os.stat(idle_file).st_mtime > idle
    except OSError:
        idle_file = None  # claimed by its user: only the owner matters now
        continue
    if not expired:
        continue
    claimed = idle_file + '.idle-%d' % os.getpid()
    try:
        os.rename(idle_file, claimed)
    except OSError:
        idle_file = None
        continue
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
    for _ in range(100):
        if not alive(pid):
            break
        time.sleep(0.1)
    try:
        with open(claimed) as fh:
            remove = json.load(fh).get('remove', [])
    except (OSError, ValueError, AttributeError):
        remove = []
    for path in [*remove, claimed]:
        try:
            os.unlink(path)
        except OSError:
            pass
    break
"""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, from /proc), None if it is gone or a
    zombie: with the pid it names one process, whatever pid reuse happens later."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else fields[19]


def watch_daemon(pid: int, *, owner: int | None = None, idle: tuple[Path, float] | None = None) -> None:
    """Make the daemon ``pid`` (started by one of our tools) die with its owner, SIGKILL included: this
    process by default, or the process ``owner`` (e.g. the process a forked luigi worker belongs to).
    ``idle=(path, seconds)``: also kill it when ``path`` has not been claimed (renamed or removed) within
    ``seconds`` of its last change — see the watchdog script above."""
    import sys

    owner = os.getpid() if owner is None else owner
    owner_start = process_start(owner)
    if owner_start is None:
        raise RuntimeError(f"watch_daemon: owner process {owner} is gone")
    extra = [str(idle[0]), str(idle[1])] if idle is not None else []
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(owner), owner_start, str(pid), *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                start_new_session=True, close_fds=True)
    old = _daemons.pop(pid, None)
    _daemons[pid] = watchdog
    if old is not None:  # the new watchdog is in place before the old one goes
        _stop(old)


def unwatch_daemon(pid: int) -> None:
    watchdog = _daemons.pop(pid, None)
    if watchdog is not None:
        _stop(watchdog)


def _stop(watchdog: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        watchdog.kill()
    watchdog.wait()


def start_daemon(argv: Sequence[str], *, step: str, image_id: str | None = None, log: Path,
                 pid_from: Callable[[str], int | None], timeout: float = 60,
                 env: Mapping[str, str] | None = None) -> int:
    """Start a tool that forks a server and exits (``guestfish --listen``); return the server's pid.

    Like :func:`run`: argv list, ``env`` added to the environment, the foreground process in its own
    session with PR_SET_PDEATHSIG, a timeout, and a :class:`ToolError` naming image, step and the
    tool's message. The tool's stderr (and the server's, for as long as it lives) goes to ``log``;
    ``pid_from`` reads the server's pid from the tool's first stdout line (None: not there). The
    server is then watched (:func:`watch_daemon`) so that it dies with gho2kvm.
    """
    import select

    argv = [str(a) for a in argv]
    tool = os.path.basename(argv[0])
    deadline = time.monotonic() + timeout
    with open(log, "ab") as err:
        proc = _spawn(argv, shown=argv, step=step, image_id=image_id, env=env, cwd=None,
                      stdin=subprocess.DEVNULL, stderr=err)
    assert proc.stdout is not None
    line = b""
    try:
        fd = proc.stdout.fileno()
        while b"\n" not in line:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                _kill_group(proc)
                raise ToolError(f"{tool} timed out after {timeout:g} s without starting its server; its "
                                f"last output: {log_tail(log) or '(none)'}", tool=tool, argv=argv,
                                returncode=None, image_id=image_id, step=step)
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            line += chunk
        proc.stdout.close()
        try:
            rc = proc.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ToolError(f"{tool} timed out after {timeout:g} s", tool=tool, argv=argv, returncode=None,
                            image_id=image_id, step=step) from None
    except BaseException:
        _kill_group(proc)
        raise
    finally:
        _children.discard(proc.pid)
    pid = pid_from(line.decode("utf-8", "replace")) if rc == 0 else None
    if pid is None:
        raise ToolError(f"{tool} failed to start its server (exit {rc}): {log_tail(log) or '(no output)'}",
                        tool=tool, argv=argv, returncode=rc, stderr=log_tail(log), image_id=image_id,
                        step=step)
    watch_daemon(pid)
    return pid


def start_server(argv: Sequence[str], *, step: str, image_id: str | None = None, log: Path,
                 ready: Callable[[], bool], timeout: float = 60) -> subprocess.Popen:
    """Start a tool that serves in the foreground (``qemu-nbd``) as our own child, started as
    :func:`run` starts tools (own session, PR_SET_PDEATHSIG, killed with us, counted in our rusage once
    waited for); its output goes to ``log``. Returns once ``ready()`` is true; a :class:`ToolError`
    with the tool's words if it exits first or ``timeout`` passes. End it with :func:`stop_server`."""
    argv = [str(a) for a in argv]
    tool = os.path.basename(argv[0])
    with open(log, "ab") as out:
        proc = _spawn(argv, shown=argv, step=step, image_id=image_id, env=None, cwd=None,
                      stdin=subprocess.DEVNULL, stderr=out, stdout=out)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            rc = proc.poll()
            if rc is not None:
                said = log_tail(log) or "(no output)"
                raise ToolError(f"{tool} exited (exit {rc}) before it served: {said}", tool=tool, argv=argv,
                                returncode=rc, stderr=log_tail(log), image_id=image_id, step=step)
            if time.monotonic() > deadline:
                raise ToolError(f"{tool} was not serving after {timeout:g} s; its last output: "
                                f"{log_tail(log) or '(none)'}", tool=tool, argv=argv, returncode=None,
                                image_id=image_id, step=step)
            time.sleep(0.01)
    except BaseException:
        _kill_group(proc)
        _children.discard(proc.pid)
        raise
    return proc


def stop_server(proc: subprocess.Popen, *, step: str, image_id: str | None = None, log: Path,
                timeout: float = 120, kill: bool = False) -> None:
    """Wait for a server of :func:`start_server` to exit by itself (a :class:`ToolError` unless it
    exits 0 within ``timeout``), or with ``kill`` end it at once."""
    argv = [str(a) for a in proc.args] if isinstance(proc.args, list | tuple) else [str(proc.args)]
    tool = os.path.basename(argv[0])
    try:
        if kill:
            _kill_group(proc)
            return
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise ToolError(f"{tool} did not exit within {timeout:g} s", tool=tool, argv=argv,
                            returncode=None, image_id=image_id, step=step) from None
    finally:
        _children.discard(proc.pid)
    if rc != 0:
        raise ToolError(f"{tool} failed (exit {rc}): {log_tail(log) or '(no output)'}", tool=tool, argv=argv,
                        returncode=rc, stderr=log_tail(log), image_id=image_id, step=step)


def log_tail(log: Path) -> str:
    try:
        text = log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return _tool_message(text, "", empty="")


def kill_children() -> None:
    """SIGKILL every tool started by :func:`run` that is still running (with its process group) and
    every daemon registered with :func:`watch_daemon`."""
    for pid in list(_children):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    for pid in list(_daemons):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, not an error of ours
    """Raised in the main thread on SIGTERM/SIGHUP so that cleanup (temps, children) runs."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"terminated by {signal.Signals(signum).name}")


def install_signal_handlers() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C (SIGINT): ``finally`` blocks remove temps, and the
    running tools are killed at once (they would die with us anyway, through PR_SET_PDEATHSIG)."""

    def handler(signum: int, frame: object) -> None:
        kill_children()
        raise Terminated(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, handler)


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
