"""Start a system libvirtd (``qemu:///system``) on a machine without systemd, for the demo and the tests.

``ensure(logdir)`` returns at once when ``qemu:///system`` already answers (someone's daemon: left
alone); otherwise, as root, it starts ``virtlogd`` (unless its pid file names a live process) and
``libvirtd`` in their own sessions, waits until the URI answers, and returns the processes it
started so that the caller can stop exactly those (:func:`stop`). ``python -m pipeline.tools.libvirtd
start|stop`` is what ``make libvirtd`` / ``make libvirtd-stop`` run: the daemons outlive the command,
their pids are kept in ``var/libvirtd/``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.tools.run import pid_alive

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
SYSTEM_URI = "qemu:///system"
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")


def answers(uri: str = SYSTEM_URI) -> bool:
    """True when a libvirt daemon answers on ``uri``."""
    import libvirt

    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # we report errors ourselves
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def _pidfile_alive(path: Path) -> bool:
    try:
        return pid_alive(int(path.read_text().strip()))
    except (OSError, ValueError):
        return False


def stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """Stop one daemon this module started (SIGTERM, then SIGKILL)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def ensure(logdir: Path, *, timeout: float = 60) -> list[subprocess.Popen[bytes]]:
    """Make ``qemu:///system`` answer; returns the processes started here (empty when it already did).

    Raises :class:`InputError` when not root or when libvirtd exits or stays silent.
    """
    if answers(SYSTEM_URI):
        return []
    if os.geteuid() != 0:
        raise InputError(f"no libvirt daemon answers on {SYSTEM_URI}, and starting one needs root: "
                         f"run `sudo make libvirtd` (or start libvirtd with your init system)")
    logdir.mkdir(parents=True, exist_ok=True)
    started: list[subprocess.Popen[bytes]] = []
    try:
        if not _pidfile_alive(VIRTLOGD_PIDFILE):
            with open(logdir / "virtlogd.log", "ab") as log:
                started.append(subprocess.Popen([VIRTLOGD], stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True))
        with open(logdir / "libvirtd.log", "ab") as log:
            libvirtd = subprocess.Popen([LIBVIRTD, "--pid-file", str(logdir.absolute() / "libvirtd.pid")],
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        started.append(libvirtd)
        deadline = time.monotonic() + timeout
        while not answers(SYSTEM_URI):
            if libvirtd.poll() is not None:
                tail = (logdir / "libvirtd.log").read_text(errors="replace")[-800:]
                raise InputError(f"libvirtd exited with {libvirtd.returncode}: {' '.join(tail.split())}")
            if time.monotonic() > deadline:
                raise InputError(f"libvirtd did not answer on {SYSTEM_URI} within {timeout:.0f}s "
                                 f"(log in {logdir})")
            time.sleep(0.2)
    except BaseException:
        for proc in reversed(started):
            stop(proc)
        raise
    return started


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logdir = Path("var/libvirtd")
    if args == ["start"]:
        try:
            started = ensure(logdir)
        except InputError as e:
            print(str(e), file=sys.stderr)
            return 1
        if not started:
            print(f"libvirtd already answers on {SYSTEM_URI}")
            return 0
        (logdir / "started.pids").write_text("".join(f"{p.pid}\n" for p in started))
        print(f"libvirtd answers on {SYSTEM_URI} (pids {', '.join(str(p.pid) for p in started)}; "
              f"logs in {logdir}; `make libvirtd-stop` stops them)")
        return 0
    if args == ["stop"]:
        pids = logdir / "started.pids"
        try:
            listed = [int(x) for x in pids.read_text().split()]
        except (OSError, ValueError):
            print("no libvirtd started by `make libvirtd`")
            return 0
        for pid in reversed(listed):
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        pids.unlink(missing_ok=True)
        print(f"stopped pids {', '.join(map(str, listed))}")
        return 0
    print("usage: python -m pipeline.tools.libvirtd start|stop", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
