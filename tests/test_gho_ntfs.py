"""NTFS file-aware GHO images (docs/gho-format.md §11): written by the test-only writer from real NTFS volumes
(mkntfs + ntfs-3g), rebuilt by ``extract``; the rebuilt volume must pass ``ntfsfix -n``, mount, and hold
every file, directory, timestamp and attribute of the original (§11.10)."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from pipeline.gho.errors import GhoError
from pipeline.gho.extract import extract
from pipeline.gho.info import read_info
from tests.support.gho_checks import carve, extract_raw_and_qcow2, mbr_partitions
from tests.support.gho_ntfs_writer import (
    NtfsOptions,
    NtfsSource,
    Part,
    make_volume,
    mounted,
    write_ntfs_image,
)
from tests.support.gho_writer import split_spans

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("mkntfs", "ntfs-3g", "ntfsfix", "fusermount"))
    or not os.path.exists("/dev/fuse"), reason="needs ntfs-3g, mkntfs, ntfsfix and FUSE")

PW = "s3cret"


def _fill_rich(m: Path) -> None:
    rnd = random.Random(7)
    (m / "small.txt").write_bytes(b"resident data\n")
    (m / "empty.bin").write_bytes(b"")
    (m / "big.bin").write_bytes(rnd.randbytes(300_000))
    for i in range(150):  # a full base record: $ATTRIBUTE_LIST and extension records
        os.link(m / "small.txt", m / f"a_rather_long_hard_link_name_number_{i:03d}.txt")
    with open(m / "sparse.bin", "wb") as f:
        f.truncate(6 << 20)
        f.seek(3_000_000)
        f.write(b"island" * 100)
    (m / "packed").mkdir()
    os.setxattr(m / "packed", "system.ntfs_attrib_be", struct.pack(">I", 0x800))
    (m / "packed" / "comp.txt").write_bytes(b"compressible ghost line\n" * 20000)
    deep = m / "Ünïcødé 文件夹" / "nested" / "deeper"
    deep.mkdir(parents=True)
    (deep / "файл ✓.txt").write_text("unicode names\n" * 500)
    (m / "pagefile.sys").write_bytes(rnd.randbytes(1 << 20))
    (m / "Docs").mkdir()
    for i in range(60):  # enough entries for an $INDEX_ALLOCATION
        (m / "Docs" / f"document number {i:02d}.txt").write_text(f"doc {i}\n")
    os.utime(m / "big.bin", (1_000_000_000, 1_100_000_000))


def _fill_fragmented(m: Path) -> None:
    rnd = random.Random(5)
    with open(m / "frag.bin", "wb") as frag:  # written backwards between other files: 8 fragments
        frag.truncate(8 * 3 * 4096)
        for i in reversed(range(8)):
            frag.seek(i * 3 * 4096)
            frag.write(rnd.randbytes(3 * 4096))
            frag.flush()
            os.fsync(frag.fileno())
            (m / f"between{i}.bin").write_bytes(rnd.randbytes(2 * 4096))


def _fill_small(m: Path) -> None:
    rnd = random.Random(11)
    (m / "one.bin").write_bytes(rnd.randbytes(200_000))
    (m / "sub").mkdir()
    (m / "sub" / "two.txt").write_text("two\n" * 1000)


def _manifest(vol: Path, mnt: Path) -> dict[str, tuple]:
    out: dict[str, tuple] = {}
    with mounted(vol, mnt, ro=True) as m:
        for dirpath, dirnames, filenames in os.walk(m):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                rel = str(p.relative_to(m))
                st = p.stat()
                times = os.getxattr(p, "system.ntfs_times")
                attrib = os.getxattr(p, "system.ntfs_attrib")
                digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
                out[rel] = (digest, st.st_size, times, attrib)
    return out


def _features(vol: Path) -> set[str]:
    """Which §11.10 case 8 structures the source volume really has (guards the test's premise)."""
    src = NtfsSource(vol)
    got = set()
    try:
        for n in range(src.nrec):
            raw = src.record(n)
            if raw[:4] != b"FILE":
                continue
            rec = src.fixup(raw)
            if not struct.unpack_from("<H", rec, 0x16)[0] & 1:
                continue
            for a in src.attrs(rec):
                if a["type"] == 0x20:
                    got.add("attribute list")
                if a["type"] == 0xA0:
                    got.add("index allocation")
                if a["nonres"] and a["type"] == 0x80:
                    runs = a["runs"]
                    if sum(1 for _, lcn in runs if lcn is not None) > 1 and src.file_name(rec) == "frag.bin":
                        got.add("fragmented")
                    if any(lcn is None for _, lcn in runs) and n >= 16:
                        got.add("sparse")
                if a["type"] == 0x80 and not a["nonres"] and n >= 16:
                    got.add("resident")
            pos = struct.unpack_from("<H", rec, 0x14)[0]
            while pos + 16 <= len(rec):
                t, ln = struct.unpack_from("<II", rec, pos)
                if t == 0xFFFFFFFF or ln == 0:
                    break
                if t == 0x80 and struct.unpack_from("<H", rec, pos + 12)[0] & 1:
                    got.add("compressed")
                pos += ln
    finally:
        src.close()
    return got


@pytest.fixture(scope="module")
def vols(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ntfsvols")
    out = {
        "rich": make_volume(d / "rich.img", 40, fill=_fill_rich, plain_fill=_fill_fragmented, label="RICH"),
        "k64": make_volume(d / "k64.img", 64, cluster=65536, fill=_fill_small, label="BIG64K"),
        "second": make_volume(d / "second.img", 16, hidden=81983 + 63, fill=_fill_small, label="LOGICAL"),
    }
    fat = d / "fat32.img"
    subprocess.run(["mkfs.fat", "-C", "-F", "32", "-n", "FATSIDE", "-h", "63", str(fat), str(40 * 1024)],
                   check=True, capture_output=True)
    subprocess.run(["mmd", "-i", str(fat), "::/dir"], check=True, capture_output=True)
    (d / "hello.txt").write_text("hello from FAT32\n" * 300)
    subprocess.run(["mcopy", "-i", str(fat), str(d / "hello.txt"), "::/dir/hello.txt"], check=True,
                   capture_output=True)
    out["fat32"] = fat
    out["ntfs_after_fat"] = make_volume(d / "after.img", 16, hidden=81983 + 63, fill=_fill_small,
                                        label="AFTERFAT")
    return out


@pytest.fixture(scope="module")
def manifests(vols: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    d = tmp_path_factory.mktemp("mnt")
    return {k: _manifest(v, d / k) for k, v in vols.items() if k != "fat32"}


def _check_volume(disk: Path, start: int, src: Path, manifest: dict, omitted: list[tuple[int, int, int]],
                  tmp: Path) -> None:
    size = src.stat().st_size
    part = carve(disk, start * 512, size, tmp / f"part{start}.img")
    a, b = bytearray(part.read_bytes()), bytearray(src.read_bytes())
    k = struct.unpack_from("<H", b, 11)[0] * b[13]
    for rec, lcn, count in omitted:  # omitted files read as zeros; everything else is the source's
        if rec in (1, 6):
            continue  # $MFTMirr and $Bitmap are synthesised and must equal the source's (§11.7)
        assert a[lcn * k:(lcn + count) * k] == bytes(count * k)
        a[lcn * k:(lcn + count) * k] = b[lcn * k:(lcn + count) * k]
    bitmap = _bitmap(src)
    for c in range(len(b) // k):  # free clusters: content not imaged, rebuilt as zeros
        if not bitmap[c // 8] >> (c % 8) & 1:
            assert a[c * k:(c + 1) * k] == bytes(k), f"free cluster {c} is not zero"
            a[c * k:(c + 1) * k] = b[c * k:(c + 1) * k]
    assert a == b, "rebuilt volume differs from the source outside the omitted files"
    r = subprocess.run(["ntfsfix", "-n", str(part)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    got = _manifest(part, tmp / f"m{start}")
    want = dict(manifest)
    if "pagefile.sys" in want:
        dg, sz, times, attrib = want["pagefile.sys"]
        want["pagefile.sys"] = (hashlib.sha256(bytes(sz)).hexdigest(), sz, times, attrib)
    assert got == want


def _bitmap(vol: Path) -> bytes:
    src = NtfsSource(vol)
    try:
        rec = src.fixup(src.record(6))
        data = [a for a in src.attrs(rec) if a["type"] == 0x80][0]
        return b"".join(bytes(src.clusters(lcn, count)) for count, lcn in data["runs"])
    finally:
        src.close()


def test_source_volume_has_every_structure(vols: dict[str, Path]) -> None:
    assert _features(vols["rich"]) >= {"attribute list", "index allocation", "fragmented", "sparse",
                                       "compressed", "resident"}


CASES = {
    "high": ("high", NtfsOptions(), None),
    "high-0x0A": ("high0a", NtfsOptions(), None),
    "none-raw": ("none", NtfsOptions(framed=False), None),
    "none-framed": ("none", NtfsOptions(), None),
    "fast": ("fast", NtfsOptions(), None),
    "cut-stored-chk-pieces": ("high", NtfsOptions(cut=[1, 3, 60000, 777, 32768], stored_every=3,
                                                  chk="pieces"), None),
    "no-chk-free-8008-fixed-form": ("none", NtfsOptions(chk="none", free="8008", fixed_form=True), None),
    "none-raw-chk-pieces": ("none", NtfsOptions(framed=False, chk="pieces"), None),
    "password-a-high": ("high", NtfsOptions(cipher="a"), PW),
    "password-c-high": ("high", NtfsOptions(cipher="c"), PW),
    "password-a-fast": ("fast", NtfsOptions(cipher="a"), PW),
    "password-a-none": ("none", NtfsOptions(cipher="a"), PW),
    "password-b-none-raw": ("none", NtfsOptions(framed=False, cipher="b"), PW),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rebuild_matches_source(case: str, vols: dict[str, Path], manifests: dict, tmp_path: Path) -> None:
    comp, opts, pw = CASES[case]
    gho = tmp_path / "NTFS.GHO"
    omitted = write_ntfs_image(gho, [Part("ntfs", vols["rich"], opts)], comp, password=pw)[0]
    before = hashlib.sha256(gho.read_bytes()).hexdigest()
    disk = tmp_path / "disk.raw"
    res = extract(gho, disk, password=pw)
    assert hashlib.sha256(gho.read_bytes()).hexdigest() == before
    (p,) = res.partitions
    assert (p.fs, p.label, p.start_lba, p.partition_type) == ("NTFS", "RICH", 63, 0x07)
    assert p.runs_placed is not None and p.runs_placed["heuristic"] == 0 and p.runs_placed["deterministic"]
    assert any("pagefile.sys" in w and "reads as zeros" in w for w in res.warnings)
    assert not any("heuristic" in w for w in res.warnings)
    assert os.stat(disk).st_blocks * 512 < os.stat(disk).st_size  # sparse
    _check_volume(disk, 63, vols["rich"], manifests["rich"], omitted, tmp_path)


def test_spanned_image_cut_inside_packets(vols: dict[str, Path], manifests: dict, tmp_path: Path) -> None:
    gho = tmp_path / "SPANNED.GHO"
    omitted = write_ntfs_image(gho, [Part("ntfs", vols["rich"], NtfsOptions(framed=False))], "none")[0]
    spans = split_spans(gho, 1_000_003)
    assert len(spans) > 3
    res = extract(gho, tmp_path / "d.raw")
    assert res.partitions[0].files > 1
    _check_volume(tmp_path / "d.raw", 63, vols["rich"], manifests["rich"], omitted, tmp_path)
    spans[2].rename(tmp_path / "elsewhere.GHS")
    with pytest.raises(GhoError) as ei:
        extract(gho, tmp_path / "d2.raw")
    # refused before any output: either the chain walk (partition, offset, "truncated chain") or the
    # earlier trailer read notices the gap; both name the missing span
    msg = str(ei.value)
    assert msg.startswith("SPANNED.GHO: ") and f"missing span {spans[2].name}" in msg, msg
    walk = "partition 1 (NTFS), offset" in msg and "truncated chain" in msg
    assert walk or "stream ends at offset" in msg, msg
    assert not (tmp_path / "d2.raw").exists()


def test_64k_clusters(vols: dict[str, Path], manifests: dict, tmp_path: Path) -> None:
    gho = tmp_path / "K64.GHO"
    omitted = write_ntfs_image(gho, [Part("ntfs", vols["k64"])], "high")[0]
    info = read_info(gho)
    assert info.partitions[0].geometry is not None
    assert info.partitions[0].geometry["cluster_size"] == 65536
    extract(gho, tmp_path / "d.raw")
    _check_volume(tmp_path / "d.raw", 63, vols["k64"], manifests["k64"], omitted, tmp_path)


@pytest.mark.parametrize("order", ["ntfs-ntfs", "fat32-ntfs"])
def test_two_partitions_second_logical(order: str, vols: dict[str, Path], manifests: dict,
                                       tmp_path: Path) -> None:
    gho = tmp_path / "TWO.GHO"
    if order == "ntfs-ntfs":
        small = make_volume(tmp_path / "first.img", 40, fill=_fill_small, label="FIRST")
        first = _manifest(small, tmp_path / "mfirst")
        parts = [Part("ntfs", small), Part("ntfs", vols["second"])]
        second, second_key = vols["second"], "second"
    else:
        parts = [Part("fat", vols["fat32"]), Part("ntfs", vols["ntfs_after_fat"])]
        second, second_key = vols["ntfs_after_fat"], "ntfs_after_fat"
    omitted = write_ntfs_image(gho, parts, "high", password=PW)
    info = read_info(gho, password=PW)
    want = ["NTFS", "NTFS"] if order == "ntfs-ntfs" else ["FAT32", "NTFS"]
    assert [p.fs for p in info.partitions] == want
    res = extract(gho, tmp_path / "d.raw", password=PW)
    p1, p2 = res.partitions
    assert p2.logical and p2.partition_type == 0x07
    layout = mbr_partitions(tmp_path / "d.raw")
    assert [t for t, _s, _n in layout][-1] == 0x07
    start2 = struct.unpack_from("<I", second.read_bytes()[:512], 0x1C)[0]
    assert p2.start_lba == start2
    _check_volume(tmp_path / "d.raw", p2.start_lba, second, manifests[second_key], omitted[1], tmp_path)
    if order == "ntfs-ntfs":
        _check_volume(tmp_path / "d.raw", 63, small, first, omitted[0], tmp_path)
    else:
        assert p1.label == "FATSIDE" and p1.files == 1


@pytest.mark.parametrize("case", ["ntfs", "fat32-ntfs"])
def test_rebuilds_the_same_as_raw_and_qcow2(case: str, vols: dict[str, Path], tmp_path: Path) -> None:
    """ghost-convert writes a qcow2 output in place through qemu-nbd: the NTFS rebuild reads back what
    it wrote ($MFT, boot sector, the boot chain), so the qcow2 must hold exactly the raw file's disk."""
    gho = tmp_path / "EQ.GHO"
    if case == "ntfs":
        write_ntfs_image(gho, [Part("ntfs", vols["rich"], NtfsOptions(cipher="a"))], "high", password=PW)
    else:
        write_ntfs_image(gho, [Part("fat", vols["fat32"]), Part("ntfs", vols["ntfs_after_fat"])], "high",
                         password=PW)
    _raw, _qcow, a, b = extract_raw_and_qcow2(gho, tmp_path, PW)
    assert a == b  # partitions, runs placed, files, boot chain, warnings, bytes written
    want = ["NTFS"] if case == "ntfs" else ["FAT32", "NTFS"]
    assert [p["fs"] for p in a["partitions"]] == want
    assert a["boot_chain"]["active_partition"] == 1


# -- the $MFT fallback and the refusals ------------------------------------------------------------------
def _raw_image(tmp: Path, vol: Path, opts: NtfsOptions | None = None) -> tuple[Path, bytearray]:
    gho = tmp / "RAW.GHO"
    write_ntfs_image(gho, [Part("ntfs", vol, opts or NtfsOptions(framed=False, chk="none"))], "none")
    return gho, bytearray(gho.read_bytes())


def _id(ident: int, value: int) -> bytes:
    return b"\x0e" + struct.pack("<H", ident) + bytes(4) + struct.pack("<Q", value) + b"\x0f"


def test_unusable_record_copy_is_placed_from_the_mft(vols: dict[str, Path], manifests: dict,
                                                     tmp_path: Path) -> None:
    gho = tmp_path / "CORRUPT.GHO"
    opts = NtfsOptions(corrupt_copies={64, 65, 66, 67, 68, 69, 70})
    omitted = write_ntfs_image(gho, [Part("ntfs", vols["rich"], opts)], "high")[0]
    res = extract(gho, tmp_path / "d.raw")
    rp = res.partitions[0].runs_placed
    assert rp is not None and rp["heuristic"] > 0
    assert any("heuristic" in w for w in res.warnings)
    info = read_info(gho)
    assert any("heuristic" in n for n in info.partitions[0].notes)
    _check_volume(tmp_path / "d.raw", 63, vols["rich"], manifests["rich"], omitted, tmp_path)


def _refused(gho: Path, data: bytes, tmp: Path, *needles: str) -> str:
    gho.write_bytes(data)
    before = hashlib.sha256(data).hexdigest()
    out = tmp / "out.raw"
    with pytest.raises(GhoError) as ei:
        extract(gho, out)
    msg = str(ei.value)
    assert "\n" not in msg and msg.startswith(gho.name) and "partition 1" in msg and "offset" in msg, msg
    for n in needles:
        assert n in msg, msg
    assert not out.exists() and not list(tmp.glob("out.raw*")), "no output file may be left"
    assert hashlib.sha256(gho.read_bytes()).hexdigest() == before
    return msg


def test_refuses_bad_packet(vols: dict[str, Path], tmp_path: Path) -> None:
    gho, data = _raw_image(tmp_path, vols["rich"])
    pos = data.index(_id(0x8004, 5))
    data[pos + 15] = 0x00
    _refused(gho, bytes(data), tmp_path, "bad packet", f"offset {pos}")


def test_refuses_run_count_mismatch(vols: dict[str, Path], tmp_path: Path) -> None:
    gho, data = _raw_image(tmp_path, vols["rich"])
    pos = data.index(_id(0x8004, 2))  # $LogFile: its first run's length packet follows
    run = data.index(_id(0x0002, 0), pos) + 16
    assert data[run] == 0x0F
    data[run + 1] ^= 0x01
    _refused(gho, bytes(data), tmp_path, "run count mismatch", "MFT record 2")


def test_refuses_unknown_record_id(vols: dict[str, Path], tmp_path: Path) -> None:
    gho, data = _raw_image(tmp_path, vols["rich"])
    pos = data.index(_id(0x8004, 9))
    data[pos + 1:pos + 3] = struct.pack("<H", 0x8080)
    _refused(gho, bytes(data), tmp_path, "unknown record id 0x8080", f"offset {pos}")


def test_refuses_truncated_chain(vols: dict[str, Path], tmp_path: Path) -> None:
    gho = tmp_path / "TRUNC.GHO"
    write_ntfs_image(gho, [Part("ntfs", vols["rich"])], "high")
    data = gho.read_bytes()
    cut = data[:len(data) * 2 // 3]
    gho.write_bytes(cut)
    out = tmp_path / "out.raw"
    with pytest.raises(GhoError) as ei:
        extract(gho, out)
    msg = str(ei.value)
    # refused before any output: the trailer check (made first since the hardening) names the offset
    assert "\n" not in msg and msg.startswith(gho.name) and "truncated at offset" in msg, msg
    assert not out.exists() and not list(tmp_path.glob("out.raw*")), "no output file may be left"
    assert gho.read_bytes() == cut


def test_refuses_unplaced_run(vols: dict[str, Path], tmp_path: Path) -> None:
    """Record 64's copy is unusable and its record in the $MFT data is damaged too: nothing places it."""
    gho, data = _raw_image(tmp_path, vols["rich"], NtfsOptions(framed=False, chk="none",
                                                               corrupt_copies={64}))
    src = NtfsSource(vols["rich"])
    try:
        rec64 = bytes(src.record(64))
    finally:
        src.close()
    pos = data.index(rec64)  # inside the $MFT's data, which comes first
    assert pos < data.index(_id(0x8004, 64))
    data[pos:pos + 4] = b"BAAD"
    _refused(gho, bytes(data), tmp_path, "unplaced run", "MFT record 64")


def test_info_lists_ntfs_partition(vols: dict[str, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from pipeline.app.gho_cli import register

    gho = tmp_path / "INFO.GHO"
    write_ntfs_image(gho, [Part("ntfs", vols["rich"])], "fast")
    parser = argparse.ArgumentParser(prog="gho2kvm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["gho", "info", str(gho)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "partition 1: ntfs NTFS 'RICH', size 40.0 MiB" in out
    assert "4096-byte clusters" in out and "runs placed by the stream walk" in out
    assert "pagefile.sys (MFT record" in out
    info = read_info(gho)
    p = info.partitions[0]
    assert p.files is not None and p.files >= 8 and p.directories is not None and p.directories >= 5
    assert p.file_bytes is not None and p.file_bytes > 300_000 + (1 << 20)


# -- end to end: the phony XP disk as an NTFS file-aware image through the whole pipeline ------------------
@pytest.mark.guestfs
def test_xp_ntfs_image_through_the_pipeline(xp_raw: Path, tmp_path: Path) -> None:
    from tests.support.fx_pipeline import make_config, receipt, run_cli

    ((_ptype, start, count),) = mbr_partitions(xp_raw)
    vol = carve(xp_raw, start * 512, count * 512, tmp_path / "xp-ntfs.img")
    assert vol.read_bytes()[3:11] == b"NTFS    "
    src = tmp_path / "src" / "WINXP.GHO"
    src.parent.mkdir()
    write_ntfs_image(src, [Part("ntfs", vol)], "high")
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    cfg = make_config(tmp_path, [{"id": "xp-ntfs", "source": src}], defaults={"ghost": {"backend": "native"}})
    proc = run_cli("migrate", "--config", str(cfg))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    gc = receipt(tmp_path, "xp-ntfs", "ghost-convert")["result"]
    assert gc["backend"] == "native"
    (part,) = gc["partitions"]
    assert (part["fs"], part["start_lba"], part["partition_type"]) == ("NTFS", start, 0x07)
    assert part["runs_placed"]["heuristic"] == 0
    facts = receipt(tmp_path, "xp-ntfs", "inspect")["result"]
    assert facts["os"] == "windows" and facts["product_name"] == "Microsoft Windows XP"
    assert facts["current_control_set"] == "ControlSet001"
    assert receipt(tmp_path, "xp-ntfs", "registry-merge")["result"]
    assert receipt(tmp_path, "xp-ntfs", "define")["result"]["action"] in ("created", "updated", "unchanged")
    assert (tmp_path / "images" / "xp-ntfs.raw").is_file()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


def test_record_announced_twice_later_copy_wins(vols: dict[str, Path], tmp_path: Path) -> None:
    """§11.6.1 step 4: of two extents with the same start, the later one in the stream is kept."""
    src = NtfsSource(vols["rich"])
    try:
        big = next(n for n in range(16, src.nrec) if src.file_name(src.fixup(src.record(n))) == "big.bin")
    finally:
        src.close()
    gho = tmp_path / "TWICE.GHO"
    write_ntfs_image(gho, [Part("ntfs", vols["rich"], NtfsOptions(repeat={big: 0x5A}))], "high")
    res = extract(gho, tmp_path / "d.raw")
    assert any(f"MFT record {big} announced again" in w for w in res.warnings)
    assert any("overlap earlier ones; the later copy was kept" in w for w in res.warnings)
    part = carve(tmp_path / "d.raw", 63 * 512, vols["rich"].stat().st_size, tmp_path / "p.img")
    with mounted(part, tmp_path / "m", ro=True) as m:
        assert (m / "big.bin").read_bytes() == b"\x5a" * 300_000


@pytest.mark.parametrize("hidden", [2048, 0])
def test_partition_start_and_hidden_sectors(hidden: int, tmp_path: Path) -> None:
    """§11.7.1: the volume sits at its hidden-sectors LBA; a value of 0 is placed at 63 and patched."""
    vol = make_volume(tmp_path / "h.img", 16, hidden=hidden, fill=_fill_small)
    manifest = _manifest(vol, tmp_path / "src")
    gho = tmp_path / "H.GHO"
    omitted = write_ntfs_image(gho, [Part("ntfs", vol)], "high")[0]
    res = extract(gho, tmp_path / "d.raw")
    start = hidden or 63
    assert res.partitions[0].start_lba == start
    assert [(t, s) for t, s, _n in mbr_partitions(tmp_path / "d.raw")] == [(0x07, start)]
    part = carve(tmp_path / "d.raw", start * 512, vol.stat().st_size, tmp_path / "p.img").read_bytes()
    size = len(part)
    for sector in (part[:512], part[size - 512:]):  # boot sector and its backup
        assert struct.unpack_from("<I", sector, 0x1C)[0] == start
    if hidden:
        _check_volume(tmp_path / "d.raw", start, vol, manifest, omitted, tmp_path)
    else:
        assert any("hidden sectors 0 set to the partition start 63" in w for w in res.warnings)
        r = subprocess.run(["ntfsfix", "-n", str(tmp_path / "p.img")], capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
        assert _manifest(tmp_path / "p.img", tmp_path / "m") == manifest


def test_ntfs_then_sector_section(vols: dict[str, Path], manifests: dict, tmp_path: Path) -> None:
    """§11.8: the NTFS chain ends right before the next partition header (here a sector section)."""
    from tests.support.gho_ntfs_writer import write_ntfs_section
    from tests.support.gho_writer import ImageWriter, blocks_of

    fat = tmp_path / "fat16.img"
    subprocess.run(["mkfs.fat", "-C", "-F", "16", "-n", "SECTORS", "-h", "82046", str(fat), str(16 * 1024)],
                   check=True, capture_output=True)
    gho = tmp_path / "MIXED.GHO"
    w = ImageWriter(gho, "high", image_type=0, image_id=0x5EC70009, descriptor=0x2000)
    omitted = write_ntfs_section(w, vols["rich"])
    w.sector_partition(blocks_of(fat.read_bytes()))
    w.close()
    info = read_info(gho)
    assert [(p.kind, p.fs) for p in info.partitions] == [("ntfs", "NTFS"), ("sector", "FAT16")]
    res = extract(gho, tmp_path / "d.raw")
    assert res.partitions[1].start_lba == 82046 and res.partitions[1].logical
    assert carve(tmp_path / "d.raw", 82046 * 512, fat.stat().st_size, tmp_path / "f.img").read_bytes() == \
        fat.read_bytes()
    _check_volume(tmp_path / "d.raw", 63, vols["rich"], manifests["rich"], omitted, tmp_path)


def test_info_without_password(vols: dict[str, Path], tmp_path: Path) -> None:
    gho = tmp_path / "PW.GHO"
    write_ntfs_image(gho, [Part("ntfs", vols["rich"], NtfsOptions(cipher="a"))], "high", password=PW)
    (p,) = read_info(gho).partitions
    assert (p.kind, p.fs, p.files) == ("ntfs", "NTFS", None)
    assert any("encrypted" in n for n in p.notes)
    with pytest.raises(GhoError, match="PW.GHO: image is password-protected"):
        extract(gho, tmp_path / "d.raw")
    assert read_info(gho, password=PW).partitions[0].files
