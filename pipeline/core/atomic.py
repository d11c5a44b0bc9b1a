"""Atomic outputs: write under a temp name in the same folder, rename at the end.

A half-written artifact never looks complete; temp names start with ``.`` and contain ``.tmp-``; a temp
carries an owner record (:func:`pipeline.core.paths.claim_temp`), so :func:`remove_stale_temps` cleans up
after a killed run and never deletes a file of the same name it did not make.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core import paths
from pipeline.core.errors import InputError

TMP_MARK = ".tmp-"


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}{TMP_MARK}{os.getpid()}")


@contextlib.contextmanager
def temporary_path(final: Path) -> Iterator[Path]:
    """Yield a temp path next to ``final``; on success fsync + rename, on error remove it."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    if os.path.lexists(tmp):
        if not paths.temp_is_ours(tmp):
            raise InputError(f"{final}: a file gho2kvm did not make is in the way of its temp ({tmp.name}); "
                             "refused: move it away")
        _unlink(tmp)
    paths.claim_temp(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException as e:
        _unlink(tmp)
        _name_the_final(e, tmp, final)
        raise
    finally:
        paths.release_temp(tmp)


def _name_the_final(e: BaseException, tmp: Path, final: Path) -> None:
    """A message a person reads names the output, never gho2kvm's internal temp name."""
    if isinstance(e, OSError):
        if e.filename is not None and str(e.filename) == str(tmp):
            e.filename = str(final)
        if e.filename2 is not None and str(e.filename2) == str(tmp):
            e.filename2 = str(final)
    message = getattr(e, "message", None)
    if isinstance(message, str) and tmp.name in message:
        e.message = message.replace(str(tmp), str(final)).replace(tmp.name, final.name)  # type: ignore[attr-defined]


def fsync_path(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text(final: Path, text: str) -> None:
    with temporary_path(final) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(final: Path, data: Any) -> None:
    write_text(final, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any | None:
    """Return parsed JSON or None if missing/unreadable/corrupt (never raises)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_stale_temps(folder: Path, stem: str | None = None) -> list[Path]:
    """Remove temp files left by killed runs (optionally only those for artifact ``stem``): only temps
    gho2kvm made (:func:`pipeline.core.paths.temp_is_ours`), never a file that only looks like one."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        name = entry.name
        if not (name.startswith(".") and TMP_MARK in name and (stem is None or name.startswith(f".{stem}"))):
            continue
        if name.endswith(paths.OWNER_SUFFIX):
            continue  # removed with its temp, or below when the temp is gone
        if paths.temp_is_ours(entry) and not entry.is_symlink():
            _remove_temp(entry)
            removed.append(entry)
    _orphan_records(folder, stem)
    return removed


def _remove_temp(entry: Path) -> None:
    if entry.is_dir():
        return
    _unlink(entry)
    paths.release_temp(entry)


def _orphan_records(folder: Path, stem: str | None) -> None:
    """Owner records whose temp is gone (the temp renamed into place by a run killed right after)."""
    with contextlib.suppress(OSError):
        for entry in folder.iterdir():
            name = entry.name
            if name.startswith(".") and TMP_MARK in name and name.endswith(paths.OWNER_SUFFIX) and \
                    (stem is None or name.startswith(f".{stem}")):
                tmp = entry.with_name(name[:-len(paths.OWNER_SUFFIX)])
                if not os.path.lexists(tmp) and paths.temp_is_ours(tmp):
                    _unlink(entry)


def remove_dead_temps(final: Path) -> list[Path]:
    """Remove the temps of ``final`` (named by :func:`temp_name`) whose writing process is gone.

    For outputs written outside a step's lock (``gho extract``): a temp of a run still alive is kept.
    """
    removed: list[Path] = []
    prefix = f".{final.name}{TMP_MARK}"
    try:
        entries = list(final.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        pid = entry.name[len(prefix):]
        if not (entry.name.startswith(prefix) and pid.isdigit()) or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except OSError:
            continue  # exists, not ours
        if not entry.is_symlink() and entry.is_file() and paths.temp_is_ours(entry):
            _remove_temp(entry)
            removed.append(entry)
    return removed


def _unlink(p: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        p.unlink()
