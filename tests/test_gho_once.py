"""A ``.gho`` is decoded once and written once: convert adopts ghost-convert's disk (issue 14, goal 2).

Fast tier: :func:`pipeline.steps.adopt.adopt_disk` on a small raw or qcow2 disk + a qcow2 overlay written
by qemu-io (qemu-img only), a failure inside it, the completeness rule on receipts, why convert copies a
disk of another format; the native reader writing the final disk's format (the real Ghost fixtures
rebuilt as raw and as qcow2 through qemu-nbd are the same disk; the ghost-convert step's ``ghost.qcow2``)
and refusing a write outside the disk. Slow tier: the phony XP disk with 24 MiB of data as an NTFS
file-aware ``.gho`` (two spans) through the real CLI: the first run (one copy of the disk: the final disk
is ghost-convert's file), a no-op re-run, the final disk deleted (``plan``: decode again), a changed
``.reg`` killed between the commit and the final rename (the old final disk untouched and no longer
trusted; the committed disk has the new value and none of the old); and one run with ``format: qcow2``
(ghost-convert's qcow2, written through qemu-nbd, is the final disk).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import resource
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.core import receipts
from pipeline.core.config import load_config
from pipeline.gho.extract import extract
from pipeline.steps import adopt
from pipeline.tools import qemu_img
from tests.support.fx_pipeline import log_events, make_config, receipt, run_cli
from tests.support.gho_checks import FIXTURES, extract_raw_and_qcow2

MIB = 1 << 20
DATA_MIB = 24


def _qemu_io(img: Path, fmt: str, cmd: str) -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", cmd, str(img)], check=True, capture_output=True)


def _image(tmp: Path, **extra: Any) -> Any:
    src = tmp / "src" / "DISK.GHO"
    src.parent.mkdir(parents=True, exist_ok=True)
    src.write_bytes(b"\xfe\xef\x01\x00 never opened by these tests\n")
    cfg = make_config(tmp, [{"id": "d", "source": src, "ghost": {"backend": "native"}, **extra}])
    return load_config(cfg).image("d")


def _ghost_receipt(disk: Path, run_id: str = "ghost-run-1", fmt: str = "raw") -> dict[str, Any]:
    return {"run_id": run_id, "fingerprint": {"k": 1}, "result": {"backend": "native", "disk_format": fmt},
            "outputs": {"disk": receipts.output_stamp(disk)}}


def _disk_and_overlay(tmp: Path, fmt: str) -> tuple[Any, Path, Path]:
    """ghost-convert's disk ``ghost.<fmt>`` (16 MiB: 0x11 at 0, 0x22 at 8 MiB) and registry-merge's
    overlay on it (0x33 over the head of the 0x22 MiB), for an image whose output format is ``fmt``."""
    image = _image(tmp, format=fmt)
    image.image_dir.mkdir(parents=True)
    disk = image.image_dir / f"ghost.{fmt}"
    qemu_img.create(disk, fmt, 16 * MIB, image_id="d", step="test")
    _qemu_io(disk, fmt, "write -P 0x11 0 1M")
    _qemu_io(disk, fmt, "write -P 0x22 8M 1M")
    overlay = image.image_dir / "overlay.qcow2"
    qemu_img.create_overlay(overlay, disk, fmt, image_id="d", step="test")
    _qemu_io(overlay, "qcow2", "write -P 0x33 8M 64k")
    return image, disk, overlay


@pytest.fixture
def disk_and_overlay(tmp_path: Path) -> tuple[Any, Path, Path]:
    return _disk_and_overlay(tmp_path, "raw")


def _read(path: Path, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_adopt_commits_the_overlay_into_ghost_disk(disk_and_overlay: tuple[Any, Path, Path]) -> None:
    image, disk, overlay = disk_and_overlay
    ino = disk.stat().st_ino
    ov_before = (hashlib.sha256(overlay.read_bytes()).hexdigest(), overlay.stat().st_mtime_ns)
    res = adopt.adopt_disk(image, _ghost_receipt(disk), overlay)
    final = image.final_disk
    assert res["output"] == str(final) and res["verified"] is True
    assert res["adopted"]["ghost_run_id"] == "ghost-run-1"
    # the same file, renamed: no second copy of the disk was written
    assert final.stat().st_ino == ino and not disk.exists()
    assert _read(final, 0, 4) == b"\x11" * 4
    assert _read(final, 8 * MIB, 4) == b"\x33" * 4  # the overlay's edit
    assert _read(final, 8 * MIB + 64 * 1024, 4) == b"\x22" * 4  # the disk around it
    assert final.stat().st_size == 16 * MIB
    # the overlay (registry-merge's artifact) is left exactly as it was
    assert (hashlib.sha256(overlay.read_bytes()).hexdigest(), overlay.stat().st_mtime_ns) == ov_before
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_failure_inside_adoption_leaves_no_final_disk(disk_and_overlay: tuple[Any, Path, Path]) -> None:
    image, disk, overlay = disk_and_overlay

    def boom() -> None:
        raise RuntimeError("killed between commit and rename")

    with pytest.raises(RuntimeError):
        adopt.adopt_disk(image, _ghost_receipt(disk), overlay, committed=boom)
    assert not image.final_disk.exists()
    assert list(image.final_disk.parent.iterdir()) == []  # no temp left either
    assert not disk.exists()  # consumed: the next run decodes again (see the rule)


def test_why_not_adopt(tmp_path: Path, disk_and_overlay: tuple[Any, Path, Path]) -> None:
    image, disk, _overlay = disk_and_overlay
    r = _ghost_receipt(disk)
    assert adopt.why_not(image, r) is None
    assert "qcow2" in (adopt.why_not(_image(tmp_path / "q", format="qcow2"), r) or "")
    exe = {**r, "result": {"backend": "exe", "disk_format": "vmdk"}}
    assert adopt.why_not(image, exe) is not None
    os.utime(disk, ns=(1, 1))  # touched since ghost-convert stamped it
    assert "not ghost-convert's output" in (adopt.why_not(image, r) or "")


def _as_raw(img: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / f"{img.name}.as.raw"
    subprocess.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(img), str(out)], check=True,
                   capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


def _info(img: Path) -> dict[str, Any]:
    r = subprocess.run(["qemu-img", "info", "--output=json", str(img)], capture_output=True, text=True,
                       check=True)
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _check_clean(img: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(img)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_adopt_commits_the_overlay_into_a_qcow2_ghost_disk(tmp_path: Path) -> None:
    image, disk, overlay = _disk_and_overlay(tmp_path / "q", "qcow2")
    ino = disk.stat().st_ino
    ov_before = (hashlib.sha256(overlay.read_bytes()).hexdigest(), overlay.stat().st_mtime_ns)
    res = adopt.adopt_disk(image, _ghost_receipt(disk, fmt="qcow2"), overlay)
    final = image.final_disk
    assert final.name == "d.qcow2" and res["output"] == str(final) and res["format"] == "qcow2"
    assert res["verified"] is True and res["adopted"]["from"] == str(disk)
    # the same file, renamed: no second copy of the disk was written
    assert final.stat().st_ino == ino == res["adopted"]["inode"] and not disk.exists()
    info = _info(final)
    assert info["format"] == "qcow2" and info["virtual-size"] == 16 * MIB
    assert "backing-filename" not in info  # the overlay's edits are in it, not on top of it
    _check_clean(final)
    data = _as_raw(final, "qcow2", tmp_path)
    assert data[:MIB] == b"\x11" * MIB
    assert data[8 * MIB:8 * MIB + 65536] == b"\x33" * 65536  # the overlay's edit
    assert data[8 * MIB + 65536:9 * MIB] == b"\x22" * (MIB - 65536)  # the disk around it
    assert data[MIB:8 * MIB] == bytes(7 * MIB)
    # the overlay (registry-merge's artifact) is left exactly as it was
    assert (hashlib.sha256(overlay.read_bytes()).hexdigest(), overlay.stat().st_mtime_ns) == ov_before
    assert [p.name for p in final.parent.iterdir()] == [final.name]


def test_why_not_adopt_a_disk_of_another_format(tmp_path: Path) -> None:
    image_q, disk_q, _ov = _disk_and_overlay(tmp_path / "q", "qcow2")
    image_r, disk_r, _ov = _disk_and_overlay(tmp_path / "r", "raw")
    rq, rr = _ghost_receipt(disk_q, fmt="qcow2"), _ghost_receipt(disk_r, fmt="raw")
    assert adopt.why_not(image_q, rq) is None and adopt.why_not(image_r, rr) is None
    # an older run's disk in the other format: convert copies it (qemu-img convert), says why
    assert adopt.why_not(image_r, rq) == "ghost-convert's disk is qcow2, the output format raw"
    assert adopt.why_not(image_q, rr) == "ghost-convert's disk is raw, the output format qcow2"
    vmdk = {**rq, "result": {"backend": "native", "disk_format": "vmdk"}}
    assert adopt.why_not(image_q, vmdk) is not None
    os.utime(disk_q, ns=(1, 1))  # touched since ghost-convert stamped it
    assert "not ghost-convert's output" in (adopt.why_not(image_q, rq) or "")


# -- the native reader writes the final disk's format (a qcow2 through qemu-nbd) ---------------------------
FIXTURE_PW = {"75_none.gho": None, "11_high.gho": None, "11_high_pw.gho": "password"}


@pytest.mark.parametrize("name", sorted(FIXTURE_PW))
def test_real_ghost_image_rebuilds_the_same_as_raw_and_qcow2(name: str, tmp_path: Path) -> None:
    raw, _qcow, a, b = extract_raw_and_qcow2(FIXTURES / name, tmp_path, FIXTURE_PW[name])
    assert a == b  # partitions, files, boot chain, warnings, bytes written
    assert [p["fs"] for p in a["partitions"]] == ["FAT32", "FAT16", "FAT32"]
    assert a["boot_chain"]["active_partition"] == 1
    assert a["bytes_written"] > 0 and raw.stat().st_blocks * 512 < raw.stat().st_size


def _ghost_input(tmp: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    from pipeline.core.config import GhostConfig
    from pipeline.steps.ghost_convert import GhostInput

    monkeypatch.setenv("ONCE_GHO_PW", "password")
    work = tmp / "work" / "fx"
    work.mkdir(parents=True, exist_ok=True)
    return GhostInput(image_id="fx", source=FIXTURES / "11_high_pw.gho", image_dir=work,
                      ghost=GhostConfig(password_env="ONCE_GHO_PW"), disk_format=fmt)


def test_ghost_convert_step_writes_the_final_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.steps.ghost_convert import ghost_convert

    inp = _ghost_input(tmp_path, "qcow2", monkeypatch)
    work = inp.image_dir
    (work / "ghost.raw").write_bytes(b"an earlier run's raw disk")
    seen: list[float] = []
    res = ghost_convert(inp, progress=seen.append)
    qcow = work / "ghost.qcow2"
    assert (res.disk, res.disk_format, res.backend) == (qcow, "qcow2", "native")
    assert res.outputs == {"disk": qcow} and res.to_dict()["disk_format"] == "qcow2"
    assert sorted(p.name for p in work.iterdir()) == ["ghost.qcow2"]  # the old raw disk, no temp
    assert seen and seen[-1] == 100.0
    assert _info(qcow)["format"] == "qcow2"
    _check_clean(qcow)
    ref = tmp_path / "ref.raw"  # the same image rebuilt as a raw file
    want = extract(FIXTURES / "11_high_pw.gho", ref, password="password")
    _same(ref, qcow, "qcow2")
    assert res.details["partitions"] == want.to_dict()["partitions"]
    # and back: a raw run removes the qcow2
    back = ghost_convert(_ghost_input(tmp_path, "raw", monkeypatch))
    assert (back.disk, back.disk_format) == (work / "ghost.raw", "raw")
    assert sorted(p.name for p in work.iterdir()) == ["ghost.raw"]
    _same(ref, work / "ghost.raw", "raw")


def _same(raw: Path, other: Path, fmt: str) -> None:
    """``qemu-img compare`` (reads only what is allocated: these disks are 8 GiB, almost all holes)."""
    assert _info(other)["virtual-size"] == raw.stat().st_size
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(raw), str(other)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_write_outside_the_disk_is_refused(tmp_path: Path) -> None:
    from pipeline.gho.sparse import Bounded, FileDisk, OutsideDisk

    f = tmp_path / "d.raw"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        disk = Bounded(FileDisk(fd, MIB))
        disk.pwrite(b"\x01" * 512, MIB - 512)  # the last sector: inside
        for off, n in [(MIB - 511, 512), (MIB, 1), (-512, 512), (5 * MIB, 4096)]:
            with pytest.raises(OutsideDisk, match=f"a write of {n} bytes at offset {off} falls outside the "
                                                  f"{MIB}-byte disk"):
                disk.pwrite(b"\x02" * n, off)
    finally:
        os.close(fd)
    assert f.stat().st_size == MIB and f.read_bytes() == bytes(MIB - 512) + b"\x01" * 512


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_section_writing_past_the_disk_is_one_line(fmt: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume that claims more than the disk has (a bad image, or a reader bug) is a one-line refusal
    and leaves no output, no temp and no qemu-nbd behind."""
    from pipeline.gho.errors import GhoError
    from pipeline.gho.fat import FatSection
    from pipeline.tools import nbd

    def past_the_end(self: Any, out: Any, base: int, progress: Any = None) -> None:
        out.write_at(out.disk.size - 1024, b"\x01" * 4096)

    monkeypatch.setattr(FatSection, "write", past_the_end)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # qemu-nbd's socket folder, to see it go
    out = tmp_path / "out" / f"disk.{fmt}"
    out.parent.mkdir()
    opener = (lambda p, n: nbd.create_qcow2(p, n, image_id="fx", step="test")) if fmt == "qcow2" else None
    with pytest.raises(GhoError) as ei:
        extract(FIXTURES / "11_high.gho", out, **({"open_disk": opener} if opener else {}))
    msg = str(ei.value)
    # the file, the partition being written (the first FAT one of 11_high: partition 1 at LBA 63), the write
    assert "\n" not in msg and msg.startswith("11_high.gho: partition 1 (LBA 63, "), msg
    size = int(msg.split("falls outside the ")[1].split("-byte")[0])
    assert f"a write of 4096 bytes at offset {size - 1024} falls outside the {size}-byte disk" in msg, msg
    assert list(out.parent.iterdir()) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("gho2kvm-nbd-")]


def _current(fp: dict[str, Any], outputs: dict[str, Any] | None = None, **result: Any) -> dict[str, Any]:
    return {"run_id": "x", "fingerprint": fp, "outputs": outputs or {}, "result": result}


def test_ghost_stale_reason_rule(disk_and_overlay: tuple[Any, Path, Path]) -> None:
    image, disk, _overlay = disk_and_overlay
    gr = _ghost_receipt(disk)
    fp = gr["fingerprint"]
    calls: list[int] = []

    def chain(convert: dict[str, Any], merge_fp: dict[str, Any] | None = None) -> Any:
        def downstream() -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
            calls.append(1)
            return [("inspect", _current({"i": 1}), {"i": 1}),
                    ("registry-merge", _current({"m": 1}), merge_fp or {"m": 1}),
                    ("convert", convert, {"c": 1})]
        return downstream

    adopted = _current({"c": 1}, adopted={"ghost_run_id": gr["run_id"]})
    # while ghost.raw exists: the plain receipt rule, downstream not even asked
    assert adopt.ghost_stale_reason(gr, fp, chain(adopted)) is None and not calls
    assert adopt.ghost_stale_reason(gr, {"k": 2}, chain(adopted)) is not None
    disk.unlink()
    assert adopt.ghost_stale_reason(gr, fp, chain(adopted)) is None
    assert "not adopted" in (adopt.ghost_stale_reason(gr, fp, chain(_current({"c": 1}))) or "")
    other = _current({"c": 1}, adopted={"ghost_run_id": "an older run"})
    assert "not adopted" in (adopt.ghost_stale_reason(gr, fp, chain(other)) or "")
    why = adopt.ghost_stale_reason(gr, fp, chain(adopted, merge_fp={"m": 2})) or ""
    assert "registry-merge must run again" in why and "decode again" in why
    gone = _current({"c": 1}, {"disk": {"path": str(image.final_disk), "size": 1}},
                    adopted={"ghost_run_id": gr["run_id"]})
    assert "convert must run again (output missing" in (adopt.ghost_stale_reason(gr, fp, chain(gone)) or "")
    assert adopt.ghost_stale_reason(gr, {"k": 2}, chain(adopted)) is not None  # own inputs first
    # the disk as downstream fingerprints stamp it: the same before and after adoption
    assert adopt.disk_stamp(disk, gr) == {k: gr["outputs"]["disk"][k] for k in ("path", "size", "mtime_ns")}


# -- end to end -----------------------------------------------------------------------------------------
REG = "Windows Registry Editor Version 5.00\r\n\r\n[HKEY_LOCAL_MACHINE\\SOFTWARE\\Gho2kvmOnce]\r\n{}\r\n"
ALPHA = "once-marker-alpha"
BRAVO = "once-marker-bravo"


def _reg(path: Path, name: str, value: str) -> None:
    path.write_bytes(b"\xff\xfe" + REG.format(f'"{name}"="{value}"').encode("utf-16-le"))


def _has(disk: Path, text: str) -> bool:
    with open(disk, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return m.find(text.encode("utf-16-le")) >= 0


def _stamps(files: list[Path]) -> dict[str, tuple[str, int]]:
    return {str(f): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in files}


PR_SET_CHILD_SUBREAPER = 36


def _subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0, os.strerror(ctypes.get_errno())


def _reap_orphans(seconds: float = 60) -> dict[str, int]:
    """Reap the daemons of the CLI's tree that forked away (re-parented to this process, the subreaper):
    bytes each wrote (its kernel count, its own waited children included), by program name."""
    out: dict[str, int] = {}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            break  # none left
        if info is None:
            time.sleep(0.1)  # one still running (a watchdog seeing its owner gone)
            continue
        try:
            name = Path(f"/proc/{info.si_pid}/stat").read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except OSError:
            name = "?"
        _pid, _status, usage = os.wait4(info.si_pid, 0)
        out[name] = out.get(name, 0) + usage.ru_oublock * 512
    return out


def _written_by(argv: tuple[str, ...]) -> tuple[subprocess.CompletedProcess[str], int, dict[str, int]]:
    """Run the CLI; bytes its process tree wrote (the kernel's count of dirtied blocks), and apart from
    them the bytes of the daemons that forked away from it (``guestfish --listen``:
    re-parented, they are not the tree's children), by name: this process is the subreaper meanwhile."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock
    _subreaper(True)
    try:
        proc = run_cli(*argv, timeout=1500)
        daemons = _reap_orphans()
    finally:
        _subreaper(False)
    tree = (resource.getrusage(resource.RUSAGE_CHILDREN).ru_oublock - before) * 512 - sum(daemons.values())
    return proc, tree, daemons


def _run_ids(work: Path) -> dict[str, str]:
    return {p.stem: receipts.read(p)["run_id"] for p in sorted(work.glob("*.json"))  # type: ignore[index]
            if not p.name.endswith(".error.json")}


def _xp_ntfs_gho(xp_raw: Path, root: Path) -> tuple[Path, list[Path]]:
    """The phony XP disk's NTFS volume, with DATA_MIB of random data added, as an NTFS file-aware image
    ``root/src/WINXP.GHO`` in two spans; returns the image and its spans."""
    from tests.support.gho_checks import carve, mbr_partitions
    from tests.support.gho_ntfs_writer import Part, mounted, write_ntfs_image
    from tests.support.gho_writer import split_spans

    ((_ptype, start, count),) = mbr_partitions(xp_raw)
    vol = carve(xp_raw, start * 512, count * 512, root / "xp-ntfs.img")
    # data that dominates the disk, as on a real one (the phony XP holds ~2 MiB): the bytes written
    # are then mostly the disk's, once or twice
    with mounted(vol, root / "vol.mnt", plain=True) as m:
        (m / "data.bin").write_bytes(os.urandom(DATA_MIB * MIB))
    src = root / "src" / "WINXP.GHO"
    src.parent.mkdir()
    write_ntfs_image(src, [Part("ntfs", vol)], "high")
    vol.unlink()
    spans = split_spans(src, src.stat().st_size // 2 + 4096)
    assert len(spans) == 2
    return src, spans


@pytest.fixture(scope="module")
def once(xp_raw: Path) -> Iterator[dict[str, Any]]:
    """Four appliance launches in all (this machine's launches take minutes under load): the first run,
    a no-op, the final disk moved away and back (``plan`` only), a changed ``.reg`` killed inside convert."""
    root = Path(tempfile.mkdtemp(prefix="gho2kvm-gho-once-"))
    try:
        src, spans = _xp_ntfs_gho(xp_raw, root)
        before = _stamps(spans)
        reg = root / "once.reg"
        _reg(reg, "First", ALPHA)
        image = {"id": "xp", "source": src, "format": "raw", "registry": ["mergeide", str(reg)]}
        cfg = make_config(root, [image], defaults={"ghost": {"backend": "native"}})
        argv = ("migrate", "--config", str(cfg))
        plan = ("plan", "--config", str(cfg))
        work, images = root / "work" / "xp", root / "images"
        final = images / "xp.raw"
        out: dict[str, Any] = {"root": root, "work": work, "final": final}

        out["first"], out["first_written"], _daemons = _written_by(argv)
        out["first_ids"] = _run_ids(work)
        out["first_final"] = receipts.file_stamp(final)
        out["first_alloc"] = final.stat().st_blocks * 512 if final.exists() else 0
        out["first_alpha"] = final.exists() and _has(final, ALPHA)
        out["first_files"] = sorted(p.name for p in work.iterdir())

        out["noop"] = run_cli(*argv, timeout=600)
        out["noop_ids"] = _run_ids(work)
        out["noop_final"] = receipts.file_stamp(final)

        # the final disk deleted: everything from ghost-convert would run again (plan reads what
        # complete() reads); put back, nothing would
        aside = root / "aside.raw"
        os.rename(final, aside)
        out["plan_deleted"] = run_cli(*plan, timeout=300)
        os.rename(aside, final)
        out["plan_restored"] = run_cli(*plan, timeout=300)

        # the user changes the .reg (a different value, the old one dropped) and the run is killed
        # between the commit into the adopted disk and its rename into place
        _reg(reg, "Second", BRAVO)
        out["killed"] = run_cli(*argv, inject="convert-commit:kill", timeout=1500)
        out["killed_ids"] = _run_ids(work)
        out["killed_final"] = receipts.file_stamp(final)
        out["killed_files"] = sorted(p.name for p in work.iterdir())
        temps = [p for p in images.iterdir() if p.name.startswith(".xp.raw.tmp-")
                 and not p.name.endswith(".owner")]  # the temp's owner record is not a temp
        out["killed_temps"] = len(temps)
        out["killed_values"] = (_has(temps[0], ALPHA), _has(temps[0], BRAVO)) if temps else None
        out["plan_killed"] = run_cli(*plan, timeout=300)
        out["spans_unchanged"] = _stamps(spans) == before
        yield out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _assert_one_copy(label: str, written: int, alloc: int) -> None:
    """One copy of the disk: the whole migration (decode, the appliance, the commit) wrote far less
    than the two copies the copy path writes (ratio figures: bench/bench_gho_once.py)."""
    print(f"\nMEASURED {label}: written {written} allocated {alloc} ratio {written / alloc:.3f}")
    assert alloc > DATA_MIB * MIB
    assert written < 1.5 * alloc


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _plan(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    _ok(proc)
    rows = [line.split(None, 2) for line in proc.stdout.splitlines() if line.startswith("xp ")]
    return {r[1]: r[2] for r in rows}


@pytest.mark.guestfs
def test_final_disk_is_ghost_converts_disk(once: dict[str, Any]) -> None:
    _ok(once["first"])
    conv = receipt(once["root"], "xp", "convert")
    adopted = conv["result"]["adopted"]
    assert adopted["ghost_run_id"] == once["first_ids"]["ghost-convert"]
    assert adopted["from"] == str(once["work"] / "ghost.raw")
    assert os.stat(once["final"]).st_ino == adopted["inode"]
    assert "ghost.raw" not in once["first_files"]
    assert conv["result"]["verified"] is True and once["first_alpha"]
    _assert_one_copy("raw", once["first_written"], once["first_alloc"])


@pytest.mark.guestfs
def test_rerun_is_a_noop(once: dict[str, Any]) -> None:
    _ok(once["noop"])
    assert once["noop_ids"] == once["first_ids"]
    assert once["noop_final"] == once["first_final"]
    assert not [e for e in log_events(once["noop"]) if e.get("event") == "step started"]


@pytest.mark.guestfs
def test_deleted_final_disk_decodes_again(once: dict[str, Any]) -> None:
    deleted = _plan(once["plan_deleted"])
    assert deleted["ghost-convert"].startswith("RUN:") and "decode again" in deleted["ghost-convert"]
    assert "output missing" in deleted["ghost-convert"]
    assert all(v.startswith("skip") for v in _plan(once["plan_restored"]).values())


@pytest.mark.guestfs
def test_changed_reg_killed_inside_convert(once: dict[str, Any]) -> None:
    assert once["killed"].returncode != 0
    ids, first = once["killed_ids"], once["first_ids"]
    # the adopted disk holds the old edits: the changed .reg decoded the image again
    assert all(ids[s] != first[s] for s in ("ghost-convert", "inspect", "registry-merge"))
    assert ids["convert"] == first["convert"]  # no receipt for the killed convert
    assert "ghost.raw" not in once["killed_files"]
    # the final disk is the previous one, untouched, and nothing trusts it: every step from
    # ghost-convert (whose disk is now gone) runs again
    assert once["killed_final"] == once["first_final"]
    plan = _plan(once["plan_killed"])
    assert plan["ghost-convert"].startswith("RUN:")
    assert all(v.startswith("RUN") for v in plan.values())
    # what the killed run had committed, under the temp name only: the new value and none of the old
    assert once["killed_temps"] == 1
    assert once["killed_values"] == (False, True)


@pytest.mark.guestfs
def test_source_and_spans_never_written(once: dict[str, Any]) -> None:
    assert once["spans_unchanged"]


# -- qcow2 output: ghost-convert writes the qcow2 in place (qemu-nbd), convert adopts it -----------------
@pytest.fixture(scope="module")
def once_qcow2(xp_raw: Path) -> Iterator[dict[str, Any]]:
    """One migration (two appliance launches) of the same image with ``format: qcow2``."""
    root = Path(tempfile.mkdtemp(prefix="gho2kvm-gho-once-q-"))
    try:
        src, _spans = _xp_ntfs_gho(xp_raw, root)
        reg = root / "once.reg"
        _reg(reg, "First", ALPHA)
        image = {"id": "xp", "source": src, "format": "qcow2", "registry": ["mergeide", str(reg)]}
        cfg = make_config(root, [image], defaults={"ghost": {"backend": "native"}})
        work, final = root / "work" / "xp", root / "images" / "xp.qcow2"
        out: dict[str, Any] = {"root": root, "work": work, "final": final}
        out["proc"], out["written"], out["daemons"] = _written_by(("migrate", "--config", str(cfg)))
        out["ids"] = _run_ids(work)
        out["files"] = sorted(p.name for p in work.iterdir())
        if final.exists():
            out["alloc"] = final.stat().st_blocks * 512
            out["ino"] = final.stat().st_ino
            out["info"] = _info(final)
            out["check"] = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(final)],
                                          capture_output=True, text=True)
            flat = root / "final-as.raw"  # the guest's disk as bytes, to look for the .reg value
            subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(final), str(flat)],
                           check=True, capture_output=True)
            out["alpha"] = _has(flat, ALPHA)
            flat.unlink()
        yield out
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.guestfs
def test_qcow2_final_disk_is_ghost_converts_disk(once_qcow2: dict[str, Any]) -> None:
    q = once_qcow2
    _ok(q["proc"])
    gc = receipt(q["root"], "xp", "ghost-convert")["result"]
    assert (gc["backend"], gc["disk_format"]) == ("native", "qcow2")
    assert gc["disk"] == str(q["work"] / "ghost.qcow2")
    conv = receipt(q["root"], "xp", "convert")["result"]
    adopted = conv["adopted"]
    assert adopted["ghost_run_id"] == q["ids"]["ghost-convert"]
    assert adopted["from"] == str(q["work"] / "ghost.qcow2")
    assert q["ino"] == adopted["inode"]  # the final disk is the file ghost-convert wrote
    assert "ghost.qcow2" not in q["files"] and "ghost.raw" not in q["files"]
    assert conv["verified"] is True and conv["format"] == "qcow2"
    assert q["check"].returncode == 0, q["check"].stdout + q["check"].stderr
    assert q["info"]["format"] == "qcow2" and "backing-filename" not in q["info"]
    assert q["alpha"]  # registry-merge's edit, committed into it
    # one copy of the disk, written by qemu-nbd: a child of the CLI (run.start_server), so its writes are
    # in the tree's count; a qemu-nbd that forked away would not be, and the count would miss the disk
    assert "qemu-nbd" not in q["daemons"]
    print(f"\ndaemons that forked away (appliances, not counted): {dict(sorted(q['daemons'].items()))}")
    assert q["written"] > q["alloc"] * 0.95  # the disk's bytes are counted: the ratio means something
    _assert_one_copy("qcow2 (qemu-nbd included)", q["written"], q["alloc"])


# -- the exe backend: Ghost's one flat extent is the final raw disk (adopted, not copied) ----------------
# Fast tier: the stand-in (tests/support/fakes/ghost64_standin.py, Ghost's CLI) writes ghost.vmdk +
# ghost-s001.vmdk with ``vmdk_type: auto`` (the default); the rule on receipts; the whole chain's
# completeness on receipts. Slow tier (one migrate + a no-op): the same through the real CLI.
STANDIN = Path(__file__).parent / "support" / "fakes" / "ghost64_standin.py"


def _exe_config(tmp: Path, name: str = "config.yaml", ghost: dict[str, Any] | None = None,
                **extra: Any) -> Path:
    import sys

    src = tmp / "src" / "DISK.GHO"
    src.parent.mkdir(parents=True, exist_ok=True)
    if not src.exists():
        src.write_bytes(b"\xfe\xef\x01\x00 the stand-in does not read it\n")
    g = {"backend": "exe", "command": [sys.executable, str(STANDIN)], "path_style": "posix", **(ghost or {})}
    return make_config(tmp, [{"id": "d", "source": src, "ghost": g, **extra}], name=name)


def _run_ghost(cfg: Path, monkeypatch: pytest.MonkeyPatch, tmp: Path) -> tuple[Any, Any, dict[str, Any]]:
    """Ghost (the stand-in) run as ghost-convert runs it on a 16 MiB payload: (image, result, receipt)."""
    from pipeline.steps.ghost_convert import ghost_convert
    from pipeline.tasks import GhostConvert

    payload = tmp / "payload.raw"
    with open(payload, "wb") as f:
        f.truncate(16 * MIB)
    _qemu_io(payload, "raw", "write -P 0x11 0 1M")
    _qemu_io(payload, "raw", "write -P 0x22 8M 1M")
    monkeypatch.setenv("GHOST_STANDIN_PAYLOAD", str(payload))
    task = GhostConvert(config_path=str(cfg), image_id="d")
    res = ghost_convert(task.step_input())
    rec = {"run_id": "ghost-run-1", "fingerprint": task.fingerprint(), "result": res.to_dict(),
           "outputs": {k: receipts.output_stamp(p) for k, p in res.outputs.items()}}
    return task.image, res, rec


def test_exe_flat_extent_is_adopted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image, res, gr = _run_ghost(_exe_config(tmp_path), monkeypatch, tmp_path)
    desc, extent = image.image_dir / "ghost.vmdk", image.image_dir / "ghost-s001.vmdk"
    assert "-VMDKTYPE=flat" in res.details["argv"]  # auto, for a raw final disk
    assert res.disk == desc and gr["result"]["raw_extent"] == str(extent)
    assert adopt.why_not(image, gr) is None
    overlay = image.image_dir / "overlay.qcow2"  # registry-merge's overlay is over the descriptor
    qemu_img.create_overlay(overlay, desc, "vmdk", image_id="d", step="test")
    _qemu_io(overlay, "qcow2", "write -P 0x33 8M 64k")
    ino = extent.stat().st_ino
    stamp = {k: gr["outputs"]["ghost-s001.vmdk"][k] for k in ("path", "size", "mtime_ns")}
    out = adopt.adopt_disk(image, gr, overlay)
    final = image.final_disk
    assert out["verified"] is True and out["adopted"]["from"] == str(extent)
    assert final.stat().st_ino == ino and not extent.exists() and desc.exists()
    assert (_read(final, 0, 4), _read(final, 8 * MIB, 4), _read(final, 8 * MIB + 64 * 1024, 4)) == (
        b"\x11" * 4, b"\x33" * 4, b"\x22" * 4)
    assert final.stat().st_size == 16 * MIB
    # downstream stamps of the extent: as ghost-convert recorded it, gone or not; the descriptor: as is
    assert adopt.disk_stamp(extent, gr) == stamp
    assert adopt.disk_stamp(desc, gr) == receipts.file_stamp(desc)

    def chain(convert: dict[str, Any]) -> Any:
        return lambda: [("inspect", _current({"i": 1}), {"i": 1}),
                        ("registry-merge", _current({"m": 1}), {"m": 1}), ("convert", convert, {"c": 1})]

    fp, adopted = gr["fingerprint"], _current({"c": 1}, adopted={"ghost_run_id": "ghost-run-1"})
    assert adopt.ghost_stale_reason(gr, fp, chain(adopted)) is None
    killed = _current({"c": 1})  # killed between the rename and convert's receipt
    assert "not adopted" in (adopt.ghost_stale_reason(gr, fp, chain(killed)) or "")
    desc.unlink()  # the rest of ghost-convert's outputs still count
    assert adopt.ghost_stale_reason(gr, fp, chain(adopted)) == f"output missing: {desc}"


@pytest.mark.parametrize(("ghost", "fmt", "why"), [
    ({"vmdk_type": "sparse"}, "raw", "wrote no disk convert can adopt"),  # an explicit type is obeyed
    ({}, "qcow2", "wrote no disk convert can adopt"),  # auto: sparse for qcow2
    ({"vmdk_type": "flat"}, "qcow2", "ghost-convert's disk is raw, the output format qcow2"),
])
def test_exe_why_not_adopt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ghost: dict[str, Any],
                           fmt: str, why: str) -> None:
    image, _res, gr = _run_ghost(_exe_config(tmp_path, ghost=ghost, format=fmt), monkeypatch, tmp_path)
    assert why in (adopt.why_not(image, gr) or "")


def test_exe_raw_extent_must_be_the_receipts_output(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    image, _res, gr = _run_ghost(_exe_config(tmp_path), monkeypatch, tmp_path)
    other = {**gr, "result": {**gr["result"], "raw_extent": str(tmp_path / "ghost-s001.vmdk")}}
    assert "wrote no disk convert can adopt" in (adopt.why_not(image, other) or "")
    os.utime(image.image_dir / "ghost-s001.vmdk", ns=(1, 1))  # touched since ghost-convert stamped it
    assert "not ghost-convert's output" in (adopt.why_not(image, gr) or "")


def test_exe_adopted_chain_is_a_noop_and_the_rule_holds(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Receipts of a whole exe chain (ghost-convert's from a real stand-in run), the extent then
    adopted: every step complete (a no-op re-run); the final disk gone → decode again; a changed .reg
    → decode again; ``vmdk_type: flat`` written out = auto (nothing to do), ``sparse`` → ghost-convert
    runs again."""
    from dataclasses import replace

    from pipeline.model.inspect import VmdkExtent
    from pipeline.model.results import ConvertResult
    from pipeline.tasks import GhostConvert, chain
    from tests.support import fx_receipts

    cfg = _exe_config(tmp_path)
    image, res, _gr = _run_ghost(cfg, monkeypatch, tmp_path)
    extent = image.image_dir / "ghost-s001.vmdk"
    facts = replace(fx_receipts.XP_FACTS, format="vmdk", create_type="monolithicFlat", extents=(
        VmdkExtent("RW", 16 * MIB // 512, "FLAT", extent.name, str(extent.resolve())),))
    stand_in = fx_receipts.stand_in
    monkeypatch.setattr(fx_receipts, "stand_in",
                        lambda t, f: res if t.step == "ghost-convert" else stand_in(t, f))
    tasks = fx_receipts.write_chain(cfg, "d", facts=facts)
    ghost, conv = tasks[0], tasks[3]
    assert (ghost.step, conv.step) == ("ghost-convert", "convert")
    g = ghost.receipt()
    assert g is not None
    g["outputs"] = {k: receipts.output_stamp(p) for k, p in res.outputs.items()}  # as the task records them
    receipts.write(ghost.receipt_path, g)
    assert [t.step for t in tasks if t.stale_reason() is not None] == []
    # convert adopts Ghost's extent (no overlay here: the rename alone) and records it
    result = adopt.adopt_disk(image, g, None)
    c = conv.receipt()
    assert c is not None
    c["result"] = ConvertResult.from_dict(result).to_dict()
    c["outputs"] = {"disk": receipts.output_stamp(image.final_disk)}
    receipts.write(conv.receipt_path, c)
    assert not extent.exists()
    assert {t.step: t.stale_reason() for t in chain(str(cfg), "d")} == {t.step: None for t in tasks}
    aside = tmp_path / "aside.raw"
    os.rename(image.final_disk, aside)
    why = GhostConvert(config_path=str(cfg), image_id="d").stale_reason() or ""
    assert "convert must run again (output missing" in why and "decode again" in why
    os.rename(aside, image.final_disk)
    reg = tmp_path / "src" / "extra.reg"
    _reg(reg, "First", ALPHA)
    changed = _exe_config(tmp_path, "changed.yaml", registry=["mergeide", str(reg)])
    why = GhostConvert(config_path=str(changed), image_id="d").stale_reason() or ""
    assert "registry-merge must run again" in why and "decode again" in why
    same = _exe_config(tmp_path, "flat.yaml", ghost={"vmdk_type": "flat"})
    assert all(t.stale_reason() is None for t in chain(str(same), "d"))
    sparse = _exe_config(tmp_path, "sparse.yaml", ghost={"vmdk_type": "sparse"})
    assert "vmdk_type" in (GhostConvert(config_path=str(sparse), image_id="d").stale_reason() or "")


# -- the exe backend end to end: Ghost's stand-in through the real CLI (two appliance launches) ----------
GHOST_WRAPPER = """import os, subprocess, sys
# Ghost's stand-in, then: the inode of the extent it wrote (before the pipeline touches it)
rc = subprocess.run([sys.executable, {standin!r}, *sys.argv[1:]]).returncode
dst = sys.argv[1].split(",dst=")[1].split(",")[0]
extent = os.path.join(os.path.dirname(dst), "ghost-s001.vmdk")
if rc == 0 and os.path.exists(extent):
    with open({record!r}, "a") as f:
        f.write("%d\\n" % os.stat(extent).st_ino)
sys.exit(rc)
"""


def _splice(vol: Path, disk: Path, offset: int) -> None:
    """Write the data extents of ``vol`` into ``disk`` at ``offset`` (holes stay holes)."""
    fi, fo = os.open(vol, os.O_RDONLY), os.open(disk, os.O_WRONLY)
    try:
        pos, end = 0, os.fstat(fi).st_size
        while pos < end:
            try:
                pos = os.lseek(fi, pos, os.SEEK_DATA)
            except OSError:
                break
            stop = os.lseek(fi, pos, os.SEEK_HOLE)
            while pos < stop:
                chunk = os.pread(fi, min(stop - pos, 4 * MIB), pos)
                os.pwrite(fo, chunk, offset + pos)
                pos += len(chunk)
    finally:
        os.close(fi)
        os.close(fo)


@pytest.fixture(scope="module")
def exe_once(xp_raw: Path) -> Iterator[dict[str, Any]]:
    """One migration with the exe backend and ``vmdk_type`` left at its default, a no-op re-run, then
    ``plan`` only: the final disk moved away and back, the ``.reg`` changed."""
    import sys

    from tests.support.gho_checks import carve, mbr_partitions
    from tests.support.gho_ntfs_writer import mounted

    root = Path(tempfile.mkdtemp(prefix="gho2kvm-exe-once-"))
    try:
        # Ghost's payload: the phony XP disk with 24 MiB of data in its NTFS volume (the disk dominates)
        payload = root / "payload.raw"
        subprocess.run(["cp", "--sparse=always", str(xp_raw), str(payload)], check=True)
        ((_ptype, start, count),) = mbr_partitions(payload)
        vol = carve(payload, start * 512, count * 512, root / "xp-ntfs.img")
        with mounted(vol, root / "vol.mnt", plain=True) as m:
            (m / "data.bin").write_bytes(os.urandom(DATA_MIB * MIB))
        _splice(vol, payload, start * 512)
        vol.unlink()
        src = root / "src" / "WINXP.GHO"
        src.parent.mkdir()
        src.write_bytes(b"\xfe\xef\x01\x00 the stand-in does not read it\n")
        inodes, calls = root / "ghost-inodes.txt", root / "ghost-calls.jsonl"
        wrapper = root / "ghost64.py"
        wrapper.write_text(GHOST_WRAPPER.format(standin=str(STANDIN), record=str(inodes)))
        reg = root / "once.reg"
        _reg(reg, "First", ALPHA)
        image = {"id": "xp", "source": src, "format": "raw", "registry": ["mergeide", str(reg)]}
        cfg = make_config(root, [image], defaults={"ghost": {
            "backend": "exe", "command": [sys.executable, str(wrapper)], "path_style": "posix"}})
        argv = ("migrate", "--config", str(cfg))
        plan = ("plan", "--config", str(cfg))
        work, final = root / "work" / "xp", root / "images" / "xp.raw"
        out: dict[str, Any] = {"root": root, "work": work, "final": final, "inodes": inodes}
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("GHOST_STANDIN_PAYLOAD", str(payload))
            mp.setenv("GHOST_STANDIN_LOG", str(calls))
            out["first"], out["first_written"], _daemons = _written_by(argv)
            out["first_ids"] = _run_ids(work)
            out["first_final"] = receipts.file_stamp(final)
            out["first_ino"] = final.stat().st_ino if final.exists() else None
            out["first_alloc"] = final.stat().st_blocks * 512 if final.exists() else 0
            out["first_alpha"] = final.exists() and _has(final, ALPHA)
            out["first_files"] = sorted(p.name for p in work.iterdir())

            out["noop"] = run_cli(*argv, timeout=600)
            out["noop_ids"] = _run_ids(work)
            out["noop_final"] = receipts.file_stamp(final)
            out["ghost_calls"] = len(calls.read_text().splitlines()) if calls.exists() else 0

            aside = root / "aside.raw"
            os.rename(final, aside)
            out["plan_deleted"] = run_cli(*plan, timeout=300)
            os.rename(aside, final)
            out["plan_restored"] = run_cli(*plan, timeout=300)
            _reg(reg, "Second", BRAVO)
            out["plan_reg"] = run_cli(*plan, timeout=300)
        yield out
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.guestfs
def test_exe_final_disk_is_ghosts_extent(exe_once: dict[str, Any]) -> None:
    _ok(exe_once["first"])
    root, work = exe_once["root"], exe_once["work"]
    ghost = receipt(root, "xp", "ghost-convert")
    assert "-VMDKTYPE=flat" in ghost["result"]["argv"]  # the default (auto) for a raw final disk
    assert ghost["result"]["raw_extent"] == str(work / "ghost-s001.vmdk")
    conv = receipt(root, "xp", "convert")["result"]
    assert conv["adopted"]["ghost_run_id"] == exe_once["first_ids"]["ghost-convert"]
    assert conv["verified"] is True
    # the final disk is the very file Ghost wrote (its inode, as Ghost's wrapper saw it)
    assert exe_once["inodes"].read_text().split() == [str(exe_once["first_ino"])]
    assert "ghost-s001.vmdk" not in exe_once["first_files"] and "ghost.vmdk" in exe_once["first_files"]
    assert exe_once["first_alpha"]  # the .reg value, committed into it
    _assert_one_copy("exe", exe_once["first_written"], exe_once["first_alloc"])


@pytest.mark.guestfs
def test_exe_rerun_is_a_noop(exe_once: dict[str, Any]) -> None:
    _ok(exe_once["noop"])
    assert exe_once["noop_ids"] == exe_once["first_ids"]
    assert exe_once["noop_final"] == exe_once["first_final"]
    assert exe_once["ghost_calls"] == 1
    assert not [e for e in log_events(exe_once["noop"]) if e.get("event") == "step started"]


@pytest.mark.guestfs
def test_exe_deleted_final_disk_or_changed_reg_runs_ghost_again(exe_once: dict[str, Any]) -> None:
    deleted = _plan(exe_once["plan_deleted"])
    assert deleted["ghost-convert"].startswith("RUN:") and "decode again" in deleted["ghost-convert"]
    assert all(v.startswith("skip") for v in _plan(exe_once["plan_restored"]).values())
    changed = _plan(exe_once["plan_reg"])
    assert "registry-merge must run again" in changed["ghost-convert"]
    assert all(v.startswith("RUN") for v in changed.values())
