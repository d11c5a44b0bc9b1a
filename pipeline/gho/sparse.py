"""A positional writer that leaves holes for zero data (the output raw disk is sparse)."""

from __future__ import annotations

import os

_ZERO = bytes(1 << 16)


def is_zero(data: bytes | memoryview) -> bool:
    n = len(data)
    if n <= len(_ZERO):
        return data == _ZERO[:n] if n != len(_ZERO) else data == _ZERO
    return bytes(data) == bytes(n)


class SparseWriter:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0

    def write_at(self, offset: int, data: bytes | memoryview) -> None:
        if not data or is_zero(data):
            return
        mv = memoryview(data)
        while mv:
            n = os.pwrite(self.fd, mv, offset)
            offset += n
            self.written += n
            mv = mv[n:]
