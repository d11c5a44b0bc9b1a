"""structlog set-up, done once per process.

Console renderer on a TTY, JSON lines otherwise; luigi's stdlib logging goes through the same
processors; an optional JSON log file per run. ``image_id`` and ``task`` are bound with
:func:`bind` (contextvars), so every line written while a task runs carries them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import structlog

_configured = False
_file_handler: logging.Handler | None = None
_console: logging.Handler | None = None

_shared: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _renderer(json: bool) -> Any:
    if json:
        return structlog.processors.JSONRenderer(sort_keys=False)
    return structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())


def _drop_exc_info(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The console never shows a traceback (the JSON log file keeps it): one line per event."""
    event_dict.pop("exc_info", None)
    event_dict.pop("exception", None)
    return event_dict


def _not_luigi_echo(record: logging.LogRecord) -> bool:
    """luigi's "... failed Task(...)" record for one of our typed errors repeats our own "step failed"
    line: the console skips it (the JSON log file keeps it, with its traceback)."""
    if record.name.startswith("luigi") and record.exc_info and record.exc_info[1] is not None:
        from pipeline.core.errors import Gho2KvmError

        return not isinstance(record.exc_info[1], Gho2KvmError)
    return True


def configure(*, json: bool | None = None, level: str | None = None, log_file: Path | None = None) -> None:
    """Configure structlog and stdlib logging (idempotent; a later call may add a log file)."""
    global _configured, _file_handler, _console
    if json is None:
        json = os.environ.get("GHO2KVM_LOG_JSON") == "1" or not sys.stderr.isatty()
    level = level or os.environ.get("GHO2KVM_LOG_LEVEL", "INFO")
    if not _configured:
        structlog.configure(
            processors=[
                *_shared,
                structlog.processors.StackInfoRenderer(),
                structlog.processors.format_exc_info,
                structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=_shared,
                processors=[_drop_exc_info, structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                            _renderer(json)])
        )
        handler.addFilter(_not_luigi_echo)
        _console = handler
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level)
        # luigi installs its own handlers unless told not to; route it through ours.
        for name in ("luigi", "luigi-interface", "luigi.scheduler"):
            lg = logging.getLogger(name)
            lg.handlers[:] = []
            lg.propagate = True
            # luigi's own chatter only when asked for; our canonical lines carry the facts
            lg.setLevel(level if level == "DEBUG" else "WARNING")
        _configured = True
    if log_file is not None:
        root = logging.getLogger()
        if _file_handler is not None:
            root.removeHandler(_file_handler)
            _file_handler.close()
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=_shared, processor=structlog.processors.JSONRenderer()
            )
        )
        root.addHandler(fh)
        _file_handler = fh


def console_off() -> None:
    """No log lines on stderr from here on (a command whose stderr is its one error line; the
    events go to the JSON log file only)."""
    if _console is not None:
        _console.setLevel(logging.CRITICAL + 1)


def luigi_defers_to_us() -> None:
    """Keep ``luigi.build`` from installing its own stderr handlers (its DEBUG chatter and
    tracebacks); luigi's records go through ours."""
    import luigi.configuration

    luigi.configuration.get_config().set("core", "no_configure_logging", "true")


def get(name: str = "gho2kvm") -> Any:
    return structlog.get_logger(name)


def bind(**kw: Any) -> Any:
    return structlog.contextvars.bound_contextvars(**kw)
