"""A positional writer that leaves holes for zero data (the output raw disk is sparse)."""

from __future__ import annotations

import os

_ZERO = bytes(1 << 16)


_ZMV = memoryview(_ZERO)


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    if n <= len(_ZERO):
        return data == _ZMV[:n]
    return bytes(data) == bytes(n)


class SparseWriter:
    """Writes data at offsets; all-zero 4 KiB pieces are skipped (they stay holes in a new file)."""

    PIECE = 4096

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0

    def _pwrite(self, offset: int, mv: memoryview) -> None:
        while mv:
            n = os.pwrite(self.fd, mv, offset)
            offset += n
            self.written += n
            mv = mv[n:]

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
