"""libguestfs through guestfish: one appliance per session, driven with ``--remote``.

A :class:`Guestfish` session launches ONE appliance for any number of commands (inspection,
hive download/upload, read-back), which matters here: a launch costs ≈15 s under TCG.

``force_tcg`` (tests, CI, the demo) sets ``LIBGUESTFS_BACKEND=direct`` and
``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``; production keeps libguestfs' defaults. The caller passes
``settings.force_tcg`` (:mod:`pipeline.core.settings`, where ``GHO2KVM_FORCE_TCG`` is read).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from pipeline.core import log
from pipeline.core.errors import ToolError
from pipeline.tools.run import pid_alive, run, unwatch_daemon, watch_daemon

GUESTFISH = "guestfish"
#: appliance launches in this process (for receipts and the benchmark)
launch_count = 0


def force_tcg_env(force_tcg: bool) -> dict[str, str]:
    if force_tcg:
        return {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    return {}


class Guestfish:
    """``with Guestfish([(path, fmt, readonly)], ...) as g: g("inspect-os")``."""

    def __init__(self, drives: list[tuple[Path, str, bool]], *, image_id: str | None, step: str,
                 force_tcg: bool = False, timeout: float = 1800) -> None:
        self.drives = drives
        self.image_id = image_id
        self.step = step
        self.timeout = timeout
        self.env = force_tcg_env(force_tcg)
        self.pid: int | None = None
        self._errlog = tempfile.NamedTemporaryFile(  # noqa: SIM115 - lives as long as the session
            prefix="gho2kvm-guestfish-", suffix=".log", delete=False)
        self.launch_seconds = 0.0

    def __enter__(self) -> Guestfish:
        global launch_count
        argv = [GUESTFISH, "--listen"]
        # guestfish's --ro/--rw are session-wide, not per drive: a session with both kinds adds its
        # drives with add-drive before launch (else the writable one silently becomes read-only)
        mixed = len({readonly for _p, _f, readonly in self.drives}) > 1
        for path, fmt, readonly in ([] if mixed else self.drives):
            argv += ["--format=" + fmt, "--ro" if readonly else "--rw", "-a", str(path)]
        env = dict(os.environ)
        env.update(self.env)
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._errlog,
                                    stdin=subprocess.DEVNULL, env=env, text=True)
        except FileNotFoundError:
            raise ToolError("guestfish not found; install libguestfs-tools", tool=GUESTFISH, argv=argv,
                            returncode=None, image_id=self.image_id, step=self.step) from None
        assert proc.stdout is not None
        line = proc.stdout.readline()
        proc.stdout.close()
        rc = proc.wait(timeout=60)
        if rc != 0 or "GUESTFISH_PID=" not in line:
            raise ToolError(f"guestfish failed to start: {self._stderr_tail()}", tool=GUESTFISH, argv=argv,
                            returncode=rc, image_id=self.image_id, step=self.step)
        self.pid = int(line.split("GUESTFISH_PID=")[1].split(";")[0])
        watch_daemon(self.pid)  # the --listen server dies with us, SIGKILL included
        start = time.monotonic()
        try:
            self._wait_for_server()
            for path, fmt, readonly in (self.drives if mixed else []):
                self("add-drive", str(path), f"format:{fmt}", f"readonly:{'true' if readonly else 'false'}")
            self("run")
        except BaseException:
            self.close()
            raise
        self.launch_seconds = time.monotonic() - start
        launch_count += 1
        log.get().info("appliance launched", seconds=round(self.launch_seconds, 1),
                       drives=[str(d[0]) for d in self.drives])
        return self

    def _wait_for_server(self, seconds: float = 30) -> None:
        """``--listen`` prints the PID before its socket exists ("a small but unavoidable race" in
        libguestfs' own words): poll with a command that needs no appliance until it answers."""
        deadline = time.monotonic() + seconds
        while True:
            r = run([GUESTFISH, f"--remote={self.pid}", "--", "get-verbose"], step=self.step,
                    image_id=self.image_id, timeout=30, env=self.env, check=False)
            if r.returncode == 0 or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def __call__(self, *args: str, timeout: float | None = None) -> str:
        assert self.pid is not None
        mark = os.path.getsize(self._errlog.name)
        r = run([GUESTFISH, f"--remote={self.pid}", "--", *args], step=self.step, image_id=self.image_id,
                timeout=timeout or self.timeout, env=self.env, check=False)
        if r.returncode != 0:
            msg = self._stderr_tail(since=mark) or r.stderr.strip() or "(no message)"
            raise ToolError(f"guestfish {args[0]} failed: {msg}", tool=GUESTFISH, argv=r.argv,
                            returncode=r.returncode, stderr=msg, image_id=self.image_id, step=self.step)
        return r.stdout

    def lines(self, *args: str) -> list[str]:
        return [ln for ln in self(*args).splitlines() if ln.strip()]

    def _stderr_tail(self, since: int = 0) -> str:
        try:
            with open(self._errlog.name, encoding="utf-8", errors="replace") as fh:
                fh.seek(since)
                text = fh.read()
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        return " | ".join(lines[-3:])

    def close(self) -> None:
        if self.pid is not None:
            with contextlib.suppress(Exception):
                run([GUESTFISH, f"--remote={self.pid}", "--", "exit"], step=self.step,
                    image_id=self.image_id, timeout=60, check=False)
            # make sure the appliance is gone even if 'exit' did not reach it
            for _ in range(50):
                if not pid_alive(self.pid):
                    break
                time.sleep(0.1)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            unwatch_daemon(self.pid)
            self.pid = None
        self._errlog.close()
        with contextlib.suppress(OSError):
            os.unlink(self._errlog.name)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
