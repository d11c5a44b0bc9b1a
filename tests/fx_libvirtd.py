"""pytest fixtures: a real libvirtd (qemu:///system) for the session, started and stopped by PID.

There is no systemd here, so ``libvirtd_system`` starts ``virtlogd`` and ``libvirtd`` itself (as
root; skipped otherwise), waits until ``qemu:///system`` answers, and stops exactly the processes it
started at the end. When a daemon is already answering (another session's), it is reused and left
alone. ``test_conn`` keeps a ``test:///default`` connection open so the test driver's in-memory state
lives for the whole test (it is freed when the last connection of the process closes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.tools.run import pid_alive

LIBVIRTD = "/usr/sbin/libvirtd"
VIRTLOGD = "/usr/sbin/virtlogd"
SYSTEM_URI = "qemu:///system"
VIRTLOGD_PIDFILE = Path("/run/virtlogd.pid")


def _answers(uri: str) -> bool:
    import libvirt

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


def _stop(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="session")
def libvirtd_system() -> Iterator[str]:
    """URI of a running system libvirtd (``qemu:///system``), started for the session if needed."""
    if os.geteuid() != 0:
        pytest.skip("starting libvirtd needs root")
    if _answers(SYSTEM_URI):
        yield SYSTEM_URI  # someone else's daemon: use it, do not stop it
        return
    logdir = Path(tempfile.mkdtemp(prefix="gho2kvm-libvirtd-"))
    started: list[subprocess.Popen[bytes]] = []
    try:
        if not _pidfile_alive(VIRTLOGD_PIDFILE):
            with open(logdir / "virtlogd.log", "wb") as log:
                started.append(subprocess.Popen([VIRTLOGD], stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True))
        with open(logdir / "libvirtd.log", "wb") as log:
            libvirtd = subprocess.Popen([LIBVIRTD, "--pid-file", str(logdir / "libvirtd.pid")], stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        started.append(libvirtd)
        deadline = time.monotonic() + 60
        while not _answers(SYSTEM_URI):
            if libvirtd.poll() is not None:
                tail = (logdir / "libvirtd.log").read_text(errors="replace")[-800:]
                pytest.fail(f"libvirtd exited with {libvirtd.returncode}: {tail}")
            if time.monotonic() > deadline:
                pytest.fail(f"libvirtd did not answer on {SYSTEM_URI} within 60s (log in {logdir})")
            time.sleep(0.2)
        yield SYSTEM_URI
    finally:
        for proc in reversed(started):
            _stop(proc)


@pytest.fixture
def test_conn() -> Iterator[object]:
    """An open ``test:///default`` connection (keeps the test driver's state for the test)."""
    import libvirt

    conn = libvirt.open("test:///default")
    try:
        yield conn
    finally:
        for dom in conn.listAllDomains():
            if dom.name() == "test":  # the driver's built-in domain
                continue
            with contextlib.suppress(libvirt.libvirtError):
                if dom.isActive():
                    dom.destroy()
                dom.undefine()
        conn.close()


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A temporary directory qemu (running as libvirt-qemu) can traverse: mode 0755 under /var/tmp."""
    d = Path(tempfile.mkdtemp(prefix="gho2kvm-test-", dir="/var/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
