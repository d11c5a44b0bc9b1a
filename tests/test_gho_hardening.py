"""Hostile inputs to the native GHO reader, one class at a time (issue 11); see also test_fuzz_gho.py."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.core import paths
from pipeline.gho.errors import MAX_CATALOGUE_ENTRIES, MAX_ENTRIES, WARNINGS_SHOWN
from tests.support import gho_writer as gw
from tests.support.fuzz_gho import (
    RSS_LIMIT_MIB,
    Layout,
    crc32_msb,
    layout,
    replace_record,
    run_cli,
    zlib_bomb,
)
from tests.support.gho_checks import FIXTURES

NONE = FIXTURES / "75_none.gho"


def cli(tmp: Path, *argv: str, timeout: float = 60) -> tuple[int | None, str, str, float]:
    o = run_cli(["gho", *argv], tmp, timeout=timeout)
    assert "Traceback" not in o.stderr, o.stderr
    assert o.rss_mib < RSS_LIMIT_MIB, o.rss_mib
    return o.rc, o.stdout, o.stderr, o.rss_mib


def refused(rc: int | None, err: str, expect: str) -> None:
    assert rc not in (0, None), err
    assert err.count("\n") == 1 and err.startswith("error: ") and expect in err, err


def copy(tmp: Path, data: bytes, name: str = "75_none.gho") -> Path:
    p = tmp / name
    p.write_bytes(data)
    return p


# -- special files: only regular files are opened ---------------------------------------------------
def test_fifo_span_candidate_is_skipped_not_opened(tmp_path: Path) -> None:
    src = copy(tmp_path, NONE.read_bytes())
    os.mkfifo(tmp_path / "75_no001.ghs")
    rc, out, err, _ = cli(tmp_path, "info", str(src), timeout=30)
    assert rc == 0 and "partition 3" in out and "spans" not in out, err
    rc, out, err, _ = cli(tmp_path, "extract", str(src), str(tmp_path / "d.raw"), "--quiet", timeout=30)
    assert rc == 0 and "3 partitions" in out, err


@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_source_that_is_not_a_regular_file(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "x.gho"
    os.mkfifo(src) if kind == "fifo" else src.mkdir()
    rc, _, err, _ = cli(tmp_path, "info", str(src), timeout=30)
    refused(rc, err, "not a regular file")


# -- outputs that would overwrite the user's files ------------------------------------------------
def _spanned(tmp: Path) -> list[Path]:
    src = copy(tmp, NONE.read_bytes(), "SPLIT.GHO")
    return gw.split_spans(src, 150_000)


@pytest.mark.parametrize("target", ["source", "span", "symlink", "hardlink", "fifo", "device", "dir"])
def test_output_that_would_replace_a_user_file(tmp_path: Path, target: str) -> None:
    files = _spanned(tmp_path)
    before = {p: p.read_bytes() for p in files}
    out = tmp_path / "out.raw"
    expect = "is the image file"
    if target == "source":
        out = files[0]
    elif target == "span":
        out = files[1]
    elif target == "symlink":
        out.symlink_to(files[0])
    elif target == "hardlink":
        os.link(files[2], out)
    elif target == "fifo":
        os.mkfifo(out)
        expect = "not a regular file"
    elif target == "device":
        try:
            os.mknod(out, 0o600 | 0o020000, os.makedev(1, 3))  # a /dev/null twin
        except PermissionError:
            pytest.skip("mknod needs root")
        expect = "not a regular file"
    else:
        out.mkdir()
        expect = "is a directory"
    listing = sorted(p.name for p in tmp_path.iterdir())
    # the password-protected check comes later: the output is refused before any work starts
    rc, _, err, _ = cli(tmp_path, "extract", str(files[0]), str(out), "--quiet", timeout=30)
    refused(rc, err, expect)
    assert {p: p.read_bytes() for p in files} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing
    if target in ("fifo", "device"):
        assert not out.is_file()


def test_directory_output_fails_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    pw = copy(tmp_path, (FIXTURES / "11_high_pw.gho").read_bytes(), "pw.gho")
    rc, _, err, _ = cli(tmp_path, "extract", str(pw), str(tmp_path / "out"))  # no password given
    refused(rc, err, "is a directory")


# -- leftovers -------------------------------------------------------------------------------------
def _big_sector_image(path: Path, mib: int) -> None:
    import random
    rnd = random.Random(1)
    sectors = mib * 2048
    disk = bytearray(gw.mbr([(0x83, 2048, sectors)]))
    disk += bytes(2048 * 512 - len(disk))
    disk += rnd.randbytes(sectors * 512)
    gw.write_sector_disk(path, bytes(disk), [(0x83, 2048, sectors)], "none")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_extract_removes_the_temp(tmp_path: Path, sig: signal.Signals) -> None:
    src = tmp_path / "BIG.GHO"
    _big_sector_image(src, 192)
    out = tmp_path / "d.raw"
    p = subprocess.Popen([sys.executable, "-m", "pipeline", "gho", "extract", str(src), str(out), "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    tmp = tmp_path / f".d.raw.tmp-{p.pid}"
    while not tmp.exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert tmp.exists(), "extract finished before the signal could be sent"
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "Traceback" not in err and err.count("\n") == 1, err
    assert sorted(x.name for x in tmp_path.iterdir()) == ["BIG.GHO"]


def test_stale_temps_of_dead_runs_are_removed(tmp_path: Path) -> None:
    src = copy(tmp_path, NONE.read_bytes())
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".d.raw.tmp-{dead.pid}"
    alive = tmp_path / f".d.raw.tmp-{os.getpid()}"  # a run still going: kept
    other = tmp_path / f".e.raw.tmp-{dead.pid}"  # another output's temp: kept
    for p in (stale, alive, other):
        p.write_bytes(b"x" * 100)
        paths.claim_temp(p)  # temps gho2kvm made carry an owner record
    rc, _, err, _ = cli(tmp_path, "extract", str(src), str(tmp_path / "d.raw"), "--quiet")
    assert rc == 0, err
    assert not stale.exists() and alive.exists() and other.exists()
    assert not paths.owner_record(stale).exists()


# -- advisory checks: a warning, or a refusal with --strict --------------------------------------------
def _edit_body(data: bytes, rec_offset: int, off: int, value: bytes) -> bytes:
    b = bytearray(data)
    b[rec_offset + 10 + off:rec_offset + 10 + off + len(value)] = value
    return bytes(b)


def test_checksum_mismatch_warns_and_strict_refuses(tmp_path: Path) -> None:
    data = NONE.read_bytes()
    lay = layout(data)
    test_txt = [r for r in lay.records if r.kind == 0x02 and r.length == 16][0]  # partition 1's TEST.TXT
    src = copy(tmp_path, _edit_body(data, test_txt.offset, 0, b"this"))
    out = tmp_path / "d.raw"
    rc, stdout, err, _ = cli(tmp_path, "extract", str(src), str(out), "--quiet")
    assert rc == 0 and out.exists() and "3 partitions" in stdout
    assert err.count("\n") == 1 and err.startswith("warning: 75_none.gho: partition 1") and \
        "/TEST.TXT" in err and "does not match the stored checksum 4D176E6E" in err, err
    out.unlink()
    rc, _, err, _ = cli(tmp_path, "extract", str(src), str(out), "--quiet", "--strict")
    refused(rc, err, "does not match the stored checksum 4D176E6E")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["75_none.gho"]


def test_checksum_copies_that_disagree(tmp_path: Path) -> None:
    data = NONE.read_bytes()
    end = [r for r in layout(data).records if r.kind == 0x03][-1]
    src = copy(tmp_path, _edit_body(data, end.offset, 4, b"\0\0\0\0"))
    rc, _, err, _ = cli(tmp_path, "extract", str(src), str(tmp_path / "d.raw"), "--quiet", "--strict")
    refused(rc, err, "checksum copies")


def test_directory_entry_crc_mismatch_warns_in_info_and_extract(tmp_path: Path) -> None:
    data = NONE.read_bytes()
    ent = [r for r in layout(data).records if r.kind == 0x04][1]
    src = copy(tmp_path, _edit_body(data, ent.offset, 32, b"\0\0\0\0"))
    rc, out, err, _ = cli(tmp_path, "info", str(src))
    assert rc == 0 and f"directory entry at offset {ent.offset}: CRC 00000000" in out
    rc, _, err, _ = cli(tmp_path, "info", str(src), "--strict")
    refused(rc, err, f"directory entry at offset {ent.offset}: CRC 00000000")


# -- structures that fail their own checks are refused ----------------------------------------------
@pytest.mark.parametrize(("field", "value", "expect"), [
    (16, b"\x03", "3 FATs"),                      # FAT count
    (11, b"\x00\x03", "bytes/sector 768"),         # bytes per sector
    (13, b"\x03", "sectors/cluster 3"),            # not a power of two
    (44, b"\x00\x00\x00\x10", "root cluster"),     # FAT32 root cluster past the volume
    (22, b"\x10\x00", "clusters need FAT32"),      # FAT size 16 on a FAT32 volume
    (32, b"\x00\x01\x00\x00", "inconsistent FAT geometry"),  # total sectors below the data area
    (14, b"\x00\x00", "reserved 0"),
    (21, b"\x12", "media byte"),
])
def test_boot_sector_geometry_refused(tmp_path: Path, field: int, value: bytes, expect: str) -> None:
    data = NONE.read_bytes()
    boots = [r for r in layout(data).records if r.kind == 0x17][:2]  # both boot records of partition 1
    for r in boots:
        data = _edit_body(data, r.offset, field, value)
    src = copy(tmp_path, data)
    rc, _, err, _ = cli(tmp_path, "extract", str(src), str(tmp_path / "d.raw"), "--quiet")
    refused(rc, err, expect)
    assert "partition 1" in err


def test_closing_boot_record_that_differs_is_refused(tmp_path: Path) -> None:
    data = NONE.read_bytes()
    closing = [r for r in layout(data).records if r.kind == 0x17][1]
    src = copy(tmp_path, _edit_body(data, closing.offset, 3, b"X"))
    rc, _, err, _ = cli(tmp_path, "info", str(src))
    refused(rc, err, "differs from the first")


@pytest.mark.parametrize(("off", "expect"), [(0x1FE, "first sector differs"), (512, "FSInfo sector 1"),
                                             (6 * 512 + 13, "backup boot sector 6")])
def test_corrupt_reserved_area_refused(tmp_path: Path, off: int, expect: str) -> None:
    data = NONE.read_bytes()
    res = [r for r in layout(data).records if r.kind == 0x18][0]
    src = copy(tmp_path, _edit_body(data, res.offset, off, b"\x77"))
    rc, _, err, _ = cli(tmp_path, "extract", str(src), str(tmp_path / "d.raw"), "--quiet")
    refused(rc, err, expect)


@pytest.mark.parametrize("byte", [0, 1, 3, 4, 7])
def test_flipped_first_partition_header_is_not_skipped(tmp_path: Path, byte: int) -> None:
    data = bytearray(NONE.read_bytes())
    data[layout(bytes(data)).part_headers[0] + byte] ^= 0x40
    src = copy(tmp_path, bytes(data))
    rc, _, err, _ = cli(tmp_path, "info", str(src))
    refused(rc, err, "corrupt first partition header at offset 2560")


@pytest.mark.parametrize("subtype", [0x02, 0x04, 0x05, 0x07])
def test_changed_partition_subtype(tmp_path: Path, subtype: int) -> None:
    data = bytearray(NONE.read_bytes())
    data[layout(bytes(data)).part_headers[1] + 2] = subtype
    src = copy(tmp_path, bytes(data))
    rc, _, err, _ = cli(tmp_path, "extract", str(src), str(tmp_path / "d.raw"), "--quiet")
    refused(rc, err, "partition 2")


def test_partition_header_copy_byte_is_advisory(tmp_path: Path) -> None:
    data = bytearray(NONE.read_bytes())
    data[layout(bytes(data)).part_headers[2] + 0x30] ^= 1
    src = copy(tmp_path, bytes(data))
    rc, out, _, _ = cli(tmp_path, "info", str(src))
    assert rc == 0 and "partition 3 header at offset 409589: byte 0x30" in out
    rc, _, err, _ = cli(tmp_path, "info", str(src), "--strict")
    refused(rc, err, "byte 0x30")


# -- unbounded work --------------------------------------------------------------------------------
def _with_entries(n: int, bad_crc: bool = False) -> bytes:
    """75_none.gho with ``n`` extra empty files in partition 1's root (after its label entry)."""
    data = NONE.read_bytes()
    lay = layout(data)
    label = [r for r in lay.records if r.kind == 0x04][0]
    at = label.offset + 10 + label.length
    recs = []
    for k in range(n):
        slot = f"F{k:07d}TXT".encode() + b"\x20" + bytes(20)
        crc = 0 if bad_crc else crc32_msb(slot)
        recs.append(gw.record(0x04, slot + struct.pack("<I", crc) + bytes(20)))
    return data[:at] + b"".join(recs) + data[at:]


def test_entry_count_is_capped(tmp_path: Path) -> None:
    src = copy(tmp_path, _with_entries(MAX_ENTRIES + 1))
    t0 = time.monotonic()
    rc, _, err, rss = cli(tmp_path, "info", str(src), timeout=120)
    refused(rc, err, f"more than {MAX_ENTRIES} directory entries")
    assert time.monotonic() - t0 < 60


def test_many_entries_bounded_and_warnings_summarised(tmp_path: Path) -> None:
    n = 20_000
    src = copy(tmp_path, _with_entries(n, bad_crc=True))
    out = tmp_path / "d.raw"
    rc, stdout, err, rss = cli(tmp_path, "extract", str(src), str(out), "--quiet", timeout=120)
    assert rc == 0 and f"{7 + n} files" in stdout, err
    lines = err.splitlines()
    assert len(lines) == WARNINGS_SHOWN + 1 and lines[-1].startswith("warning: … and ")
    assert int(lines[-1].split()[3]) >= n - WARNINGS_SHOWN  # (the catalogue's offsets shifted too)


def test_millions_of_empty_records_refused_fast(tmp_path: Path) -> None:
    data = NONE.read_bytes()
    label = [r for r in layout(data).records if r.kind == 0x04][0]
    at = label.offset + 10 + label.length
    src = copy(tmp_path, data[:at] + gw.record(0x03, b"") * 2_000_000 + data[at:])
    t0 = time.monotonic()
    rc, _, err, _ = cli(tmp_path, "info", str(src), timeout=60)
    refused(rc, err, "has kind 0x03 and a 0-byte body")
    assert time.monotonic() - t0 < 20


def test_opening_a_span_does_not_read_the_whole_first_file(tmp_path: Path) -> None:
    big = tmp_path / "LARGE.GHO"
    head = bytearray(NONE.read_bytes()[:512])
    with open(big, "wb") as f:
        f.write(head)
        f.truncate(3 << 30)  # sparse 3 GiB
    h = bytearray(head)
    h[2] = 0x09
    struct.pack_into("<I", h, 4, struct.unpack_from("<I", head, 4)[0] + 1)
    (tmp_path / "LARGE001.GHS").write_bytes(bytes(h) + bytes(4096))
    rc, _, err, rss = cli(tmp_path, "info", str(tmp_path / "LARGE001.GHS"), timeout=120)
    assert rc != 0 and err.count("\n") == 1 and "LARGE.GHO" in err, err
    assert rss < RSS_LIMIT_MIB


def test_catalogue_bomb_is_capped(tmp_path: Path) -> None:
    lay: Layout = layout(NONE.read_bytes())
    entry = struct.pack("<IQHHH", 16, 1234, 0, 0, 0x20) + b"A.B\0"
    body = zlib_bomb(64 << 20, entry)[:65535]  # 3.5 million entries from 64 KiB
    src = copy(tmp_path, replace_record(lay, lay.catalogues[0], body, fix_trailer=True))
    t0 = time.monotonic()
    rc, out, err, _ = cli(tmp_path, "info", str(src))
    # each entry up to the cap is a mismatch, then the cap itself: summarised as first 20 + a count
    more = MAX_CATALOGUE_ENTRIES + 1 - WARNINGS_SHOWN
    assert rc == 0 and out.count("warning:") == WARNINGS_SHOWN + 1, err
    assert f"… and {more} more warnings" in out
    rc, _, err, _ = cli(tmp_path, "info", str(src), "--strict")
    refused(rc, err, "does not match the directory records")
    assert time.monotonic() - t0 < 60
