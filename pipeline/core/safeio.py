"""Reading the user's small input files safely, and showing untrusted text in one-line messages.

One rule for every config, ``.reg`` file and VMDK descriptor: ``stat`` first and only a regular
file is ever opened (a FIFO would block the open, ``/dev/zero`` would never end), the size is
capped before anything is read, and at most ``cap + 1`` bytes are read even if the file grows
meanwhile. Untrusted text shown in an error is escaped (control characters, newlines) and cut
short, so a message stays one line of bounded length.
"""

from __future__ import annotations

import os
import stat

from pipeline.core.errors import InputError, as_text, escape

MiB = 1 << 20
__all__ = ["MiB", "escape", "file_kind", "open_nonblocking", "read_capped", "regular_file", "shown"]

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` for a message, bounded: never builds the repr of a huge structure."""
    if isinstance(value, (list, tuple, dict, set)) and len(value) > 8:
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, int) and value.bit_length() > 256:
        return as_text(value)
    try:
        r = repr(value) if not isinstance(value, (list, dict)) else _small_repr(value, limit)
    except (RecursionError, ValueError):
        r = f"a {type(value).__name__}"
    return escape(r, limit)


def _small_repr(value: object, limit: int, depth: int = 0) -> str:
    if depth > 3:
        return "…"
    if isinstance(value, list):
        parts, n = [], 0
        for v in value:
            parts.append(_small_repr(v, limit, depth + 1))
            n += len(parts[-1])
            if n > limit:
                parts.append("…")
                break
        return "[" + ", ".join(parts) + "]"
    if isinstance(value, dict):
        parts, n = [], 0
        for k, v in value.items():
            parts.append(f"{_small_repr(k, limit, depth + 1)}: {_small_repr(v, limit, depth + 1)}")
            n += len(parts[-1])
            if n > limit:
                parts.append("…")
                break
        return "{" + ", ".join(parts) + "}"
    if isinstance(value, (str, bytes)) and len(value) > limit:
        return repr(value[:limit]) + "…"
    return repr(value)


def file_kind(mode: int) -> str | None:
    """None for a regular file, else what it is ("a FIFO (named pipe)", "a directory", ...)."""
    if stat.S_ISREG(mode):
        return None
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def open_nonblocking(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """Open ``path`` read-only and ``fstat`` it, never blocking (a FIFO swapped in after a ``stat`` check
    opens at once and shows in the returned mode). The caller checks :func:`file_kind` and closes the fd;
    ``OSError`` from ``open`` is the caller's to word."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    try:
        return fd, os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise


def regular_file(path: str | os.PathLike[str], what: str = "file", **where: str | None) -> os.stat_result:
    """``os.stat(path)`` (symlinks followed); :class:`InputError` unless it is a regular file."""
    name = escape(os.fspath(path), 300)
    try:
        st = os.stat(path)
    except OSError as e:
        raise InputError(f"{name}: cannot read {what}: {e.strerror}", **where) from None
    except ValueError:  # a NUL in the path
        raise InputError(f"{name}: cannot read {what}: NUL in its name", **where) from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise InputError(f"{name}: {what} is {kind}, expected a regular file; refused", **where)
    return st


def read_capped(path: str | os.PathLike[str], cap: int, what: str = "file", **where: str | None) -> bytes:
    """The whole content of a regular file of at most ``cap`` bytes (never opens anything else,
    never reads more than ``cap + 1`` bytes)."""
    name = escape(os.fspath(path), 300)
    st = regular_file(path, what, **where)
    if st.st_size > cap:
        raise InputError(f"{name}: {what} is too large ({st.st_size} bytes, at most {cap} accepted); refused",
                         **where)
    try:
        fd, fst = open_nonblocking(path)
    except OSError as e:
        raise InputError(f"{name}: cannot read {what}: {e.strerror}", **where) from None
    try:
        if file_kind(fst.st_mode) is not None:  # replaced between stat and open
            raise InputError(f"{name}: {what} is not a regular file; refused", **where)
        chunks, total = [], 0
        while total <= cap:
            data = os.read(fd, min(cap + 1 - total, 4 * MiB))
            if not data:
                break
            chunks.append(data)
            total += len(data)
    except OSError as e:
        raise InputError(f"{name}: cannot read {what}: {e.strerror}", **where) from None
    finally:
        os.close(fd)
    if total > cap:
        raise InputError(f"{name}: {what} is too large (more than {cap} bytes); refused", **where)
    return b"".join(chunks)
