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
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.tools import libvirtd


@pytest.fixture(scope="session")
def libvirtd_system() -> Iterator[str]:
    """URI of a running system libvirtd (``qemu:///system``), started for the session if needed."""
    if os.geteuid() != 0 and not libvirtd.answers(libvirtd.SYSTEM_URI):
        pytest.skip("starting libvirtd needs root")
    logdir = Path(tempfile.mkdtemp(prefix="gho2kvm-libvirtd-"))
    try:
        started = libvirtd.ensure(logdir)  # [] when someone else's daemon answers: used, not stopped
    except InputError as e:
        pytest.fail(str(e))
    try:
        yield libvirtd.SYSTEM_URI
    finally:
        for proc in reversed(started):
            libvirtd.stop(proc)


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
