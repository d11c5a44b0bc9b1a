"""The three real Ghost-made fixtures against the expected values of docs/gho-format.md §14."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest

from pipeline.core.errors import InputError
from pipeline.gho import GhoError, extract, read_info
from pipeline.gho.bootchain import MBR_BIN
from pipeline.gho.codecs import BlockDecoder
from pipeline.gho.crypto import crc32_msb, decrypt, seed_from_password
from pipeline.gho.fat import FatSection
from pipeline.gho.image import Image
from tests.support.gho_checks import FIXTURES, carve, fsck, mbr_partitions, mcopy

NONE, HIGH, HIGH_PW = FIXTURES / "75_none.gho", FIXTURES / "11_high.gho", FIXTURES / "11_high_pw.gho"
ALL = [NONE, HIGH, HIGH_PW]
PW = {NONE: None, HIGH: None, HIGH_PW: "password"}

FILES = [  # part, path, attr, size, first cluster, data records, 0x03 value, CRC32-MSB?, sha256
    (1, "/IO.SYS", 0x07, 222670, 4, 7, "CB5AA363", False,
     "8aded96db4524a8eb52da8f10221b009fa8fdf6c789d4b995c03fd7995e0128c"),
    (1, "/MSDOS.SYS", 0x07, 6, 113, 1, "2D5BE067", False,
     "d28c3a421236bb61081f706193f51f32b9f8b957598d94b6b3b143ae52b1ea03"),
    (1, "/COMMAND.COM", 0x01, 93890, 114, 3, "176508A7", False,
     "c3b5899620d6c58b90727b640bb7bb6a723f6013629c9459c241e9dc9e7ff20b"),
    (1, "/EDIT.COM", 0x20, 69902, 160, 3, "B69CC39C", False,
     "84c19a0f2a85743af930ed61e3b741f1ad9b28a7cc229234535f2d03098d9f31"),
    (1, "/TEST.TXT", 0x20, 16, 195, 1, "4D176E6E", True,
     "c93dcd4c6cd1c087c6f18ceb3680d63e38783283e94e245f3a8492cf7ccc24cf"),
    (2, "/TEST.TXT", 0x20, 39, 2, 1, "602AF5DD", True,
     "84fd9eeca3622f88e98097d5248791fcdecc682165fb4d721bdfbc9e42bad97f"),
    (3, "/TEST.TXT", 0x20, 65, 4, 1, "7F469276", True,
     "75efacd61a1fe715cf6bf18d9f375dc847d2ce03ae826d09e5827ca9c58e8483"),
]
GEOMETRY = [  # fs, label, hidden, total, bps, spc, rsvd, fats, fatsz, root entries, root cluster, clusters
    ("FAT32", "BOOT", 63, 6233157, 512, 4, 32, 2, 12128, 0, 2, 1552217),
    ("FAT16", "FAT16", 63, 2056257, 512, 32, 2, 2, 251, 512, 0, 64241),
    ("FAT32", "FAT32EX", 8289603, 8482257, 512, 8, 38, 2, 8269, 0, 2, 1058210),
]
HEADERS = {  # compression, id, password, generation, descriptor, partition headers, trailer, byte 0x34
    NONE: ("none", 0x6A15F5A9, False, "7.5", 0x800, [0xA00, 0x638CC, 0x63FF5], 0x68742, 0x0A),
    HIGH: ("high", 0x6A15F63C, False, "11.x", 0x2000, [0x2200, 0x45891, 0x45FC0], 0x4A713, 0x03),
    HIGH_PW: ("high", 0x6A1BF475, True, "11.x", 0x2000, [0x2200, 0x45891, 0x45FC0], 0x4A713, 0x03),
}
CATALOGUE = {  # entry-record offsets listed by the trailer catalogues (§14.2, §14.3)
    NONE: [0xE4C, 0x374C0, 0x37530, 0x4E470, 0x5F5FC, 0x63D18, 0x64441],
    HIGH: [0x264C, 0x2B311, 0x2B389, 0x35E4D, 0x415BB, 0x45CDD, 0x4640C],
}


def test_fixture_checksums_match_readme() -> None:
    text = (FIXTURES / "README.md").read_text()
    for f in ALL:
        assert hashlib.sha256(f.read_bytes()).hexdigest() in text


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_header_fields(path: Path) -> None:
    comp, image_id, pw, gen, desc, parts, trailer, b34 = HEADERS[path]
    info = read_info(path, password=PW[path])
    assert (info.compression, info.image_id, info.password, info.generation) == (comp, image_id, pw, gen)
    assert info.image_type == "file-aware" and info.spans == [] and info.track0_bytes == 0
    assert info.descriptor_size == desc and info.first_structure == 0x200 + desc
    assert [p.offset for p in info.partitions] == parts
    assert info.trailer_offset == trailer
    assert info.stream_size == path.stat().st_size
    with Image(path) as img:
        assert img.header.byte34 == b34
        assert img.header.raw[8:10] == b"\x01\x01"


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_partitions_geometry_and_records(path: Path) -> None:
    info = read_info(path, password=PW[path])
    assert info.warnings == []
    assert [p.kind for p in info.partitions] == ["fat"] * 3
    assert [p.records for p in info.partitions] == [30, 7, 8]
    kinds: dict[str, int] = {}
    for p in info.partitions:
        for k, c in (p.record_kinds or {}).items():
            kinds[k] = kinds.get(k, 0) + c
    assert kinds == {"0x02": 17, "0x03": 7, "0x04": 13, "0x17": 6, "0x18": 2}
    for p, (fs, label, hidden, tot, bps, spc, rsvd, nf, fsz, rent, rclus, clus) in zip(
            info.partitions, GEOMETRY, strict=True):
        g = p.geometry
        assert g is not None
        assert (p.fs, p.label, p.hidden_sectors, p.size) == (fs, label, hidden, tot * bps)
        assert (g["total_sectors"], g["bytes_per_sector"], g["sectors_per_cluster"]) == (tot, bps, spc)
        assert (g["reserved_sectors"], g["num_fats"], g["fat_sectors"]) == (rsvd, nf, fsz)
        assert (g["root_entries"], g["root_cluster"], g["clusters"]) == (rent, rclus, clus)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_file_list(path: Path) -> None:
    info = read_info(path, password=PW[path], list_files=True)
    assert info.files is not None
    got = [(f["partition"], f["path"], f["attributes"], f["size"], f["original_cluster"]) for f in info.files]
    assert got == [(p, n, a, s, c) for p, n, a, s, c, *_ in FILES]
    assert sum(f["size"] for f in info.files) == 386588
    io = info.files[0]
    assert (io["date"], io["time"], io["mtime"]) == (0x457D, 0x144F, "2014-11-29T02:34:30")
    assert all(f["date"] == 0x5CBA for f in info.files if f["path"] in ("/MSDOS.SYS", "/TEST.TXT"))
    assert [(f["date"], f["time"]) for f in info.files[2:4]] == [(0x2697, 0xB2C0)] * 2
    if path in CATALOGUE:
        assert [f["entry_offset"] for f in info.files] == CATALOGUE[path]


def test_info_without_password_lists_sections_only() -> None:
    info = read_info(HIGH_PW)
    assert info.password and [p.kind for p in info.partitions] == ["fat"] * 3
    assert all(p.files is None and "encrypted" in p.notes[0] for p in info.partitions)


def test_password_seed_and_header_fields() -> None:
    assert seed_from_password("password") == 0x9BE1 == seed_from_password("PassWord")
    head = HIGH_PW.read_bytes()[:512]
    assert head[0x0C:0x25].hex() == "a3d55d38004e2ea0b48f9c7aea66b8b18eefd5398ebf066842"
    assert decrypt(head[0x0C:0x1B], 0x9BE1) == b"BinaryResearch\0"
    assert decrypt(head[0x1B:0x25], 0x9BE1) == b"PASSWORD\0\0"


def test_every_encrypted_body_decrypts_to_the_plain_twin() -> None:
    with Image(HIGH) as plain, Image(HIGH_PW) as enc:
        enc.unlock("password")
        count = 0
        for a, b in zip(plain.layout.sections, enc.layout.sections, strict=True):
            fa = FatSection(plain.walker, a, BlockDecoder(3), None)
            fb = FatSection(enc.walker, b, BlockDecoder(3), enc.seed)
            ra = list(plain.walker.iter_records(a.body_start, a.end))
            rb = list(enc.walker.iter_records(b.body_start, b.end))
            assert [(r.offset, r.kind, r.length) for r in ra] == [(r.offset, r.kind, r.length) for r in rb]
            for x, y in zip(ra, rb, strict=True):
                assert fa.body(x) == fb.body(y)
                count += 1
        assert count == 45


def test_directory_entry_crc_example() -> None:
    with Image(NONE) as img:
        rec = img.walker.record_at(0xE4C)
        assert rec is not None and rec.kind == 0x04
        body = img.stream.read(rec.body_offset, rec.length)
        assert body[32:36] == (0x89A561A0).to_bytes(4, "little") and crc32_msb(body[:32]) == 0x89A561A0


@pytest.mark.parametrize("password", [None, "", "wrong", "passwor"])
def test_wrong_or_missing_password_refused_before_output(tmp_path: Path, password: str | None) -> None:
    out = tmp_path / "disk.raw"
    with pytest.raises(GhoError) as ei:
        extract(HIGH_PW, out, password=password)
    msg = str(ei.value)
    assert "11_high_pw.gho" in msg and ("wrong password" in msg or "password is required" in msg)
    assert "\n" not in msg and isinstance(ei.value, InputError)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> dict[Path, tuple[Path, object]]:
    d = tmp_path_factory.mktemp("gho-fixture-disks")
    out = {}
    for f in ALL:
        raw = d / (f.stem + ".raw")
        out[f] = (raw, extract(f, raw, password=PW[f]))
    return out


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_extract_rebuilds_partitioned_sparse_disk(path: Path, disks: dict) -> None:
    raw, result = disks[path]
    assert result.disk_size == 16771860 * 512 == raw.stat().st_size
    assert raw.stat().st_blocks * 512 < 4 << 20  # sparse: a few hundred KiB really allocated
    assert mbr_partitions(raw) == [(0x0C, 63, 6233157), (0x0E, 6233283, 2056257), (0x0C, 8289603, 8482257)]
    assert [(p.fs, p.label, p.files) for p in result.partitions] == [
        ("FAT32", "BOOT", 5), ("FAT16", "FAT16", 1), ("FAT32", "FAT32EX", 1)]
    assert not list(raw.parent.glob(".*tmp*"))


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_rebuilt_volumes_pass_fsck_and_files_read_back(path: Path, disks: dict, tmp_path: Path) -> None:
    raw, result = disks[path]
    for part in result.partitions:
        vol = carve(raw, part.start_lba * 512, part.sectors * 512, tmp_path / f"p{part.index}.img")
        r = fsck(vol)
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"{part.files + 1} files" in r.stdout  # files + the volume label
    files = {(f["partition"], f["path"]): f for f in result.files}
    for p, name, _attr, size, clus, nrec, csum, is_crc, sha in FILES:
        start = result.partitions[p - 1].start_lba * 512
        data = mcopy(raw, start, name)
        assert len(data) == size and hashlib.sha256(data).hexdigest() == sha
        f = files[(p, name)]
        assert (f["first_cluster"], f["data_records"], f["checksum"]) == (clus, nrec, csum)
        assert f["checksum_verified"] is (True if is_crc else None)


def test_password_twin_extracts_to_the_same_disk(disks: dict) -> None:
    a, b = disks[HIGH][0], disks[HIGH_PW][0]
    with open(a, "rb") as fa, open(b, "rb") as fb:
        ma, mb = fa.read(512), fb.read(512)
        assert ma[:440] + ma[444:] == mb[:440] + mb[444:]  # only the disk signature (image id) differs
        for part in disks[HIGH][1].partitions:
            for off in (0, 512, 16 * 1024):
                fa.seek(part.start_lba * 512 + off)
                fb.seek(part.start_lba * 512 + off)
                assert fa.read(1 << 20) == fb.read(1 << 20)
    for pa, pb in zip(disks[HIGH][1].files, disks[HIGH_PW][1].files, strict=True):
        assert pa == pb


def test_75_and_11_give_identical_file_contents(disks: dict) -> None:
    for p, name, *_ in FILES:
        s = disks[NONE][1].partitions[p - 1].start_lba * 512
        assert mcopy(disks[NONE][0], s, name) == mcopy(disks[HIGH][0], s, name)


def test_extract_refuses_a_span_file_without_its_first(tmp_path: Path) -> None:
    ghs = tmp_path / "ABCDE001.GHS"
    data = bytearray(NONE.read_bytes()[:4096])
    data[2] = 0x09
    ghs.write_bytes(bytes(data))
    with pytest.raises(GhoError, match=r"ABCDE001.GHS: is a span continuation file"):
        read_info(ghs)


def test_copy_elsewhere_works(tmp_path: Path) -> None:
    dst = tmp_path / "copy.gho"
    shutil.copy(NONE, dst)
    assert read_info(dst).partitions[0].label == "BOOT"


def test_fixture_split_into_spans_extracts_the_same(tmp_path: Path, disks: dict) -> None:
    from tests.support import gho_writer as gw

    img = tmp_path / "11comp.GHO"
    shutil.copy(HIGH, img)
    parts = gw.split_spans(img, 30000)
    assert [p.name for p in parts[:3]] == ["11comp.GHO", "11com001.GHS", "11com002.GHS"]
    info = read_info(img)
    assert info.spans == [p.name for p in parts[1:]] and info.trailer_offset == 0x4A713
    res = extract(img, tmp_path / "d.raw")
    assert res.files == disks[HIGH][1].files


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_trailer_catalogues_agree_with_the_records(path: Path) -> None:
    from pipeline.gho.catalogue import parse_catalogue

    info = read_info(path)  # the trailer is not encrypted: no password needed
    assert [p.catalogue_files for p in info.partitions] == [5, 1, 1] and info.warnings == []
    with Image(path) as img:
        cats = img.layout.catalogues
        assert len(cats) == 3
        entries = [e for c in cats for e in parse_catalogue(img.stream.read(c.body_offset, c.length))]
    assert [e.name for e in entries] == ["IO.SYS", "MSDOS.SYS", "COMMAND.COM", "EDIT.COM"] + ["TEST.TXT"] * 3
    assert [e.size for e in entries] == [f[3] for f in FILES]
    assert (entries[0].date, entries[0].time, entries[0].attributes) == (0x457D, 0x144F, 0x07)
    if path in CATALOGUE:
        assert [e.offset for e in entries] == CATALOGUE[path]


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_rebuilt_disk_has_a_bootable_chain(path: Path, disks: dict) -> None:
    """Issue 10: standard MBR code, exactly one active partition, hidden sectors = starts, CHS sane."""
    raw, result = disks[path]
    with open(raw, "rb") as f:
        mbr = f.read(512)
        boots = []
        for part in result.partitions:
            f.seek(part.start_lba * 512)
            boots.append(f.read(512))
    assert any(mbr[:440]) and mbr[:440] == MBR_BIN.read_bytes()[:440]
    assert [mbr[446 + 16 * k] for k in range(4)] == [0x80, 0, 0, 0]  # partition 1 (IO.SYS) only
    assert [int.from_bytes(b[28:32], "little") for b in boots] == [p.start_lba for p in result.partitions]
    assert mbr[447:450] == b"\x01\x01\x00"  # CHS of LBA 63 in 255/63 geometry: c0 h1 s1
    assert result.boot_chain == {"mbr_code": "syslinux mbr.bin", "active_partition": 1,
                                 "hidden_sectors_fixed": [{"partition": 2, "was": 63, "now": 6233283}]}
    dump = subprocess.run(["sfdisk", "-d", str(raw)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    assert "start=          63, size=     6233157, type=c, bootable" in dump.stdout
    assert dump.stdout.count("bootable") == 1
    check = subprocess.run(["sfdisk", "--verify", str(raw)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "No errors detected" in check.stdout, check.stdout + check.stderr


def _with_boot_field(src: Path, dest: Path, hidden: int, offset: int, value: int) -> Path:
    """Copy of ``src`` whose boot-sector copies (all records) with ``hidden`` get ``value`` at ``offset``."""
    data = bytearray(src.read_bytes())
    pos, n = 0, 0
    while (pos := data.find(b"MSWIN4", pos + 1)) > 0:
        o = pos - 3
        if int.from_bytes(data[o + 28:o + 32], "little") == hidden and data[o + 510:o + 512] == b"\x55\xaa":
            data[o + offset:o + offset + 4] = value.to_bytes(4, "little")
            n += 1
    assert n >= 2  # opening + closing boot records (and the reserved area's copies)
    dest.write_bytes(bytes(data))
    return dest


@pytest.mark.parametrize(("hidden", "offset", "value", "part", "field"), [
    (8289603, 28, 0xFFFFFF00, 3, "end LBA 4303449296"),  # logical partition, absolute hidden sectors
    (63, 28, 0xFFFFFFF0, 1, "end LBA 4301200436"),  # the primary; every later one would be past it too
    (8289603, 28, 0xFFFFFFFF, 3, "end LBA"),
], ids=["logical-hidden", "primary-hidden", "max-hidden"])
def test_partition_past_the_mbr_limit_refused(tmp_path: Path, hidden: int, offset: int, value: int, part: int,
                                              field: str) -> None:
    """Issue 11: a boot sector placing a partition at/past 2^32 sectors is one clear line, no output."""
    src = _with_boot_field(NONE, tmp_path / "big.gho", hidden, offset, value)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(GhoError) as ei:
        extract(src, out_dir / "disk.raw")
    msg = str(ei.value)
    assert msg.startswith("big.gho: partition ") and f"partition {part} " in msg and field in msg, msg
    assert f"hidden sectors {value}" in msg and "below 2^32 = 4294967296 sectors" in msg and "\n" not in msg
    assert isinstance(ei.value, InputError)
    assert list(out_dir.iterdir()) == []
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
