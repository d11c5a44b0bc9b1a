"""pipeline.tools.nbd: a qcow2 written in place through our own ``qemu-nbd`` (the native ``.gho`` reader's
qcow2 output). Real qemu-nbd / qemu-img, no appliance: what is written reads back (also before it reached
the server, and after a read cached the block), the file is a clean qcow2 equal to a raw file written the
same way, and the server and its private socket folder are gone after a close, an error inside the
block, a refused write and a refused file."""

from __future__ import annotations

import json
import os
import random
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.errors import ToolError
from pipeline.gho.sparse import FileDisk
from pipeline.tools import nbd, run

MIB = 1 << 20
PREFIX = "gho2kvm-nbd-"


@pytest.fixture
def tmpdir_short(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, short temp folder for the client's socket folder (a socket path has 107 bytes), so
    that what is left in it is ours alone."""
    d = Path(tempfile.mkdtemp(prefix="nbdt-"))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    for p in d.iterdir():  # a test failure may leave a socket folder: do not leave it in /tmp
        for q in p.iterdir():
            q.unlink()
        p.rmdir()
    d.rmdir()


def _socket_dirs(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith(PREFIX))


def _servers(image: Path) -> list[int]:
    """Live (not zombie) qemu-nbd processes serving ``image``."""
    want = str(image.absolute()).encode()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(") ", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv and os.path.basename(argv[0]) == b"qemu-nbd" and want in argv and state not in ("Z", "X"):
            out.append(int(proc.name))
    return out


def _qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=120)


def _writes(size: int) -> list[tuple[int, bytes]]:
    """Writes a decoder makes: runs of sector-sized and odd pieces (coalesced), jumps back and forth,
    rewrites of what was written, one write of more than the largest request qemu-nbd takes (32 MiB)."""
    rnd = random.Random(14)
    out: list[tuple[int, bytes]] = []
    pos = 3 * 512
    for _ in range(200):  # a contiguous run of mixed sizes, past several CHUNK boundaries
        n = rnd.choice([512, 4096, 777, 65536, 1 << 17, MIB])
        out.append((pos, rnd.randbytes(n)))
        pos += n
    for _ in range(300):  # scattered, some over what is already written
        n = rnd.choice([1, 512, 4095, 4096, 40000, MIB + 3])
        out.append((rnd.randrange(0, size - n), rnd.randbytes(n)))
    out.append((size - 512, b"\xee" * 512))  # the last sector
    assert pos < size - 40 * MIB
    big = 2 * nbd.CHUNK + 12345
    out.append((size - 40 * MIB - 4096, rnd.randbytes(40 * MIB)))
    out.append((5 * MIB + 1, rnd.randbytes(big)))
    out.append((0, b"\x55\xaa" * 256))
    return out


def test_round_trip_equals_a_raw_file_written_the_same_way(tmp_path: Path, tmpdir_short: Path) -> None:
    size = 96 * MIB + 512  # not a multiple of the read block: the last block is short
    raw, qcow = tmp_path / "d.raw", tmp_path / "d.qcow2"
    want = bytearray(size)
    fd = os.open(raw, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fdisk = FileDisk(fd, size)
        with nbd.create_qcow2(qcow, size, image_id="rt", step="test") as disk:
            assert disk.size == size
            assert disk.pread(4096, 0) == bytes(4096)  # cached before anything was written
            writes = _writes(size)
            for k, (off, data) in enumerate(writes):
                disk.pwrite(data, off)
                fdisk.pwrite(data, off)
                want[off:off + len(data)] = data
                if k % 37 == 0:
                    # what was just written: still buffered (coalesced) or in flight
                    assert disk.pread(len(data) + 100, off) == bytes(want[off:off + len(data) + 100])
                if k % 53 == 0:
                    lo = max(0, off - 3000)  # a block read (and cached) before a write into it
                    assert disk.pread(8000, lo) == bytes(want[lo:lo + 8000])
                    disk.pwrite(b"\x99" * 100, lo + 10)
                    fdisk.pwrite(b"\x99" * 100, lo + 10)
                    want[lo + 10:lo + 110] = b"\x99" * 100
                    assert disk.pread(8000, lo) == bytes(want[lo:lo + 8000])
            for off in range(0, size, 7 * MIB + 4321):  # reads that straddle the cache's blocks
                assert disk.pread(2 * MIB, off) == bytes(want[off:off + 2 * MIB]).ljust(2 * MIB, b"\0")
    finally:
        os.close(fd)
    assert raw.read_bytes() == want  # the model the disk was written from (the raw writer is trivial)
    info = json.loads(_qemu_img("info", "--output=json", str(qcow)).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", size)
    check = _qemu_img("check", "-f", "qcow2", str(qcow))
    assert check.returncode == 0, check.stdout + check.stderr
    cmp = _qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(qcow))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def test_overlapping_writes_in_flight_land_in_the_order_written(tmp_path: Path, tmpdir_short: Path) -> None:
    """qemu-nbd may finish the writes in flight in any order: a later write over the bytes of an earlier
    one must not be overtaken by it (each pair would be in flight at once)."""
    size, piece = 64 * MIB, 4096
    qcow = tmp_path / "o.qcow2"
    with nbd.create_qcow2(qcow, size, image_id="ov", step="test") as disk:
        for off in range(0, size, MIB):  # allocated clusters: the writes below go straight to the file
            disk.pwrite(b"\x01" * MIB, off)
        disk.flush()
        for rnd in range(3):
            for off in range(0, size, 2 * piece):
                disk.pwrite(bytes([0x40 + rnd]) * piece, off)  # the earlier write
                disk.pwrite(bytes([0x80 + rnd]) * piece, off)  # the later one, over it
                disk.pwrite(b"\x07" * 512, off + piece)  # not contiguous: sends the later one
    got = _qemu_img("convert", "-f", "qcow2", "-O", "raw", str(qcow), str(tmp_path / "o.raw"))
    assert got.returncode == 0, got.stderr
    data = (tmp_path / "o.raw").read_bytes()
    lost = [off for off in range(0, size, 2 * piece) if data[off:off + piece] != b"\x82" * piece]
    assert not lost, f"{len(lost)} later writes overwritten by the earlier one, first at {lost[0]}"


def test_reads_past_the_end_are_zeros(tmp_path: Path, tmpdir_short: Path) -> None:
    size = 3 * MIB + 1536
    with nbd.create_qcow2(tmp_path / "e.qcow2", size, image_id="e", step="test") as disk:
        disk.pwrite(b"\xab" * 1024, size - 1024)
        assert disk.pread(4096, size - 1024) == b"\xab" * 1024 + bytes(3072)
        assert disk.pread(100, size + 10) == bytes(100)
        assert disk.pread(10, size) == bytes(10)


def test_close_leaves_no_server_and_no_socket_folder(tmp_path: Path, tmpdir_short: Path) -> None:
    qcow = tmp_path / "c.qcow2"
    with nbd.create_qcow2(qcow, 4 * MIB, image_id="c", step="test") as disk:
        disk.pwrite(b"hello", 0)
        assert len(_servers(qcow)) == 1 and len(_socket_dirs(tmpdir_short)) == 1
    assert _servers(qcow) == [] and _socket_dirs(tmpdir_short) == []
    # complete once closed: another program reads what was written
    r = subprocess.run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x68 0 1", "-c", "read -P 0 5 4091",
                        str(qcow)], capture_output=True, text=True)
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def test_error_inside_the_block_leaves_no_server(tmp_path: Path, tmpdir_short: Path) -> None:
    qcow = tmp_path / "x.qcow2"
    with pytest.raises(RuntimeError, match="the decoder failed"), \
            nbd.create_qcow2(qcow, 64 * MIB, image_id="x", step="test") as disk:
        disk.pwrite(os.urandom(8 * MIB), 0)
        disk.pwrite(b"pending", 9 * MIB)
        assert _servers(qcow)
        raise RuntimeError("the decoder failed")
    assert _servers(qcow) == [] and _socket_dirs(tmpdir_short) == []


def test_write_past_the_end_is_refused_with_one_line(tmp_path: Path, tmpdir_short: Path) -> None:
    qcow = tmp_path / "p.qcow2"
    with pytest.raises(ToolError) as ei, \
            nbd.create_qcow2(qcow, MIB, image_id="img7", step="ghost-convert") as d:
        d.pwrite(b"ok" * 256, 0)
        d.pwrite(b"x" * 4096, MIB - 1024)  # 3 KiB past the end
    msg = str(ei.value)
    assert "\n" not in msg
    assert msg.startswith("[image img7, step ghost-convert] qemu-nbd serving ") and str(qcow) in msg, msg
    assert "refused a write of 4096 bytes at offset 1047552 of the 1048576-byte disk" in msg, msg
    assert "EINVAL" in msg or "ENOSPC" in msg, msg
    assert (ei.value.image_id, ei.value.step) == ("img7", "ghost-convert")
    assert _servers(qcow) == [] and _socket_dirs(tmpdir_short) == []


def test_qemu_nbd_refusing_the_file_says_why(tmp_path: Path, tmpdir_short: Path) -> None:
    junk = tmp_path / "junk.qcow2"
    junk.write_bytes(b"not an image at all\n" * 100)
    cases = [(tmp_path / "missing.qcow2", "No such file or directory"), (junk, "not in qcow2 format")]
    for path, words in cases:
        with pytest.raises(ToolError) as ei, nbd.open_disk(path, "qcow2", image_id="r", step="test"):
            pass
        msg = str(ei.value)
        assert "\n" not in msg and msg.startswith("[image r, step test] qemu-nbd ") and words in msg, msg
        assert str(path) in msg
        assert _servers(path) == [] and _socket_dirs(tmpdir_short) == []
    assert junk.read_bytes() == b"not an image at all\n" * 100


def test_server_gone_before_the_connection_is_one_line(tmp_path: Path, tmpdir_short: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The server said it listens but is not there (died, socket removed): a ToolError, and the process
    it had named is killed."""
    # the "server": a process that never listens (in its own session, as start_server starts one)
    stand_in = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        monkeypatch.setattr(nbd.runner, "start_server", lambda argv, **kw: stand_in)
        with pytest.raises(ToolError) as ei:
            nbd.NbdDisk(tmp_path / "g.qcow2", "qcow2", image_id="g", step="test")
        msg = str(ei.value)
        assert msg.startswith("[image g, step test] qemu-nbd serving ") and "\n" not in msg, msg
        assert "cannot connect to its socket (No such file or directory)" in msg, msg
        assert stand_in.wait(timeout=30) == -9
        assert _socket_dirs(tmpdir_short) == []
    finally:
        stand_in.kill()
        stand_in.wait()


def test_socket_folders_of_killed_runs_are_swept(tmp_path: Path, tmpdir_short: Path) -> None:
    """A SIGKILLed run leaves its socket folder; the next disk opened removes it, and keeps the folder
    of a run that is still alive (its owner process, by pid and start time)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed, alive = tmpdir_short / f"{PREFIX}killed", tmpdir_short / f"{PREFIX}alive"
    for d, pid in ((killed, dead.pid), (alive, os.getpid())):
        d.mkdir()
        (d / "s").write_bytes(b"")
        (d / "owner").write_text(f"{pid} {run.process_start(pid) or 'gone'}\n")
    with nbd.create_qcow2(tmp_path / "d.qcow2", 1 << 20, image_id="sw", step="test") as disk:
        disk.pwrite(b"x" * 512, 0)
    assert _socket_dirs(tmpdir_short) == [f"{PREFIX}alive"]
