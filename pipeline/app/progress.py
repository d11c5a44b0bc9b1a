"""Progress on a terminal: one bar line per running image on stderr, kept below the log lines.

Fed by the same calls that report progress to luigi (``ImageTask.progress`` →
``set_progress_percentage``/``set_status_message``) plus each step's start and end. When stderr is
not a TTY (cron, CI, pipes, JSON logs) nothing is displayed and :func:`report` returns at once.
``settings.progress: false`` (or ``GHO2KVM_PROGRESS=0``, :mod:`pipeline.core.settings`) turns the
display off on a TTY too; the runner passes ``enabled=False`` then.

Luigi runs tasks in forked processes when ``--workers`` > 1: events travel over a pipe created
before the fork, each one a single ``write`` of at most ``PIPE_BUF`` bytes (atomic, no lock a killed
worker could leave held). Log lines written by those processes take the same path, so the bar block
is cleared before any line is printed and redrawn after it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import shutil
import sys
import threading
import time
from typing import IO, Any

_MAX_MSG = 3800  # < PIPE_BUF (4096): one os.write per message is atomic
_BAR = 20


class _Channel:
    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        self.owner = os.getpid()

    def send(self, msg: dict[str, Any]) -> None:
        data = json.dumps(msg, default=str).encode()
        if len(data) > _MAX_MSG:
            if msg.get("t") == "log":
                text = str(msg.get("s", ""))
                half = len(text) // 2
                self.send({"t": "log", "s": text[:half]})
                self.send({"t": "log", "s": text[half:]})
                return
            short = {k: (v[:200] if isinstance(v, str) else v) for k, v in msg.items()}
            data = json.dumps(short, default=str).encode()
        with contextlib.suppress(OSError):
            os.write(self.write_fd, data + b"\n")


_channel: _Channel | None = None


def report(image_id: str, step: str, event: str, percent: float | None = None,
           message: str | None = None) -> None:
    """``event``: start | progress | done | failed. A no-op unless a :class:`Display` is running."""
    ch = _channel
    if ch is None:
        return
    ch.send({"t": event, "image": image_id, "step": step, "percent": percent, "message": message})


class _StreamProxy:
    """Replaces the log handler's stream while the display runs."""

    def __init__(self, display: Display, stream: IO[str]) -> None:
        self.display = display
        self.stream = stream

    def write(self, text: str) -> int:
        ch = _channel
        if ch is not None and os.getpid() != ch.owner:
            ch.send({"t": "log", "s": text})
        else:
            self.display.write_through(text)
        return len(text)

    def flush(self) -> None:
        if _channel is None or os.getpid() == _channel.owner:
            self.stream.flush()

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.stream.fileno()


class Display:
    """``with Display(): luigi.build(...)`` — draws only when ``stream`` is a TTY (``enabled=None``).

    The tasks reach it through ``pipeline.tasks.base.hooks.progress = report`` (set by the runner):
    the channel is process-wide because luigi builds the tasks and forks the workers that report."""

    def __init__(self, stream: IO[str] | None = None, *, enabled: bool | None = None,
                 interval: float = 0.1) -> None:
        self.stream = stream or sys.stderr
        if enabled is None:
            enabled = _isatty(self.stream)
        self.enabled = enabled
        self.interval = interval
        self.running: dict[str, dict[str, Any]] = {}
        self._drawn = 0
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._swapped: list[tuple[logging.StreamHandler[Any], IO[str]]] = []
        self._buf = b""
        self._last_draw = 0.0

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Display:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        global _channel
        if not self.enabled or _channel is not None:
            self.enabled = False
            return
        _channel = _Channel()
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is self.stream:
                self._swapped.append((h, h.stream))
                h.setStream(_StreamProxy(self, self.stream))  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self._loop, name="gho2kvm-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        global _channel
        if not self.enabled or _channel is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        ch = _channel
        self._drain(ch, 0)
        with self._lock:
            self._clear()
            self.stream.flush()
        for h, original in self._swapped:
            h.setStream(original)
        self._swapped.clear()
        _channel = None
        for fd in (ch.read_fd, ch.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    # ------------------------------------------------------------------ events
    def _loop(self) -> None:
        ch = _channel
        assert ch is not None
        while not self._stop.is_set():
            changed = self._drain(ch, 0.2)
            now = time.monotonic()
            due = now - self._last_draw >= (self.interval if changed else 1.0)
            if self.running and due:
                with self._lock:
                    self._redraw()

    def _drain(self, ch: _Channel, timeout: float) -> bool:
        changed = False
        while True:
            try:
                ready, _, _ = select.select([ch.read_fd], [], [], timeout)
            except (OSError, ValueError):
                return changed
            if not ready:
                return changed
            try:
                data = os.read(ch.read_fd, 65536)
            except OSError:
                return changed
            if not data:
                return changed
            self._buf += data
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                changed = self.handle(msg) or changed
            timeout = 0

    def handle(self, msg: dict[str, Any]) -> bool:
        """Apply one event; returns True when the bar block changed. Start/end redraw at once."""
        kind = msg.get("t")
        if kind == "log":
            self.write_through(str(msg.get("s", "")))
            return False
        image = str(msg.get("image"))
        with self._lock:
            if kind == "start":
                self.running[image] = {"step": msg.get("step"), "percent": None, "message": None,
                                       "t0": time.monotonic()}
                self._redraw()
            elif kind == "progress" and image in self.running:
                entry = self.running[image]
                if msg.get("percent") is not None:
                    entry["percent"] = float(msg["percent"])
                if msg.get("message"):
                    entry["message"] = str(msg["message"])
                return True
            elif kind in ("done", "failed"):
                self.running.pop(image, None)
                self._redraw()
        return False

    # ------------------------------------------------------------------ drawing
    def write_through(self, text: str) -> None:
        with self._lock:
            self._clear()
            self.stream.write(text)
            self.stream.flush()
            self._draw()

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _redraw(self) -> None:
        self._clear()
        self._draw()
        self.stream.flush()
        self._last_draw = time.monotonic()

    def _draw(self) -> None:
        lines = self.lines()
        for line in lines:
            self.stream.write(line + "\n")
        self._drawn = len(lines)

    def lines(self) -> list[str]:
        width = _width(self.stream)
        items = sorted(self.running.items(), key=lambda kv: kv[1]["t0"])
        if not items:
            return []
        w_id = min(max(len(i) for i, _ in items), 32)
        w_step = max(len(str(e["step"])) for _, e in items)
        out = []
        now = time.monotonic()
        for image, e in items:
            pct = e["percent"]
            if pct is None:
                bar, shown = "·" * _BAR, "  --%"
            else:
                filled = int(round(_BAR * min(max(pct, 0.0), 100.0) / 100))
                bar, shown = "#" * filled + "·" * (_BAR - filled), f"{pct:4.0f}%"
            line = (f"{image[:w_id].ljust(w_id)}  {str(e['step']).ljust(w_step)}  [{bar}] {shown}  "
                    f"{now - e['t0']:5.0f}s  {e['message'] or ''}").rstrip()
            out.append(line[: max(width - 1, 20)])
        return out


def _isatty(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _width(stream: IO[str]) -> int:
    try:
        cols = os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        cols = 0
    return cols if cols > 0 else shutil.get_terminal_size((100, 24)).columns
