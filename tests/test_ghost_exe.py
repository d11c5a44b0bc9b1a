"""ghost-convert through Ghost's executable, exercised with tests/fakes/ghost64_standin.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.config import GhostConfig
from pipeline.core.errors import InputError, ToolError
from pipeline.gho.spans import find_spans
from pipeline.tools import ghost_exe
from pipeline.tools.ghost_exe import GhostOptions, GhostResult, parse_error_file, translate_path

STANDIN = Path(__file__).parent / "support" / "fakes" / "ghost64_standin.py"
PASSWORD = "s3cr3t-Pa55"
MB = 1024 * 1024


@pytest.fixture
def payload(tmp_path: Path) -> Path:
    """A 4 MiB raw disk with recognisable data at a few offsets."""
    p = tmp_path / "payload.raw"
    with p.open("wb") as f:
        f.truncate(4 * MB)
        for off in (0, 510, MB + 3, 4 * MB - 16):
            f.seek(off)
            f.write(b"GHO2KVM-%d" % off)
    return p


@pytest.fixture
def gho(tmp_path: Path) -> Path:
    d = tmp_path / "src"
    d.mkdir()
    p = d / "winxpsp3.GHO"
    p.write_bytes(b"not really a ghost image")
    return p


@pytest.fixture
def standin_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, payload: Path) -> Path:
    log = tmp_path / "standin.log"
    for name in ("GHOST_STANDIN_FAIL", "GHOST_STANDIN_MESSAGE", "GHOST_STANDIN_NO_OUTPUT",
                 "GHOST_STANDIN_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GHOST_STANDIN_PAYLOAD", str(payload))
    monkeypatch.setenv("GHOST_STANDIN_LOG", str(log))
    return log


def cfg(**kw) -> GhostConfig:
    kw.setdefault("backend", "exe")
    kw.setdefault("command", (sys.executable, str(STANDIN)))
    kw.setdefault("timeout_s", 120)
    kw.setdefault("vmdk_type", "sparse")  # the default, auto, is resolved by ghost-convert (for_format)
    return GhostConfig(**kw)


def build_argv(c: GhostConfig, src: Path, dst: Path, afile: Path, password: str | None) -> list[str]:
    return ghost_exe.build_argv(GhostOptions.of(c), src, dst, afile, password)


def convert(c: GhostConfig, src: Path, out_dir: Path, *, image_id: str, **kw) -> GhostResult:
    """As the ghost-convert task calls it: options and the password from the config."""
    return ghost_exe.convert(GhostOptions.of(c), src, out_dir, image_id=image_id, spans_of=find_spans,
                             password=c.password(image_id), **kw)


def calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    return [json.loads(line)["argv"] for line in log.read_text().splitlines()]


def compare(a: Path, b: Path) -> None:
    subprocess.run(["qemu-img", "compare", "-f", "vmdk", "-F", "raw", str(a), str(b)], check=True,
                   capture_output=True)


def qemu_info(p: Path) -> dict:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(p)], check=True, capture_output=True)
    return json.loads(out.stdout)


def leftovers(out_dir: Path) -> list[str]:
    return sorted(p.name for p in out_dir.iterdir() if p.name.startswith(".ghost.tmp"))


# ---------------------------------------------------------------------------------------------
# argv and paths


def test_argv_shape_exact():
    c = GhostConfig(backend="exe", command=("wine64", "/opt/ghost/ghost64.exe"), path_style="wine",
                    vmdk_type="flat", vmdk_size_mb=30720, vmdk_split_mb=2000, adapter="lsilogic")
    argv = build_argv(c, Path("/data/winxpsp3.GHO"), Path("/out/xp.vmdk"), Path("/out/abort.txt"), "pw")
    assert argv == [
        "wine64", "/opt/ghost/ghost64.exe",
        r"-clone,mode=restore,src=Z:\data\winxpsp3.GHO,dst=Z:\out\xp.vmdk",
        "-batch", "-sure",
        "-VMDKTYPE=flat", "-VMDKSIZE=30720", "-VMDKSPLIT=2000", "-VMDKADAPTER=lsilogic",
        "-pwd=pw",
        r"-afile=Z:\out\abort.txt",
    ]


def test_argv_defaults_posix_no_password():
    c = GhostConfig(backend="exe", command=("ghost64",))
    assert c.vmdk_type == "auto"
    # auto, for a raw final disk: a flat VMDK (its one extent becomes the final disk), else sparse
    argv = build_argv(c.for_format("raw"), Path("/d/x.GHO"), Path("/o/x.vmdk"), Path("/o/a.txt"), None)
    assert argv == ["ghost64", "-clone,mode=restore,src=/d/x.GHO,dst=/o/x.vmdk", "-batch", "-sure",
                    "-VMDKTYPE=flat", "-VMDKADAPTER=ide", "-afile=/o/a.txt"]
    assert not any(a.lower().startswith(("-pwd", "-vmdksize", "-vmdksplit")) for a in argv)
    qcow2 = build_argv(c.for_format("qcow2"), Path("/d/x.GHO"), Path("/o/x.vmdk"), Path("/o/a.txt"), None)
    assert "-VMDKTYPE=sparse" in qcow2


@pytest.mark.parametrize(("ghost", "fmt", "asked"), [
    ({}, "raw", "flat"),
    ({}, "qcow2", "sparse"),
    ({"vmdk_split_mb": 2000}, "raw", "sparse"),  # split: several extents, none of them the disk
    ({"vmdk_type": "sparse"}, "raw", "sparse"),  # an explicit type is obeyed
    ({"vmdk_type": "flat"}, "qcow2", "flat"),
])
def test_vmdk_type_auto_resolves_by_final_format(ghost: dict, fmt: str, asked: str):
    c = GhostConfig(backend="exe", command=("ghost64",), **ghost)
    argv = build_argv(c.for_format(fmt), Path("/d/x.GHO"), Path("/o/x.vmdk"), Path("/o/a.txt"), None)
    assert [a for a in argv if a.startswith("-VMDKTYPE=")] == [f"-VMDKTYPE={asked}"]


def test_vmdk_type_auto_is_never_passed_to_ghost():
    with pytest.raises(InputError, match="expected one of sparse, flat, got 'auto'"):
        build_argv(GhostConfig(backend="exe", command=("ghost64",)), Path("/d/x.GHO"), Path("/o/x.vmdk"),
                   Path("/o/a.txt"), None)


def test_argv_needs_command_and_rejects_commas():
    with pytest.raises(InputError, match="ghost.command"):
        build_argv(GhostConfig(), Path("/a.GHO"), Path("/b.vmdk"), Path("/c"), None)
    with pytest.raises(InputError, match="comma"):
        build_argv(cfg(), Path("/data/a,b.GHO"), Path("/b.vmdk"), Path("/c"), None)


def test_translate_path_styles(monkeypatch: pytest.MonkeyPatch):
    assert translate_path(Path("/data/x.GHO"), "wine") == "Z:\\data\\x.GHO"
    assert translate_path("/data/dir with space/x.GHO", "wine") == "Z:\\data\\dir with space\\x.GHO"
    monkeypatch.chdir("/tmp")
    assert translate_path("rel/x.GHO", "wine") == "Z:\\tmp\\rel\\x.GHO"
    assert translate_path("D:/images/x.GHO", "windows") == "D:\\images\\x.GHO"
    assert translate_path("//srv/share/x.GHO", "windows") == "\\\\srv\\share\\x.GHO"
    assert translate_path(Path("/data/x.GHO"), "posix") == "/data/x.GHO"
    with pytest.raises(InputError):
        translate_path("/x", "dos")


def test_parse_error_file():
    text = ("*********************************\r\nDate   : Mon\r\nError Number: (10030)\r\n"
            "Message: Not a valid image file\r\nVersion: 11.5\r\n")
    assert parse_error_file(text) == (10030, "Not a valid image file")
    bare = "Error Number: (19916)\n\n  Image file is corrupt\n"
    assert parse_error_file(bare) == (19916, "Image file is corrupt")
    assert parse_error_file("Operation completed\n") == (None, None)
    assert parse_error_file("") == (None, None)


# ---------------------------------------------------------------------------------------------
# successful conversions


def test_sparse(tmp_path: Path, gho: Path, payload: Path, standin_env: Path):
    out = tmp_path / "out"
    seen: list[float] = []
    res = convert(cfg(), gho, out, image_id="xp", progress=seen.append)
    disk = out / "ghost.vmdk"
    assert sorted(p.name for p in out.iterdir()) == ["ghost.vmdk"]
    info = qemu_info(disk)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "monolithicSparse"
    compare(disk, payload)
    assert res.outputs == [{"path": str(disk), "size": disk.stat().st_size}]
    assert res.disk == str(disk) and res.vmdk_type == "sparse" and res.exit_code == 0
    assert res.virtual_size == 4 * MB and res.create_type == "monolithicSparse"
    assert res.source["path"] == str(gho) and res.source["size"] == gho.stat().st_size
    assert res.seconds >= 0 and seen and seen[-1] == 100.0
    assert res.raw_extent is None  # a sparse VMDK holds no raw disk
    assert len(calls(standin_env)) == 1
    json.dumps(res.to_dict())


@pytest.mark.parametrize("style", ["posix", "wine", "windows"])
def test_flat_descriptor_points_at_renamed_extent(tmp_path: Path, gho: Path, payload: Path,
                                                  standin_env: Path, style: str):
    out = tmp_path / "out"
    res = convert(cfg(vmdk_type="flat", adapter="lsilogic", path_style=style), gho, out, image_id="xp")
    disk, extent = out / "ghost.vmdk", out / "ghost-s001.vmdk"
    assert sorted(p.name for p in out.iterdir()) == ["ghost-s001.vmdk", "ghost.vmdk"]
    desc = disk.read_bytes()
    assert b'"ghost-s001.vmdk"' in desc and b".ghost.tmp" not in desc.split(b"# The Disk Data Base")[0]
    assert b'ddb.adapterType = "lsilogic"' in desc
    info = qemu_info(disk)
    assert info["format-specific"]["data"]["create-type"] == "monolithicFlat"
    assert info["format-specific"]["data"]["extents"][0]["filename"].endswith("ghost-s001.vmdk")
    compare(disk, payload)
    assert [o["path"] for o in res.outputs] == [str(extent), str(disk)]  # descriptor renamed last
    assert res.outputs[0]["size"] == 4 * MB
    assert res.vmdk_type == "flat" and res.create_type == "monolithicFlat"
    assert res.raw_extent == str(extent)  # one FLAT extent at offset 0, the whole disk: a raw disk
    clone, afile = calls(standin_env)[0][0], calls(standin_env)[0][-1]
    if style == "wine":
        assert clone.startswith("-clone,mode=restore,src=Z:\\") and ",dst=Z:\\" in clone
        assert afile.startswith("-afile=Z:\\")
    elif style == "windows":
        assert "/" not in clone and "/" not in afile


def test_flat_with_shebang_and_size(tmp_path: Path, gho: Path, payload: Path, standin_env: Path):
    out = tmp_path / "out"
    res = convert(cfg(command=(str(STANDIN),), vmdk_type="flat", vmdk_size_mb=8), gho, out, image_id="xp")
    assert res.virtual_size == 8 * MB
    assert (out / "ghost-s001.vmdk").stat().st_size == 8 * MB
    assert "-VMDKSIZE=8" in calls(standin_env)[0]


def test_rerun_sparse_after_flat_drops_old_extent(tmp_path: Path, gho: Path, payload: Path,
                                                  standin_env: Path):
    out = tmp_path / "out"
    convert(cfg(vmdk_type="flat"), gho, out, image_id="xp")
    convert(cfg(vmdk_type="sparse"), gho, out, image_id="xp")
    assert sorted(p.name for p in out.iterdir()) == ["ghost.vmdk"]
    compare(out / "ghost.vmdk", payload)


def test_spans_recorded(tmp_path: Path, gho: Path, standin_env: Path):
    (gho.parent / "winxp001.GHS").write_bytes(b"a" * 10)
    (gho.parent / "WINXP002.ghs").write_bytes(b"b" * 20)
    (gho.parent / "winxp004.GHS").write_bytes(b"gap")  # after a gap: not a span
    res = convert(cfg(), gho, tmp_path / "out", image_id="xp")
    got = [(Path(s["path"]).name, s["size"]) for s in res.spans]
    assert got == [("winxp001.GHS", 10), ("WINXP002.ghs", 20)]
    assert all(isinstance(s["mtime"], float) for s in res.spans)


def test_stale_temps_removed(tmp_path: Path, gho: Path, standin_env: Path):
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".ghost.tmp-999999999"  # no such pid
    dead.mkdir()
    (dead / "ghost.vmdk").write_bytes(b"half")
    (out / ".ghost.tmp-999999998.vmdk").write_bytes(b"half")
    live = out / f".ghost.tmp-{os.getppid()}"  # another process still running: leave it alone
    live.mkdir()
    convert(cfg(), gho, out, image_id="xp")
    assert leftovers(out) == [live.name]


# ---------------------------------------------------------------------------------------------
# failures


def test_ghost_error_number_and_message(tmp_path: Path, gho: Path, standin_env: Path,
                                        monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GHOST_STANDIN_FAIL", "10030")
    monkeypatch.setenv("GHOST_STANDIN_MESSAGE", "Not a valid image file")
    out = tmp_path / "out"
    with pytest.raises(ToolError) as ei:
        convert(cfg(), gho, out, image_id="xp")
    e = ei.value
    assert "Ghost error 10030: Not a valid image file" in str(e)
    assert e.image_id == "xp" and e.step == "ghost-convert" and e.returncode == 10
    assert "Error Number: (10030)" in e.stderr  # the abort log, kept on the error
    assert list(out.iterdir()) == []


def test_missing_source_reported_before_running(tmp_path: Path, standin_env: Path):
    with pytest.raises(InputError, match="not found"):
        convert(cfg(), tmp_path / "nope.GHO", tmp_path / "out", image_id="xp")
    assert calls(standin_env) == []


def test_missing_output_after_exit_0(tmp_path: Path, gho: Path, standin_env: Path,
                                     monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GHOST_STANDIN_NO_OUTPUT", "1")
    out = tmp_path / "out"
    with pytest.raises(ToolError, match="exited 0 but wrote no output") as ei:
        convert(cfg(vmdk_type="flat"), gho, out, image_id="xp")
    assert ei.value.returncode == 0
    assert list(out.iterdir()) == []


def test_output_not_a_vmdk(tmp_path: Path, gho: Path):
    # A "Ghost" that exits 0 after writing junk: qemu-img reads it as raw, so nothing is committed.
    code = ("import sys; a = sys.argv[1]; dst = a.split(',dst=')[1]; "
            "open(dst, 'wb').write(b'junk' * 1000)")
    out = tmp_path / "out"
    with pytest.raises(ToolError, match="not a VMDK"):
        convert(cfg(command=(sys.executable, "-c", code)), gho, out, image_id="xp")
    assert list(out.iterdir()) == []


def test_ghost_not_installed(tmp_path: Path, gho: Path):
    out = tmp_path / "out"
    with pytest.raises(ToolError, match="not found"):
        convert(cfg(command=("/nonexistent/ghost64.exe",)), gho, out, image_id="xp")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# password


def test_password_used_and_redacted(tmp_path: Path, gho: Path, payload: Path, standin_env: Path,
                                    monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GHOST_STANDIN_PASSWORD", PASSWORD)
    monkeypatch.setenv("XP_GHOST_PW", PASSWORD)
    res = convert(cfg(password_env="XP_GHOST_PW"), gho, tmp_path / "out", image_id="xp")
    assert f"-pwd={PASSWORD}" in calls(standin_env)[0]  # Ghost got it ...
    assert "-pwd=***" in res.argv  # ... the record did not
    assert PASSWORD not in json.dumps(res.to_dict())
    compare(tmp_path / "out" / "ghost.vmdk", payload)


def test_wrong_password_error_is_redacted(tmp_path: Path, gho: Path, standin_env: Path,
                                          monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("GHOST_STANDIN_PASSWORD", "the-right-one")
    monkeypatch.setenv("XP_GHOST_PW", PASSWORD)
    out = tmp_path / "out"
    with pytest.raises(ToolError) as ei:
        convert(cfg(password_env="XP_GHOST_PW"), gho, out, image_id="xp")
    e = ei.value
    assert "Invalid password" in str(e) and "Ghost error" in str(e)
    # The stand-in, like Ghost, copies its command line (password included) into the abort log
    # and prints it on stderr: none of it may reach the error.
    assert "Command line arguments:" in e.stderr and "-pwd=***" in e.stderr
    for text in (str(e), e.message, e.stderr, e.stdout, " ".join(e.argv)):
        assert PASSWORD not in text
    assert "-pwd=***" in e.argv
    assert list(out.iterdir()) == []


def test_missing_password_variable(tmp_path: Path, gho: Path, standin_env: Path,
                                   monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("XP_GHOST_PW", raising=False)
    with pytest.raises(InputError, match="XP_GHOST_PW"):
        convert(cfg(password_env="XP_GHOST_PW"), gho, tmp_path / "out", image_id="xp")
    assert calls(standin_env) == []


# ---------------------------------------------------------------------------------------------
# descriptor normalisation (should Ghost ever write a path into the extent line)


def copying_ghost(prepared: Path, wait_for: Path | None = None) -> tuple[str, ...]:
    """A "Ghost" that (once ``wait_for`` exists) copies the files of ``prepared`` next to its dst."""
    code = ("import os, shutil, sys, time\n"
            "prepared, wait_for, clone = sys.argv[1:4]\n"
            "dst = clone.split(',dst=')[1].split(',')[0]\n"
            "while wait_for and not os.path.exists(wait_for):\n"
            "    time.sleep(0.02)\n"
            "for name in os.listdir(prepared):\n"
            "    shutil.copy(os.path.join(prepared, name), os.path.join(os.path.dirname(dst), name))\n")
    return (sys.executable, "-c", code, str(prepared), str(wait_for or ""))


def flat_with_windows_extent_path(folder: Path, payload: Path) -> Path:
    """What Ghost would write if it named the extent by its full Windows path, upper-cased."""
    folder.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                    str(payload), str(folder / "ghost.vmdk")], check=True)
    (folder / "ghost-flat.vmdk").rename(folder / "ghost-s001.vmdk")
    desc = (folder / "ghost.vmdk").read_bytes()
    windows_ref = b'"Z:\\work\\.ghost.tmp-1\\GHOST-S001.VMDK"'
    (folder / "ghost.vmdk").write_bytes(desc.replace(b'"ghost-flat.vmdk"', windows_ref))
    return folder


def test_descriptor_extent_path_reduced_to_name(tmp_path: Path, gho: Path, payload: Path):
    prepared = flat_with_windows_extent_path(tmp_path / "t", payload)
    out = tmp_path / "out"
    res = convert(cfg(command=copying_ghost(prepared), vmdk_type="flat"), gho, out, image_id="xp")
    assert sorted(p.name for p in out.iterdir()) == ["ghost-s001.vmdk", "ghost.vmdk"]
    assert b'FLAT "ghost-s001.vmdk" 0' in (out / "ghost.vmdk").read_bytes()
    compare(out / "ghost.vmdk", payload)
    assert [Path(o["path"]).name for o in res.outputs] == ["ghost-s001.vmdk", "ghost.vmdk"]


def _prepared_flat(folder: Path, payload: Path, extents: list[tuple[int, int]], grow: int = 0) -> Path:
    """A flat VMDK whose descriptor lists ``extents`` (sectors, offset) of one file ``ghost-s001.vmdk``
    holding the payload (and ``grow`` more bytes)."""
    prepared = flat_with_windows_extent_path(folder, payload)
    desc = (prepared / "ghost.vmdk").read_bytes()
    head, _, tail = desc.partition(b'RW ')
    tail = tail.split(b"\n", 1)[1]
    lines = b"".join(b'RW %d FLAT "ghost-s001.vmdk" %d\n' % e for e in extents)
    (prepared / "ghost.vmdk").write_bytes(head + lines + tail)
    with open(prepared / "ghost-s001.vmdk", "ab") as f:
        f.write(b"\0" * grow)
    return prepared


@pytest.mark.parametrize(("extents", "grow"), [
    ([(4 * MB // 512 // 2, 0), (4 * MB // 512 // 2, 4 * MB // 512 // 2)], 0),  # two extents of one file
    ([(4 * MB // 512, 1)], 512),  # the disk starts one sector into the file
    ([(4 * MB // 512, 0)], 512),  # the file is longer than the disk
])
def test_flat_vmdk_that_is_no_raw_disk(tmp_path: Path, gho: Path, payload: Path,
                                       extents: list[tuple[int, int]], grow: int):
    prepared = _prepared_flat(tmp_path / "t", payload, extents, grow)
    out = tmp_path / "out"
    res = convert(cfg(command=copying_ghost(prepared), vmdk_type="flat"), gho, out, image_id="xp")
    assert qemu_info(out / "ghost.vmdk")["virtual-size"] == 4 * MB  # a valid VMDK, read by qemu ...
    assert res.raw_extent is None  # ... but its extent file is not the disk as it stands


def test_flat_vmdk_rebuilt_exactly_is_a_raw_disk(tmp_path: Path, gho: Path, payload: Path):
    prepared = _prepared_flat(tmp_path / "t", payload, [(4 * MB // 512, 0)])  # the helper itself is sound
    out = tmp_path / "out"
    res = convert(cfg(command=copying_ghost(prepared), vmdk_type="flat"), gho, out, image_id="xp")
    assert res.raw_extent == str(out / "ghost-s001.vmdk")


def test_descriptor_naming_an_extent_ghost_did_not_write(tmp_path: Path, gho: Path, payload: Path):
    prepared = flat_with_windows_extent_path(tmp_path / "t", payload)
    (prepared / "ghost-s001.vmdk").unlink()
    out = tmp_path / "out"
    with pytest.raises(ToolError, match=r"unusable: .*GHOST-S001.VMDK.*which Ghost did not write"):
        convert(cfg(command=copying_ghost(prepared), vmdk_type="flat"), gho, out, image_id="xp")
    assert list(out.iterdir()) == []


def test_result_is_a_dataclass_with_the_fields():
    names = set(GhostResult.__dataclass_fields__)
    assert {"argv", "spans", "outputs", "exit_code", "seconds", "vmdk_type"} <= names


def test_bad_paths_rejected_before_anything_is_written(tmp_path: Path, gho: Path, standin_env: Path):
    out = tmp_path / "a,b"
    with pytest.raises(InputError, match="comma"):
        convert(cfg(), gho, out, image_id="xp")
    assert not out.exists() and calls(standin_env) == []


def test_error_text_scrubbed_case_insensitively_and_every_pwd_switch(
        tmp_path: Path, gho: Path, standin_env: Path, monkeypatch: pytest.MonkeyPatch):
    # Ghost may upper-case its command line and could echo any -pwd= switch in its message
    monkeypatch.setenv("XP_GHOST_PW", PASSWORD)
    monkeypatch.setenv("GHOST_STANDIN_FAIL", "10030")
    monkeypatch.setenv("GHOST_STANDIN_MESSAGE", f"key {PASSWORD.upper()} refused -PWD=other")
    with pytest.raises(ToolError) as ei:
        convert(cfg(password_env="XP_GHOST_PW"), gho, tmp_path / "out", image_id="xp")
    e = ei.value
    assert "Ghost error 10030: key *** refused -PWD=***" in e.message
    for text in (str(e), e.message, e.stderr, e.stdout):
        assert PASSWORD.lower() not in text.lower() and "other" not in text


def test_concurrent_temp_of_this_process_is_kept(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    running = out / f".ghost.tmp-{os.getpid()}-abc"
    running.mkdir()
    fd = ghost_exe.claim(running)  # a conversion of this process is writing into it
    try:
        assert ghost_exe.remove_stale_temps(out) == []
    finally:
        os.close(fd)
    assert ghost_exe.remove_stale_temps(out) == [running]  # interrupted earlier call of ours


def test_failure_without_error_file(tmp_path: Path, gho: Path):
    code = "import sys; print('wine: cannot find L\"ghost64.exe\"', file=sys.stderr); sys.exit(53)"
    out = tmp_path / "out"
    with pytest.raises(ToolError, match=r"without an error number: wine: cannot find .*exit 53") as ei:
        convert(cfg(command=(sys.executable, "-c", code)), gho, out, image_id="xp")
    assert ei.value.returncode == 53
    assert list(out.iterdir()) == []


def test_timeout_removes_temps(tmp_path: Path, gho: Path):
    out = tmp_path / "out"
    with pytest.raises(ToolError, match="timed out"):
        convert(cfg(command=(sys.executable, "-c", "import time; time.sleep(30)"), timeout_s=1),
                gho, out, image_id="xp")
    assert list(out.iterdir()) == []


def test_vmdk_rename_extents_keeps_other_bytes(tmp_path: Path, payload: Path):
    """pipeline.vmdk's writer: only the extent names change, the rewrite is atomic (no temp left)."""
    from pipeline import vmdk

    d = tmp_path / "t"
    d.mkdir()
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                    str(payload), str(d / "x.vmdk")], check=True)
    before = (d / "x.vmdk").read_bytes()
    assert vmdk.rename_extents(d / "x.vmdk", lambda n: n) == ["x-flat.vmdk"]
    assert (d / "x.vmdk").read_bytes() == before  # nothing to change: not rewritten
    assert vmdk.rename_extents(d / "x.vmdk", str.upper) == ["X-FLAT.VMDK"]
    assert (d / "x.vmdk").read_bytes() == before.replace(b'"x-flat.vmdk"', b'"X-FLAT.VMDK"')
    assert sorted(p.name for p in d.iterdir()) == ["x-flat.vmdk", "x.vmdk"]
    sparse = d / "s.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", str(payload), str(sparse)], check=True)
    assert vmdk.rename_extents(sparse, str.upper) == []  # embedded descriptor: its own extent


@pytest.mark.parametrize(("line", "size", "raw"), [
    ('RW 8192 FLAT "ghost-s001.vmdk" 0', 4 * MB, "ghost-s001.vmdk"),
    ('RW 8192 VMFS "ghost-s001.vmdk"', 4 * MB, "ghost-s001.vmdk"),  # no offset written: 0
    ('RW 8192 FLAT "ghost-s001.vmdk" 0', 8 * MB, None),  # the disk is larger than the extent
    ('RW 8192 FLAT "ghost-s001.vmdk" 2048', 4 * MB, None),
    ('RDONLY 8192 FLAT "ghost-s001.vmdk" 0', 4 * MB, None),
    ('RW 8192 SPARSE "ghost-s001.vmdk"', 4 * MB, None),
    ('RW 4096 FLAT "ghost-s001.vmdk" 0\nRW 4096 FLAT "ghost-s002.vmdk" 0', 4 * MB, None),
])
def test_whole_raw_extent_from_the_descriptor(tmp_path: Path, line: str, size: int, raw: str | None):
    from pipeline import vmdk

    desc = tmp_path / "ghost.vmdk"
    desc.write_text(f'# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                    f'createType="monolithicFlat"\n\n# Extent description\n{line}\n')
    assert vmdk.whole_raw_extent(vmdk.parse_descriptor(desc), size) == raw
