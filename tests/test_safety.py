# ruff: noqa: E501 - messages and case descriptions read better on one line
"""Data safety (docs/safety.md, issue 26): the one path rule, foreign files, sources that cannot be what
they claim, one-line messages. No appliance is launched; the seeded campaign is
``tests/support/fuzz_safety.py`` (classes in ``fuzz_inputs``, run by ``tests/test_fuzz_inputs.py``)."""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.cli import main
from pipeline.core import atomic, paths, space
from pipeline.core.errors import InputError, plain_error
from pipeline.steps import inspect as insp
from pipeline.steps import sources
from tests.support import fuzz_safety as fs
from tests.support.fuzz_inputs import run_cli, snapshot

FIXTURES = Path(__file__).parent / "fixtures" / "gho"


def _config(tmp: Path, images: list[dict[str, Any]], **defaults: Any) -> Path:
    src = tmp / "src"
    src.mkdir(exist_ok=True)
    d = {"workdir": tmp / "work", "output_dir": tmp / "out", **defaults}
    cfg = src / "c.yaml"
    fs._write_config(cfg, images, d)
    return cfg


def _refused(tmp: Path, cfg: Path, *names: str, cmd: str = "validate", extra: tuple[str, ...] = ()) -> str:
    before = snapshot(tmp)
    rc, err, tb = run_cli([cmd, "--config", str(cfg), *extra])
    assert tb is None and rc == 2, (rc, err, tb)
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(str(cfg)) and "image '" in line and "field '" in line, line
    for n in names:
        assert n in line, line
    assert not fs.CLASS_NAME.search(line), line
    assert snapshot(tmp) == before
    return line


# ------------------------------------------------------------------------------ the one path rule


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("cmd", ["validate", "plan", "migrate", "inspect", "report"])
def test_final_disk_that_is_the_source_is_refused_by_every_command(tmp_path: Path, fmt: str, cmd: str) -> None:
    src = tmp_path / "src"
    src.mkdir()
    s = src / f"x.{fmt}"
    if fmt == "raw":
        fs._raw(s)
    else:
        subprocess.run(["qemu-img", "create", "-f", "qcow2", str(s), "2M"], check=True, capture_output=True)
    cfg = _config(tmp_path, [{"id": "x", "source": s.name}], output_dir=src, format=fmt)
    line = _refused(tmp_path, cfg, str(s), "field 'output_dir'", cmd=cmd,
                    extra=("--image", "x") if cmd == "inspect" else ())
    assert "the source" in line


def test_output_dir_through_a_symlink_or_dots_is_the_same_folder(tmp_path: Path) -> None:
    cfg = _config(tmp_path, [{"id": "x", "source": "x.raw"}], output_dir=tmp_path / "link")
    fs._raw(tmp_path / "src" / "x.raw")
    (tmp_path / "link").symlink_to(tmp_path / "src")
    assert "through a symbolic link" in _refused(tmp_path, cfg, str(tmp_path / "src" / "x.raw"))
    cfg = _config(tmp_path, [{"id": "x", "source": "x.raw"}], output_dir=f"{tmp_path}/src/./")
    _refused(tmp_path, cfg, str(tmp_path / "src" / "x.raw"))


def test_swapped_ids_name_the_other_images_source(tmp_path: Path) -> None:
    cfg = _config(tmp_path, [{"id": "a", "source": "b.raw"}, {"id": "b", "source": "a.raw"}],
                  output_dir=tmp_path / "src")
    fs._raw(tmp_path / "src" / "a.raw")
    fs._raw(tmp_path / "src" / "b.raw")
    rc, err, _tb = run_cli(["validate", "--config", str(cfg)])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 2
    assert any("of image 'b'" in ln and str(tmp_path / "src" / "a.raw") in ln for ln in lines), lines


def test_hard_link_of_the_source_as_final_disk_is_refused(tmp_path: Path) -> None:
    cfg = _config(tmp_path, [{"id": "x", "source": "disk.raw"}])
    fs._raw(tmp_path / "src" / "disk.raw")
    (tmp_path / "out").mkdir()
    os.link(tmp_path / "src" / "disk.raw", tmp_path / "out" / "x.raw")
    assert "hard link" in _refused(tmp_path, cfg, str(tmp_path / "src" / "disk.raw"))


@pytest.mark.parametrize("where", ["source", "iso", "hardlink"])
def test_a_work_folder_holding_an_input_is_refused(tmp_path: Path, where: str) -> None:
    fs._raw(tmp_path / "src" / "disk.raw") if (tmp_path / "src").mkdir() is None else None
    wf = tmp_path / "work" / "x"
    wf.mkdir(parents=True)
    paths.claim_image_dir(wf.parent / "y", "y")  # an owned folder elsewhere is no excuse
    (wf / paths.MARKER).write_text('{"made_by": "gho2kvm", "image_id": "x", "outputs": {}}')
    image: dict[str, Any] = {"id": "x", "source": "disk.raw"}
    if where == "source":
        shutil.copy(tmp_path / "src" / "disk.raw", wf / "overlay.raw")
        image["source"] = str(wf / "overlay.raw")
        name = str(wf / "overlay.raw")
    elif where == "iso":
        (wf / "tools.iso").write_bytes(bytes(2048))
        image["cdrom"] = str(wf / "tools.iso")
        name = str(wf / "tools.iso")
    else:
        os.link(tmp_path / "src" / "disk.raw", wf / "ghost.raw")
        name = str(wf / "ghost.raw")
    cfg = _config(tmp_path, [image])
    _refused(tmp_path, cfg, name, "field 'workdir'")


def test_two_images_never_share_an_output(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    fs._raw(tmp_path / "src" / "a.raw")
    fs._raw(tmp_path / "src" / "b.raw")
    cfg = _config(tmp_path, [{"id": "a", "source": "a.raw", "output_dir": str(tmp_path / "work" / "b")},
                             {"id": "b", "source": "b.raw"}])
    assert "two images never share" in _refused(tmp_path, cfg, str(tmp_path / "work" / "b"))


def test_the_work_folder_of_a_source_folder(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    fs._raw(tmp_path / "src" / "disk.raw")
    cfg = _config(tmp_path, [{"id": "src", "source": "disk.raw"}], workdir=tmp_path)
    _refused(tmp_path, cfg, str(tmp_path / "src" / "disk.raw"))


# ------------------------------------------------------------------------------ folders and files gho2kvm did not make


def test_a_users_work_folder_is_refused_and_kept(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    fs._raw(tmp_path / "src" / "disk.raw")
    wf = tmp_path / "work" / "x"
    wf.mkdir(parents=True)
    (wf / "domain.xml").write_text("mine")
    cfg = _config(tmp_path, [{"id": "x", "source": "disk.raw"}])
    for cmd in ("validate", "plan", "migrate"):
        assert "was not made by gho2kvm" in _refused(tmp_path, cfg, str(wf), cmd=cmd)
    assert (wf / "domain.xml").read_text() == "mine"


@pytest.mark.parametrize("mode", [0o644, 0o444])
def test_an_existing_final_disk_needs_overwrite_or_force(tmp_path: Path, mode: int) -> None:
    (tmp_path / "src").mkdir()
    fs._raw(tmp_path / "src" / "disk.raw")
    (tmp_path / "out").mkdir()
    final = tmp_path / "out" / "x.raw"
    final.write_text("the user's disk")
    final.chmod(mode)
    cfg = _config(tmp_path, [{"id": "x", "source": "disk.raw"}])
    assert "overwrite: true" in _refused(tmp_path, cfg, str(final))
    assert run_cli(["validate", "--config", str(cfg), "--force"])[0] == 0
    assert run_cli(["validate", "--config", str(cfg)])[0] == 2  # --force held for that run only
    cfg = _config(tmp_path, [{"id": "x", "source": "disk.raw", "overwrite": True}])
    assert run_cli(["validate", "--config", str(cfg)])[0] == 0


def test_a_final_disk_recorded_in_the_marker_is_ours(tmp_path: Path) -> None:
    wf, final = tmp_path / "work" / "x", tmp_path / "out" / "x.raw"
    paths.claim_image_dir(wf, "x")
    assert paths.owns_folder(wf)
    final.parent.mkdir()
    with atomic.temporary_path(final) as tmp:
        tmp.write_bytes(b"made")
        paths.record_output(wf, final, tmp)
    assert paths.made_output(wf, final)
    sources.final_disk_free("x", wf, final, False, "convert")  # ours: may be replaced
    final.unlink()
    final.write_bytes(b"someone else's, same name")
    assert not paths.made_output(wf, final)
    with pytest.raises(paths.PathRefused, match="was not made by gho2kvm"):
        sources.final_disk_free("x", wf, final, False, "convert")


@pytest.mark.parametrize("kind", ["workdir", "output_dir", "under"])
def test_a_file_where_a_folder_is_needed_is_one_line(tmp_path: Path, kind: str) -> None:
    (tmp_path / "src").mkdir()
    fs._raw(tmp_path / "src" / "disk.raw")
    (tmp_path / "afile").write_text("x")
    value = tmp_path / "afile" / "sub" if kind == "under" else tmp_path / "afile"
    cfg = _config(tmp_path, [{"id": "x", "source": "disk.raw"}],
                  **{"workdir" if kind != "output_dir" else "output_dir": value})
    for cmd in ("validate", "plan", "migrate", "report"):
        assert "is a file, expected a folder" in _refused(tmp_path, cfg, str(tmp_path / "afile"), cmd=cmd)


def test_a_stale_temp_is_removed_only_with_its_owner_record(tmp_path: Path) -> None:
    mine, theirs = tmp_path / ".x.raw.tmp-1", tmp_path / ".x.raw.tmp-2"
    for p in (mine, theirs):
        p.write_bytes(b"x")
    paths.claim_temp(mine)
    assert atomic.remove_stale_temps(tmp_path, "x.raw") == [mine]
    assert theirs.exists() and not paths.owner_record(mine).exists()
    # a file in the way of our own temp name is refused, never replaced
    (tmp_path / f".y.raw.tmp-{os.getpid()}").write_bytes(b"user's")
    with pytest.raises(InputError, match="did not make"), atomic.temporary_path(tmp_path / "y.raw"):
        pass
    assert (tmp_path / f".y.raw.tmp-{os.getpid()}").read_bytes() == b"user's"


def test_the_work_folder_is_made_with_its_marker_atomically(tmp_path: Path) -> None:
    wf = tmp_path / "w" / "img"
    paths.claim_image_dir(wf, "img")
    paths.claim_image_dir(wf, "img")  # again: ours
    assert sorted(p.name for p in wf.parent.iterdir()) == ["img"]
    other = tmp_path / "w" / "mine"
    other.mkdir()
    with pytest.raises(paths.PathRefused, match="was not made by gho2kvm"):
        paths.claim_image_dir(other, "mine")


# ------------------------------------------------------------------------------ gho extract outputs


def _extract(tmp: Path, out: str, *extra: str) -> tuple[int | None, str]:
    gho = tmp / "IMG.GHO"
    if not gho.exists():
        shutil.copyfile(FIXTURES / "75_none.gho", gho)
    rc, err, tb = run_cli(["gho", "extract", str(gho), out, "--quiet", *extra])
    assert tb is None
    return rc, err


@pytest.mark.parametrize("mode", [0o644, 0o444])
def test_extract_refuses_an_existing_output_unless_forced(tmp_path: Path, mode: int) -> None:
    out = tmp_path / "out.raw"
    out.write_bytes(b"mine")
    out.chmod(mode)
    rc, err = _extract(tmp_path, str(out))
    assert rc == 2 and "--force" in err and err.count("\n") == 1 and out.read_bytes() == b"mine"
    rc, err = _extract(tmp_path, str(out), "--force")
    assert rc == 0, err
    assert out.stat().st_size > 1 << 20


def test_extract_to_a_name_ending_in_a_slash_makes_no_file(tmp_path: Path) -> None:
    rc, err = _extract(tmp_path, str(tmp_path / "newdir") + "/")
    assert rc == 2 and "directory" in err and not (tmp_path / "newdir").exists()


def test_extract_keeps_a_user_file_named_like_a_stale_temp(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    user = tmp_path / f".out.raw.tmp-{dead.pid}"
    user.write_bytes(b"mine")
    rc, err = _extract(tmp_path, str(tmp_path / "out.raw"))
    assert rc == 0, err
    assert user.read_bytes() == b"mine"


def test_extract_under_a_file_is_one_line_without_a_class_name(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    rc, err = _extract(tmp_path, str(tmp_path / "afile" / "out.raw"))
    assert rc == 2 and err.count("\n") == 1 and not fs.CLASS_NAME.search(err), err


# ------------------------------------------------------------------------------ sources that cannot be what they claim


def _refused_source(path: Path) -> str:
    with pytest.raises(InputError) as ei:
        insp.disk_facts(path, "t")
    msg = ei.value.one_line()
    assert path.name in msg and "\n" not in msg
    return msg


@pytest.mark.parametrize("suffix", [".raw", ".img", ".qcow2", ".vhd", ".vhdx", ".vmdk"])
def test_an_empty_source_is_refused(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"e{suffix}"
    p.write_bytes(b"")
    _refused_source(p)


@pytest.mark.parametrize("data", [bytes(512), b"\x33" * 510 + b"\x55\xaa"])
def test_a_512_byte_source_is_refused(tmp_path: Path, data: bytes) -> None:
    p = tmp_path / "t.raw"
    p.write_bytes(data)
    assert "too small" in _refused_source(p)


def test_a_differencing_vhd_names_its_parent(tmp_path: Path) -> None:
    import random

    p = tmp_path / "child.vhd"
    fs._differencing_vhd(p, random.Random(1))
    msg = _refused_source(p)
    assert "differencing" in msg and "parent" in msg


def test_a_differencing_vhdx_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "child.vhdx"
    fs._differencing_vhdx(p)
    assert "differencing" in _refused_source(p)


def test_plain_vhd_and_vhdx_pass_the_source_checks(tmp_path: Path) -> None:
    for fmt, name in (("vpc", "d.vhd"), ("vhdx", "d.vhdx")):
        subprocess.run(["qemu-img", "create", "-f", fmt, str(tmp_path / name), "8M"], check=True,
                       capture_output=True)
        assert sources.source_problem(tmp_path / name, fmt) is None


@pytest.mark.parametrize("offset", [1, 7, 8])
def test_a_flat_extent_offset_past_its_file_is_refused(tmp_path: Path, offset: int) -> None:
    (tmp_path / "d-flat.vmdk").write_bytes(bytes(8 * 512))
    p = tmp_path / "d.vmdk"
    p.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="monolithicFlat"'
                 f'\n\nRW 8 FLAT "d-flat.vmdk" {offset}\n')
    assert "offset" in _refused_source(p)


@pytest.mark.parametrize("what", ["directory", "table", "grain"])
def test_sparse_vmdk_pointers_past_the_end_are_refused(tmp_path: Path, what: str) -> None:
    import random

    p = tmp_path / "s.vmdk"
    fs._sparse_vmdk(p, random.Random(2))
    data = bytearray(p.read_bytes())
    far = len(data) // 512 + 1000
    gd, rgd = struct.unpack_from("<Q", data, 56)[0], struct.unpack_from("<Q", data, 48)[0]
    if what == "directory":
        struct.pack_into("<Q", data, 56, far)
        struct.pack_into("<Q", data, 48, far)
    for d in {gd, rgd} - {0}:
        if what == "table":
            struct.pack_into("<I", data, d * 512, far)
        elif what == "grain":
            struct.pack_into("<I", data, struct.unpack_from("<I", data, d * 512)[0] * 512, far)
    p.write_bytes(bytes(data))
    assert "past the end" in _refused_source(p)


@pytest.mark.parametrize("damage", ["deflate", "size"])
def test_a_corrupt_stream_optimized_grain_is_refused(tmp_path: Path, damage: str) -> None:
    import random

    p = tmp_path / "st.vmdk"
    fs._sparse_vmdk(p, random.Random(3), stream=True)
    data = bytearray(p.read_bytes())
    at = struct.unpack_from("<Q", data, 64)[0] * 512
    if damage == "deflate":
        data[at + 12 + 2] ^= 0xFF
        data[at + 12 + 5] ^= 0x55
    else:
        struct.pack_into("<I", data, at + 8, len(data))
    p.write_bytes(bytes(data))
    assert "streamOptimized" in _refused_source(p)


def test_a_healthy_stream_optimized_vmdk_passes(tmp_path: Path) -> None:
    import random

    p = tmp_path / "st.vmdk"
    fs._sparse_vmdk(p, random.Random(4), stream=True)
    assert sources.source_problem(p, "vmdk") is None


def test_a_blank_disk_fails_before_any_appliance_unless_expect_os_any(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(8 << 20)

    def no_appliance(*a: object, **k: object) -> dict[str, Any]:
        raise AssertionError("no appliance for a blank disk")

    monkeypatch.setattr(insp, "guest_facts", no_appliance)
    with pytest.raises(InputError, match="all zeros.*expect_os: any"):
        insp.inspect_image(insp.InspectInput(blank, "b"))
    # "os unknown" from the appliance: refused unless expect_os: any
    monkeypatch.setattr(insp, "guest_facts", lambda *a, **k: {"os": "unknown", "partition_table": "none"})
    fs._raw(blank)
    with pytest.raises(InputError, match="no Windows found"):
        insp.inspect_image(insp.InspectInput(blank, "b"))
    monkeypatch.setattr(insp.qemu_img, "version", lambda: "test")
    assert insp.inspect_image(insp.InspectInput(blank, "b", expect_os="any")).os == "unknown"
    # a partitioned data disk without a system: goes on (registry-merge skips it with a warning)
    monkeypatch.setattr(insp, "guest_facts", lambda *a, **k: {"os": "unknown", "partition_table": "msdos"})
    assert insp.inspect_image(insp.InspectInput(blank, "b")).os == "unknown"
    # another operating system found: goes on (registry-merge skips it with a warning)
    monkeypatch.setattr(insp, "guest_facts", lambda *a, **k: {"os": "unknown", "os_type": "linux"})
    assert insp.inspect_image(insp.InspectInput(blank, "b")).os_type == "linux"


def test_expect_os_is_a_config_key(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    fs._raw(tmp_path / "src" / "disk.raw")
    cfg = _config(tmp_path, [{"id": "x", "source": "disk.raw", "expect_os": "linux"}])
    rc, err, _ = run_cli(["validate", "--config", str(cfg)])
    assert rc == 2 and "expect_os" in err and "windows or any" in err


# ------------------------------------------------------------------------------ messages


def test_enospc_names_the_file_and_the_bytes(tmp_path: Path) -> None:
    final = tmp_path / "x.raw"
    with pytest.raises(space.NoSpace) as ei, space.named(final, 12345, image_id="x", step="convert"):
        raise OSError(errno.ENOSPC, "No space left on device")
    msg = ei.value.one_line()
    assert str(final) in msg and "12345 bytes needed" in msg and "Errno" not in msg
    with pytest.raises(space.NoSpace, match="not enough free space"):
        space.require(final, 1 << 62)


def test_os_errors_read_as_file_and_reason() -> None:
    e = FileExistsError(errno.EEXIST, "File exists", "/a/b")
    assert plain_error(e) == "/a/b: File exists"
    assert "Error" not in plain_error(IsADirectoryError(errno.EISDIR, "Is a directory", "/x"))


def test_inspect_refusal_exits_2(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "d-flat.vmdk").write_bytes(bytes(4096))
    (tmp_path / "src" / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=1234abcd\n'
                                             'createType="monolithicFlat"\n\nRW 8 FLAT "d-flat.vmdk" 0\n')
    cfg = _config(tmp_path, [{"id": "x", "source": "d.vmdk"}])
    rc, err, tb = run_cli(["inspect", "--config", str(cfg), "--image", "x"])
    assert tb is None and rc == 2 and "parent" in err and err.count("\n") == 1


def test_main_turns_an_os_error_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from pipeline.app import cli

    def boom(args: object) -> int:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", "/var/images/x.raw")

    monkeypatch.setattr(cli, "cmd_validate", boom)
    monkeypatch.setattr(cli, "build_parser", _parser_with(cli, boom))
    assert main(["validate", "--config", "x"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "error: /var/images/x.raw: Is a directory"


def _parser_with(cli: Any, func: Any) -> Any:
    real = cli.build_parser

    def build() -> Any:
        p = real()
        p.set_defaults(func=func)
        for action in p._subparsers._group_actions:  # noqa: SLF001 - the test seam
            for sp in action.choices.values():
                sp.set_defaults(func=func)
        return p

    return build


def test_a_message_names_the_output_not_the_temp(tmp_path: Path) -> None:
    final = tmp_path / "x.raw"
    with pytest.raises(InputError) as ei, atomic.temporary_path(final) as tmp:
        raise InputError(f"qemu-img: {tmp}: Invalid argument", image_id="x", step="convert")
    assert ".tmp-" not in ei.value.one_line() and str(final) in ei.value.one_line()
    with pytest.raises(OSError) as oe, atomic.temporary_path(final) as tmp:
        raise IsADirectoryError(errno.EISDIR, "Is a directory", str(tmp))
    assert plain_error(oe.value) == f"{final}: Is a directory"


def test_migrate_exits_2_when_every_image_not_done_was_refused() -> None:
    from pipeline.app.runner import ImageStatus, exit_code

    done = ImageStatus("a", "define", "done", 1.0, "")
    refused = ImageStatus("b", "-", "failed", 0.0, "inspect: bad", refused=True)
    broken = ImageStatus("c", "inspect", "failed", 0.0, "convert: qemu-img died")
    pending = ImageStatus("d", "-", "pending", 0.0, "")
    assert exit_code([done]) == 0
    assert exit_code([done, refused]) == 2
    assert exit_code([done, refused, broken]) == 1
    assert exit_code([refused, pending]) == 1
