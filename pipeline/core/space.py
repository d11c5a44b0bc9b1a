"""Free space: checked before a copy, and a full filesystem named with the file and the bytes needed.

"No space left on device" alone names no file: :func:`named` turns it (an ``OSError`` ENOSPC, or a
tool's message saying so) into one line naming the file being written and the bytes it needs."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import Gho2KvmError, ToolError


class NoSpace(Gho2KvmError):
    """The filesystem of an output has not enough room."""


def free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def require(final: Path, needed: int, *, image_id: str | None = None, step: str | None = None) -> None:
    """Refuse before writing when ``final``'s filesystem has less than ``needed`` bytes free."""
    free = free_bytes(final.parent)
    if free is not None and needed and free < needed:
        raise NoSpace(f"{final}: not enough free space: {needed} bytes needed, {free} free in {final.parent}",
                      image_id=image_id, step=step)


def _enospc(e: BaseException) -> bool:
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    if isinstance(e, ToolError):
        return "No space left on device" in f"{e.stderr} {e.message}" or "Disk quota exceeded" in e.stderr
    return False


@contextlib.contextmanager
def named(final: Path, needed: int | None = None, *, image_id: str | None = None,
          step: str | None = None) -> Iterator[None]:
    """Within: a full filesystem becomes :class:`NoSpace` naming ``final`` (and the bytes needed)."""
    try:
        yield
    except (OSError, ToolError) as e:
        if not _enospc(e):
            raise
        free = free_bytes(final.parent)
        need = f"{needed} bytes needed, " if needed else ""
        raise NoSpace(f"{final}: no space left on the device ({need}{free if free is not None else '?'} "
                      f"bytes free in {final.parent})", image_id=image_id, step=step) from None
