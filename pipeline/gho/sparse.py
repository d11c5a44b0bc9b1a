"""The disk the native reader writes: a positional writer that leaves holes for zero data.

The reader writes through a *disk*: anything with ``size``, ``pread(n, offset)`` (zeros past what was
written) and ``pwrite(data, offset)`` (all of it, or an exception; an offset past ``size`` is refused).
:class:`FileDisk` is a sparse raw file; :class:`pipeline.tools.nbd.NbdDisk` a qcow2 file written in
place through ``qemu-nbd`` (the step chooses; this package never starts a tool).
"""

from __future__ import annotations

import os
from typing import Protocol

_ZERO = bytes(1 << 16)


_ZMV = memoryview(_ZERO)


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    if n <= len(_ZERO):
        return data == _ZMV[:n]
    return bytes(data) == bytes(n)


class Disk(Protocol):
    size: int

    def pread(self, n: int, offset: int) -> bytes: ...

    def pwrite(self, data: bytes | memoryview, offset: int) -> None: ...


class OutsideDisk(ValueError):
    """A write that does not fall inside the disk (the reader writes each volume inside its span)."""


class Bounded:
    """``disk`` with every write checked against its size (one rule for every kind of disk)."""

    def __init__(self, disk: Disk) -> None:
        self.disk, self.size = disk, disk.size

    def pread(self, n: int, offset: int) -> bytes:
        return self.disk.pread(n, offset)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        n = len(data)
        if offset < 0 or offset + n > self.size:
            raise OutsideDisk(f"a write of {n} bytes at offset {offset} falls outside the "
                              f"{self.size}-byte disk")
        self.disk.pwrite(data, offset)


class FileDisk:
    """A raw disk file of ``size`` bytes open read-write on ``fd`` (made sparse at that size)."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        os.ftruncate(fd, size)

    def pread(self, n: int, offset: int) -> bytes:
        return os.pread(self.fd, n, offset).ljust(n, b"\0")

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        mv = memoryview(data)
        while mv:
            k = os.pwrite(self.fd, mv, offset)
            offset += k
            mv = mv[k:]


class SparseWriter:
    """Writes data at offsets of ``disk``; all-zero 4 KiB pieces are skipped (they stay holes in a new
    disk). ``written`` counts the bytes handed to the disk."""

    PIECE = 4096

    def __init__(self, disk: Disk) -> None:
        self.disk = disk
        self.written = 0

    def _pwrite(self, offset: int, mv: memoryview) -> None:
        self.disk.pwrite(mv, offset)
        self.written += len(mv)

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        n = len(data)
        if not n or is_zero(data):
            return
        mv = memoryview(data)
        piece = self.PIECE
        if n <= piece:
            self._pwrite(offset, mv)
            return
        run = -1  # start of the pending non-zero run
        for k in range(0, n, piece):
            if is_zero(mv[k:k + piece]):
                if run >= 0:
                    self._pwrite(offset + run, mv[run:k])
                    run = -1
            elif run < 0:
                run = k
        if run >= 0:
            self._pwrite(offset + run, mv[run:])
