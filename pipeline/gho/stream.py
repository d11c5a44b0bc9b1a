"""The logical stream: the first file, then every continuation file from offset 512 on
(docs/gho-format.md §4)."""

from __future__ import annotations

import bisect
import contextlib
import os
from pathlib import Path

from pipeline.core.safeio import file_kind, open_nonblocking
from pipeline.gho.errors import GhoError
from pipeline.gho.header import HEADER_SIZE
from pipeline.gho.spans import later_spans, span_display_name

WINDOW = 1 << 20  # read-ahead window for small reads (record headers): one per stream


class SpanStream:
    """Random access to the spliced stream with ``pread``; small reads are served from one 1 MiB window."""

    def __init__(self, first: Path, spans: list[Path]) -> None:
        self.first = Path(first)
        self.name = self.first.name
        self.paths = [self.first, *[Path(p) for p in spans]]
        self._fds: list[int] = []
        self._starts: list[int] = []
        self._bases: list[int] = []
        self._lens: list[int] = []
        self._win_off = 0
        self._win = b""
        pos = 0
        try:
            for k, p in enumerate(self.paths):
                # only regular files are opened: O_NONBLOCK keeps a FIFO swapped in after the check
                # from blocking the open, and the fstat refuses it before any read
                fd, st = open_nonblocking(p)
                self._fds.append(fd)
                if file_kind(st.st_mode) is not None:
                    self.close()
                    raise GhoError(f"{self.name}: {p} is not a regular file")
                size = st.st_size
                base = 0 if k == 0 else HEADER_SIZE
                length = max(0, size - base)
                self._starts.append(pos)
                self._bases.append(base)
                self._lens.append(length)
                pos += length
        except OSError as e:
            self.close()
            raise GhoError(f"{self.name}: cannot open {e.filename}: {e.strerror}") from None
        self.size = pos

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []

    def __enter__(self) -> SpanStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read_upto(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset`` (fewer at the end of the stream)."""
        if offset >= self.size or n <= 0 or offset < 0:
            return b""
        n = min(n, self.size - offset)
        if n <= 4096:
            rel = offset - self._win_off
            if not (rel >= 0 and rel + n <= len(self._win)):
                self._win_off, self._win = offset, self._pread(offset, min(WINDOW, self.size - offset))
                rel = 0
            return self._win[rel:rel + n]
        return self._pread(offset, n)

    def _pread(self, offset: int, n: int) -> bytes:
        k = bisect.bisect_right(self._starts, offset) - 1
        parts = []
        while n > 0 and k < len(self._fds):
            rel = offset - self._starts[k]
            take = min(n, self._lens[k] - rel)
            if take <= 0:
                k += 1
                continue
            data = os.pread(self._fds[k], take, self._bases[k] + rel)
            if not data:
                break
            parts.append(data)
            offset += len(data)
            n -= len(data)
            if len(data) == take:
                k += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read(self, offset: int, n: int, what: str = "data") -> bytes:
        """Exactly ``n`` bytes at ``offset``, else a one-line truncation error."""
        data = self.read_upto(offset, n)
        if len(data) != n:
            raise self.truncated(offset + len(data), what)
        return data

    def truncated(self, offset: int, what: str) -> GhoError:
        nspans = len(self.paths) - 1
        later = later_spans(self.first, nspans + 1)
        missing = span_display_name(self.first, nspans + 1)
        if later or nspans:
            found = f" (found {later[0]} after the gap)" if later else ""
            return GhoError(f"{self.name}: missing span {missing}{found}: "
                            f"stream ends at offset {offset} while reading {what}")
        hint = "" if nspans else f"; if the image was split, span {missing} is missing"
        return GhoError(f"{self.name}: truncated at offset {offset} while reading {what}{hint}")
