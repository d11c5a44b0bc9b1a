"""libguestfs through guestfish: one appliance per session, driven with ``--remote``.

A :class:`Guestfish` session launches ONE appliance for any number of commands (inspection,
hive download/upload, read-back), which matters here: a launch costs ≈15 s under TCG.

One appliance per image (issue #14): within a migrate run (:func:`sharing`), inspect reads the guest
through an appliance over a fresh qcow2 overlay of the source (:func:`inspect_session`; the source
is the overlay's read-only backing file and inspect only reads) and, for a Windows guest, leaves it
listening. registry-merge (:func:`overlay_session`) takes it over when it is still alive and was left
for this image, in this run, over the same source; otherwise it makes its own overlay and launches
its own appliance, exactly as it would after a kill between the two steps. The hand-over is a file in
the image folder (``.appliance.json``), claimed by renaming it, so only one process ever takes an
appliance. An appliance nobody takes is shut down after :data:`IDLE_SECONDS` (by its watchdog) and
at the end of the run, and dies with the run even on SIGKILL (:func:`pipeline.tools.run.watch_daemon`).
Every launch is written to the image's launch log (:class:`Appliances`), which tests and the
benchmark read.

``force_tcg`` (tests, CI, the demo) sets ``LIBGUESTFS_BACKEND=direct`` and
``LIBGUESTFS_BACKEND_SETTINGS=force_tcg``; production keeps libguestfs' defaults. The caller passes
``settings.force_tcg`` (:mod:`pipeline.core.settings`, where ``GHO2KVM_FORCE_TCG`` is read).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline.core import atomic, log
from pipeline.core.errors import ToolError
from pipeline.tools import qemu_img
from pipeline.tools.run import pid_alive, process_start, run, start_daemon, unwatch_daemon, watch_daemon

GUESTFISH = "guestfish"
#: an appliance left by inspect and not taken by registry-merge within this time is shut down
IDLE_SECONDS = 60.0
HANDOFF = ".appliance.json"
LAUNCH_LOG = "appliances.jsonl"
SHARED_OVERLAY = "shared-overlay.qcow2"  # under its temp name (atomic.temp_name) until taken over

Drive = tuple[Path, str, bool]  # path, format, readonly


def force_tcg_env(force_tcg: bool) -> dict[str, str]:
    if force_tcg:
        return {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
    return {}


@dataclass(frozen=True)
class Appliances:
    """The appliances of one image: its folder holds their launch log and the hand-over between steps."""

    folder: Path

    @property
    def launch_log(self) -> Path:
        return self.folder / LAUNCH_LOG

    @property
    def handoff(self) -> Path:
        return self.folder / HANDOFF

    def record(self, event: str, **fields: Any) -> None:
        entry = {"event": event, "at": datetime.now(UTC).isoformat(timespec="milliseconds"), **fields}
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.launch_log, "a", encoding="utf-8") as fh:  # one short line: one write(2)
            fh.write(json.dumps(entry, default=str) + "\n")

    def events(self) -> list[dict[str, Any]]:
        """Every entry of the launch log, oldest first: ``launch`` (a new appliance), ``take-over``
        (registry-merge took inspect's)."""
        try:
            lines = self.launch_log.read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        out = []
        for ln in lines:
            with contextlib.suppress(ValueError):
                out.append(json.loads(ln))
        return out

    def launches(self) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == "launch"]


def lines(output: str) -> list[str]:
    """The non-blank lines of a command's output (``list-devices``, ``inspect-os``, …)."""
    return [ln for ln in output.splitlines() if ln.strip()]


class Guestfish:
    """``with Guestfish([(path, fmt, readonly)], ...) as g: g("inspect-os")``."""

    def __init__(self, drives: list[Drive], *, image_id: str | None, step: str, force_tcg: bool = False,
                 timeout: float = 1800, appliances: Appliances | None = None) -> None:
        self.drives = drives
        self.image_id = image_id
        self.step = step
        self.timeout = timeout
        self.env = force_tcg_env(force_tcg)
        self.appliances = appliances
        self.pid: int | None = None
        self.qemu_pid: int | None = None
        fd, name = tempfile.mkstemp(prefix="gho2kvm-guestfish-", suffix=".log")
        os.close(fd)
        self.errlog = Path(name)
        self.launch_seconds = 0.0
        #: the step that launched the appliance (another one's when taken over)
        self.launched_by = step
        self.offered = False

    def __enter__(self) -> Guestfish:
        return self.launch()

    def launch(self) -> Guestfish:
        argv = [GUESTFISH, "--listen"]
        # guestfish's --ro/--rw are session-wide, not per drive: a session with both kinds adds its
        # drives with add-drive before launch (else the writable one silently becomes read-only)
        mixed = len({readonly for _p, _f, readonly in self.drives}) > 1
        for path, fmt, readonly in ([] if mixed else self.drives):
            argv += ["--format=" + fmt, "--ro" if readonly else "--rw", "-a", str(path)]
        try:
            self.pid = start_daemon(argv, step=self.step, image_id=self.image_id, log=self.errlog,
                                    pid_from=_guestfish_pid, env=self.env)
        except BaseException:
            self.close()
            raise
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
        with contextlib.suppress(ToolError, ValueError):
            self.qemu_pid = int(self("get-pid").strip())
        if self.appliances is not None:
            self.appliances.record("launch", step=self.step, pid=self.pid, qemu_pid=self.qemu_pid,
                                   seconds=round(self.launch_seconds, 2),
                                   drives=[str(d[0]) for d in self.drives])
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
        return self.batch(args, timeout=timeout)[0]

    def batch(self, *commands: Sequence[str], timeout: float | None = None, check: bool = True) -> list[str]:
        """Run ``commands`` in order through ONE ``guestfish --remote`` process (``-cmd1 : echo M :
        -cmd2 : echo M …``, M a random marker that splits the output): one process start instead of one
        per command (0.1–0.5 s each on a loaded machine); their outputs in order.

        Every command carries guestfish's ``-`` prefix: without it a failing command makes the
        ``--listen`` server exit (guestfish exits on the first error), so a failure the caller handles
        (``part-get-parttype`` of a disk without a partition table) would kill the appliance for every
        later command. A failure is then known by what the server wrote to its stderr (our log): any
        line but a ``libguestfs: warning:``; the :class:`ToolError` names the first command without
        output (a failed one prints nothing) and carries the server's words. ``check=False``: failed
        commands just give no output (for queries that print a value when they succeed); a server
        that does not answer is still an error."""
        assert self.pid is not None
        if not commands:
            return []
        marker = f"--gho2kvm-{secrets.token_hex(8)}--"
        argv: list[str] = []
        for cmd in commands:
            argv += [*(argv and [":"]), "-" + cmd[0], *cmd[1:], ":", "echo", marker]
        since = _size(self.errlog)
        r = run([GUESTFISH, f"--remote={self.pid}", "--", *argv], step=self.step, image_id=self.image_id,
                timeout=timeout or self.timeout, env=self.env, check=False)
        parts = (r.stdout.split(marker + "\n") + [""] * len(commands))[:len(commands)]
        said = self._errors(since)
        if r.returncode != 0 or (said and check):
            failed = next((c for c, out in zip(commands, parts, strict=True) if not out), commands[-1])
            msg = said or r.stderr.strip() or "(no message)"
            raise ToolError(f"guestfish {failed[0]} failed: {msg}", tool=GUESTFISH, argv=r.argv,
                            returncode=r.returncode, stderr=msg, image_id=self.image_id, step=self.step)
        return parts

    def lines(self, *args: str) -> list[str]:
        return lines(self(*args))

    def offer(self) -> None:
        """Leave this appliance for the next step of the image when the session ends without an error
        (only an :func:`inspect_session` within a :func:`sharing` run does; elsewhere a no-op)."""
        self.offered = True

    def _errors(self, since: int) -> str:
        """What the server wrote to stderr since byte ``since`` of its log, warnings left out."""
        try:
            with open(self.errlog, encoding="utf-8", errors="replace") as fh:
                fh.seek(since)
                text = fh.read()
        except OSError:
            return ""
        lines = [ln.strip() for ln in text.splitlines() if ln.strip() and ": warning:" not in ln]
        return " | ".join(lines[-3:])

    def close(self) -> None:
        if self.pid is not None:
            _shut_down(self.pid, step=self.step, image_id=self.image_id)
            self.pid = None
        with contextlib.suppress(OSError):
            os.unlink(self.errlog)

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _guestfish_pid(line: str) -> int | None:
    """``GUESTFISH_PID=1234; export GUESTFISH_PID`` → 1234."""
    if "GUESTFISH_PID=" not in line:
        return None
    try:
        return int(line.split("GUESTFISH_PID=")[1].split(";")[0])
    except ValueError:
        return None


def _shut_down(pid: int, *, step: str, image_id: str | None) -> None:
    """``exit`` (the appliance syncs and stops), then make sure the server is gone."""
    with contextlib.suppress(Exception):
        run([GUESTFISH, f"--remote={pid}", "--", "exit"], step=step, image_id=image_id, timeout=60,
            check=False)
    for _ in range(50):
        if not pid_alive(pid):
            break
        time.sleep(0.1)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    unwatch_daemon(pid)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------
# one appliance per image: inspect leaves it, registry-merge takes it over


@dataclass(frozen=True)
class _Run:
    token: str
    owner: int  # the process the run belongs to (forked luigi workers inherit this)
    owner_start: str | None
    idle: float


#: the migrate run this process belongs to (set by :func:`sharing`, inherited by forked workers);
#: None: no step after inspect will come for its appliance, so none is left
_run: _Run | None = None


@contextlib.contextmanager
def sharing(folders: Iterable[Path], *, idle: float = IDLE_SECONDS) -> Iterator[None]:
    """The scope of a migrate run (around ``luigi.build``): inspect may leave its appliance to
    registry-merge. On exit every appliance still left in ``folders`` (the run's image folders) is
    shut down and its overlay removed."""
    global _run
    previous = _run
    current = _Run(uuid.uuid4().hex, os.getpid(), process_start(os.getpid()), idle)
    _run = current
    try:
        yield
    finally:
        _run = previous
        for folder in folders:
            with contextlib.suppress(Exception):  # best effort: the watchdogs stop them anyway
                discard_left(Appliances(folder), run_token=current.token)


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns]


def _claim(appliances: Appliances) -> dict[str, Any] | None:
    """Take the hand-over file (rename: one process wins) and return what it says."""
    claimed = appliances.handoff.with_name(f"{HANDOFF}.claimed-{os.getpid()}")
    try:
        os.rename(appliances.handoff, claimed)
    except OSError:
        return None
    data = atomic.read_json(claimed)
    claimed.unlink(missing_ok=True)
    return data if isinstance(data, dict) else {}


def _discard(data: dict[str, Any], *, step: str, image_id: str | None) -> None:
    """Shut down a claimed appliance nobody will use (if it is still the one named) and remove its
    files (overlay, stderr log)."""
    pid = data.get("pid")
    if isinstance(pid, int) and data.get("pid_start") is not None and process_start(pid) == data["pid_start"]:
        _shut_down(pid, step=step, image_id=image_id)
    for path in data.get("remove", []) or []:
        with contextlib.suppress(OSError, TypeError):
            os.unlink(path)


def discard_left(appliances: Appliances, *, run_token: str | None = None, step: str = "cleanup",
                 image_id: str | None = None) -> None:
    """Shut down the appliance left in this image folder, if any (only one left by ``run_token`` or by
    a run that is gone, when given), and remove shared overlays whose process is gone."""
    if run_token is not None:
        data = atomic.read_json(appliances.handoff)
        owner = data.get("owner") if isinstance(data, dict) else None
        if isinstance(data, dict) and data.get("token") != run_token and isinstance(owner, int) and \
                data.get("owner_start") is not None and process_start(owner) == data["owner_start"]:
            return  # another live run's: its own end shuts it down
    data = _claim(appliances)
    if data is not None:
        _discard(data, step=step, image_id=image_id)
    atomic.remove_dead_temps(appliances.folder / SHARED_OVERLAY)


@contextlib.contextmanager
def inspect_session(source: Path, fmt: str, *, appliances: Appliances | None, image_id: str | None,
                    step: str, force_tcg: bool) -> Iterator[Guestfish]:
    """The appliance inspect reads the guest with.

    Outside a migrate run (or without ``appliances``): read-only over the source, shut down at the end.
    Within one: read-write over a fresh qcow2 overlay of the source in the image folder (the source is
    its read-only backing file, and inspect only reads), handed over to the next step when inspect
    called :meth:`Guestfish.offer` and finished without an error; otherwise shut down and removed.
    """
    if _run is None or appliances is None:
        with Guestfish([(source, fmt, True)], image_id=image_id, step=step, force_tcg=force_tcg,
                       appliances=appliances) as g:
            yield g
        return
    run_ = _run
    appliances.folder.mkdir(parents=True, exist_ok=True)
    discard_left(appliances, step=step, image_id=image_id)  # a hand-over of an earlier attempt
    overlay = atomic.temp_name(appliances.folder / SHARED_OVERLAY)
    overlay.unlink(missing_ok=True)
    g = Guestfish([(overlay, "qcow2", False)], image_id=image_id, step=step, force_tcg=force_tcg,
                  appliances=appliances)
    try:
        qemu_img.create_overlay(overlay, source, fmt, image_id=image_id, step=step)
        g.launch()
        yield g
    except BaseException:
        g.close()
        overlay.unlink(missing_ok=True)
        raise
    if g.offered and g.pid is not None:
        try:
            g("umount-all")  # as after a launch: the next step mounts what it needs
        except ToolError:
            g.offered = False  # not in a state to hand over: shut down below
        except BaseException:
            g.close()
            overlay.unlink(missing_ok=True)
            raise
    if not g.offered or g.pid is None:
        g.close()
        overlay.unlink(missing_ok=True)
        return
    data = {"token": run_.token, "owner": run_.owner, "owner_start": run_.owner_start, "step": step,
            "pid": g.pid, "pid_start": process_start(g.pid), "qemu_pid": g.qemu_pid, "overlay": str(overlay),
            "source": str(source.absolute()), "format": fmt, "source_stamp": _stamp(source),
            "errlog": str(g.errlog), "launch_seconds": g.launch_seconds,
            "remove": [str(overlay), str(g.errlog)]}
    try:
        atomic.write_json(appliances.handoff, data)
        # from now on it lives as long as the run (not this process: a forked worker ends here)
        watch_daemon(g.pid, owner=run_.owner, idle=(appliances.handoff, run_.idle))
    except BaseException:
        appliances.handoff.unlink(missing_ok=True)
        g.close()
        overlay.unlink(missing_ok=True)
        raise
    log.get().info("appliance left for the next step", pid=g.pid, idle_s=run_.idle)


def _take_over(appliances: Appliances, source: Path, fmt: str, into: Path, *, image_id: str | None,
               step: str, force_tcg: bool) -> Guestfish | None:
    """The appliance inspect left for this image in this run, over ``source`` as it still is, with its
    overlay renamed to ``into``; None (after shutting down any other one) when there is none."""
    data = _claim(appliances)
    if data is None:
        return None
    why = _unusable(data, source, fmt)
    if why is not None:
        log.get().info("appliance left by inspect not used", reason=why)
        _discard(data, step=step, image_id=image_id)
        return None
    pid = int(data["pid"])
    watch_daemon(pid)  # it dies with this process now too (the run's watchdog stays)
    g = Guestfish([(into, "qcow2", False)], image_id=image_id, step=step, force_tcg=force_tcg,
                  appliances=appliances)
    os.unlink(g.errlog)
    g.errlog = Path(data["errlog"])
    g.pid, g.qemu_pid = pid, data.get("qemu_pid")
    g.launched_by = str(data.get("step"))
    g.launch_seconds = float(data.get("launch_seconds") or 0)
    try:
        os.replace(data["overlay"], into)
        g("ping-daemon")
    except BaseException as e:
        g.close()
        into.unlink(missing_ok=True)
        if not isinstance(e, (ToolError, OSError)):
            raise
        log.get().info("appliance left by inspect not used", reason=str(e))
        return None
    appliances.record("take-over", step=step, pid=pid, qemu_pid=g.qemu_pid, launched_by=g.launched_by)
    log.get().info("appliance taken over", pid=pid, launched_by=g.launched_by)
    return g


def _unusable(data: dict[str, Any], source: Path, fmt: str) -> str | None:
    if _run is None or data.get("token") != _run.token:
        return "left by another run"
    if data.get("source") != str(source.absolute()) or data.get("format") != fmt:
        return f"over another disk ({data.get('source')}, {data.get('format')})"
    try:
        if data.get("source_stamp") != _stamp(source):
            return "the disk changed since"
    except OSError as e:
        return f"the disk is unreadable ({e.strerror})"
    pid = data.get("pid")
    if not isinstance(pid, int) or data.get("pid_start") is None or process_start(pid) != data["pid_start"]:
        return "it is gone"
    if not Path(str(data.get("overlay"))).is_file():
        return "its overlay is gone"
    return None


@contextlib.contextmanager
def overlay_session(final: Path, source: Path, fmt: str, extra: list[Drive] | None = None, *,
                    appliances: Appliances | None, image_id: str | None, step: str, force_tcg: bool,
                    say: Callable[[str], None] | None = None) -> Iterator[Guestfish]:
    """The appliance a step writes ``final`` (a qcow2 overlay of ``source``) with.

    Inspect's, when it left one for this image in this run, over the same source as it still is, and
    no ``extra`` drive is needed (drives are added before launch only); else a fresh overlay and a
    launch of its own. On success the appliance is shut down (everything written is flushed) and the
    overlay renamed into place; on failure both are gone.
    """
    say = say or (lambda _m: None)
    with atomic.temporary_path(final) as tmp:
        g = None
        if appliances is not None:
            if extra:
                discard_left(appliances, step=step, image_id=image_id)  # drives only before launch
            else:
                g = _take_over(appliances, source, fmt, tmp, image_id=image_id, step=step,
                               force_tcg=force_tcg)
        if g is not None:
            say("using inspect's appliance")
        else:
            qemu_img.create_overlay(tmp, source, fmt, image_id=image_id, step=step)
            say("launching appliance")
            g = Guestfish([(tmp, "qcow2", False), *(extra or [])], image_id=image_id, step=step,
                          force_tcg=force_tcg, appliances=appliances).launch()
        try:
            yield g
        finally:
            g.close()
