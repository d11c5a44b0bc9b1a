"""Write a qcow2 (or any qemu format) file in place as a raw disk, through ``qemu-nbd`` over a private
Unix socket: the native ``.gho`` reader writes a qcow2 output in one pass, with no raw copy.

:func:`open_disk` creates nothing; :func:`create_qcow2` makes a new qcow2 of a given size and opens
it. The disk object has ``pread``/``pwrite``/``flush``/``size`` (what :mod:`pipeline.gho.sparse`
expects of a disk). Closing it flushes, disconnects and waits for ``qemu-nbd`` to exit: only then is
the file complete (the caller then fsyncs and renames it).

The client speaks the fixed-newstyle NBD handshake with ``NBD_OPT_EXPORT_NAME`` and simple replies
(the NBD protocol, ``doc/proto.md`` of the NBD project). Writes are coalesced (contiguous pieces up to
:data:`CHUNK`) and pipelined (up to :data:`WINDOW` in flight); reads go through a small cache of
:data:`RBLOCK` blocks (the NTFS rebuild reads its $MFT back a record at a time), fetched after every
write in flight is done and dropped when a write touches them, so a read sees what was written.
``qemu-nbd`` is our own child (:func:`pipeline.tools.run.start_server`): it dies with gho2kvm, and it
exits by itself when the one client disconnects.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import ToolError
from pipeline.tools import qemu_img
from pipeline.tools import run as runner

QEMU_NBD = "qemu-nbd"
CHUNK = 4 << 20  # coalesced write size (qemu-nbd accepts up to 32 MiB per request)
WINDOW = 8  # writes in flight before waiting for a reply (qemu-nbd serves 16 at once)
RBLOCK = 1 << 20  # read cache block
RCACHE = 8  # blocks kept (memory bound: RCACHE * RBLOCK + CHUNK)

# protocol constants (NBD protocol, "Newstyle negotiation" and "Transmission phase")
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
OPT_EXPORT_NAME = 1
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
REQUEST_MAGIC = 0x25609513
REPLY_MAGIC = 0x67446698
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH = 0, 1, 2, 3
_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")


DIR_PREFIX = "gho2kvm-nbd-"


def sweep_dead_dirs() -> list[Path]:
    """Remove the socket folders of killed runs (SIGKILL leaves them: its ``owner`` process is gone)."""
    gone = []
    for d in Path(tempfile.gettempdir()).glob(DIR_PREFIX + "*"):
        try:
            pid, start = (d / "owner").read_text().split()
            if d.stat().st_uid != os.getuid() or runner.process_start(int(pid)) == start:
                continue
        except (OSError, ValueError):
            continue
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


class NbdDisk:
    """A disk image served by our own ``qemu-nbd``; see the module text."""

    def __init__(self, path: Path, fmt: str, *, image_id: str | None, step: str,
                 timeout: float = 60) -> None:
        self.path, self.fmt, self.image_id, self.step = Path(path), fmt, image_id, step
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        sweep_dead_dirs()
        self._dir = Path(tempfile.mkdtemp(prefix=DIR_PREFIX))  # short path: sockets have 107 bytes
        (self._dir / "owner").write_text(f"{os.getpid()} {runner.process_start(os.getpid())}\n")
        self._log = self._dir / "qemu-nbd.log"
        self._handle = 0
        self._inflight: dict[int, tuple[int, int]] = {}  # handle -> (start, end) of a write in flight
        self._pend_off = 0
        self._pend = bytearray()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        try:
            self._start(timeout)
        except BaseException:
            self._stop()
            raise

    # -- set-up and tear-down -----------------------------------------------------------------------
    def _start(self, timeout: float) -> None:
        sock_path = self._dir / "s"
        argv = [QEMU_NBD, f"--socket={sock_path}", "-f", self.fmt, "--cache=writeback", "--aio=threads",
                str(self.path.absolute())]
        self._proc = runner.start_server(argv, step=self.step, image_id=self.image_id, log=self._log,
                                         ready=sock_path.exists, timeout=timeout)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        self._sock = s
        deadline = time.monotonic() + timeout
        while True:  # the socket file exists from bind(); listen() follows at once
            try:
                s.connect(str(sock_path))
                break
            except ConnectionRefusedError:
                rc = self._proc.poll()
                if rc is not None or time.monotonic() > deadline:
                    why = "connection refused" if rc is None else f"it exited (exit {rc})"
                    raise self._error(why) from None
                time.sleep(0.01)
            except OSError as e:
                raise self._error(f"cannot connect to its socket ({e.strerror or e})") from None
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
            raise self._error(f"not a fixed-newstyle NBD server (magic {magic:#x}, {opt:#x}, flags {hflags})")
        cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
        s.sendall(struct.pack(">IQII", cflags, IHAVEOPT, OPT_EXPORT_NAME, 0))
        self.size, tflags = struct.unpack(">QH", self._recv(10))
        if not hflags & FLAG_NO_ZEROES:
            self._recv(124)
        if tflags & TFLAG_READ_ONLY:
            raise self._error("the export is read-only")
        self._can_flush = bool(tflags & TFLAG_SEND_FLUSH)
        s.settimeout(max(timeout, 600))

    def close(self) -> None:
        """Flush, disconnect and wait for ``qemu-nbd`` to exit (the file is then complete)."""
        try:
            self.flush()
            assert self._sock is not None
            self._sock.sendall(_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, self._next(), 0, 0))
            self._sock.close()
            self._sock = None
            proc, self._proc = self._proc, None
            if proc is not None:  # it exits when its one client is gone (no --persistent)
                runner.stop_server(proc, step=self.step, image_id=self.image_id, log=self._log)
        finally:
            self._stop()

    def _stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        proc, self._proc = self._proc, None
        if proc is not None:
            runner.stop_server(proc, step=self.step, image_id=self.image_id, log=self._log, kill=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- I/O ------------------------------------------------------------------------------------------
    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        n = len(data)
        if not n:
            return
        if self._cache:
            for b in range(offset // RBLOCK, (offset + n - 1) // RBLOCK + 1):
                self._cache.pop(b, None)
        if self._pend and offset == self._pend_off + len(self._pend) and len(self._pend) + n <= CHUNK:
            self._pend += data
        else:
            self._send_pending()
            if n >= CHUNK:  # in CHUNK pieces: qemu-nbd drops the connection on a request over 32 MiB
                mv = memoryview(data)
                for k in range(0, n, CHUNK):
                    self._write(offset + k, mv[k:k + CHUNK])
                return
            self._pend_off, self._pend = offset, bytearray(data)
        if len(self._pend) >= CHUNK:
            self._send_pending()

    def pread(self, n: int, offset: int) -> bytes:
        """``n`` bytes at ``offset`` (what lies past the end of the disk reads as zeros)."""
        end = min(offset + n, self.size)
        out = bytearray()
        pos = offset
        while pos < end:
            b = pos // RBLOCK
            block = self._block(b)
            lo = pos - b * RBLOCK
            take = min(end - pos, len(block) - lo)
            out += block[lo:lo + take]
            pos += take
        return bytes(out).ljust(n, b"\0")

    def _block(self, b: int) -> bytes:
        block = self._cache.get(b)
        if block is not None:
            self._cache.move_to_end(b)
            return block
        self._drain()
        start = b * RBLOCK
        take = min(RBLOCK, self.size - start)
        h = self._request(CMD_READ, start, take)
        self._reply(want=h)
        block = self._recv(take)
        self._cache[b] = block
        if len(self._cache) > RCACHE:
            self._cache.popitem(last=False)
        return block

    def flush(self) -> None:
        self._drain()
        if self._can_flush:
            self._reply(want=self._request(CMD_FLUSH, 0, 0))

    def _send_pending(self) -> None:
        if self._pend:
            data, self._pend = self._pend, bytearray()
            self._write(self._pend_off, data)

    def _write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        end = offset + len(data)
        # qemu-nbd may complete writes in flight in any order: one over bytes still in flight waits
        while len(self._inflight) >= WINDOW or any(s < end and offset < e
                                                   for s, e in self._inflight.values()):
            self._reply()
        self._request(CMD_WRITE, offset, len(data), data)

    def _drain(self) -> None:
        self._send_pending()
        while self._inflight:
            self._reply()

    def _next(self) -> int:
        self._handle += 1
        return self._handle

    def _request(self, cmd: int, offset: int, length: int, data: bytes | bytearray | memoryview = b"") -> int:
        assert self._sock is not None
        h = self._next()
        try:
            self._sock.sendall(_REQ.pack(REQUEST_MAGIC, 0, cmd, h, offset, length))
            if data:
                self._sock.sendall(data)
        except OSError as e:
            raise self._error(f"the connection broke ({e.strerror or e})") from None
        if cmd == CMD_WRITE:
            self._inflight[h] = (offset, offset + length)
        return h

    def _reply(self, want: int | None = None) -> None:
        """Read one reply (a write in flight, or ``want``); raise on an error reply."""
        magic, err, h = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != REPLY_MAGIC:
            raise self._error(f"bad reply magic {magic:#x}")
        what = self._inflight.pop(h, None)
        if err:
            name = errno.errorcode.get(err, str(err))
            req = f"a write of {what[1] - what[0]} bytes at offset {what[0]}" if what else "a request"
            raise self._error(f"the server refused {req} of the {self.size}-byte disk: {name} "
                              f"({os.strerror(err)})")
        if want is not None and h != want:
            raise self._error(f"reply for request {h} while waiting for {want}")

    def _recv(self, n: int) -> bytes:
        assert self._sock is not None
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:], n - got)
            except OSError as e:
                raise self._error(f"the connection broke ({e.strerror or e})") from None
            if not k:
                raise self._error("the server closed the connection")
            got += k
        return bytes(buf)

    def _error(self, what: str) -> ToolError:
        tail = runner.log_tail(self._log)
        return ToolError(f"qemu-nbd serving {self.path}: {what}" + (f"; it said: {tail}" if tail else ""),
                         tool=QEMU_NBD, argv=[QEMU_NBD, str(self.path)], returncode=None, stderr=tail,
                         image_id=self.image_id, step=self.step)


@contextlib.contextmanager
def open_disk(path: Path, fmt: str, *, image_id: str | None, step: str) -> Iterator[NbdDisk]:
    """``path`` (an existing image of format ``fmt``) open read-write as a raw disk; closed (flushed,
    ``qemu-nbd`` gone) on leaving, killed on an error."""
    disk = NbdDisk(path, fmt, image_id=image_id, step=step)
    try:
        yield disk
    except BaseException:
        disk._stop()
        raise
    disk.close()


@contextlib.contextmanager
def create_qcow2(path: Path, size: int, *, image_id: str | None, step: str) -> Iterator[NbdDisk]:
    """A new qcow2 of ``size`` bytes at ``path`` (qemu-img's defaults, as ``qemu-img convert -O qcow2``
    makes them), open as :func:`open_disk` does."""
    qemu_img.create(path, "qcow2", size, image_id=image_id, step=step)
    with open_disk(path, "qcow2", image_id=image_id, step=step) as disk:
        yield disk
