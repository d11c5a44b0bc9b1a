# ruff: noqa: E501 - case tables read better one per line
"""Seeded hostile cases for data safety (docs/safety.md), run by :mod:`tests.support.fuzz_inputs`
(classes ``path-overlap``, ``path-owner``, ``source-lies``, ``extract-output``, ``messages``).

Only public entry points (``pipeline.app.cli.main``, ``pipeline.steps.inspect.disk_facts``) and real
tools (qemu-img) are used, so the same cases measure an older checkout for before/after counts. No
appliance is launched: every case is refused (or accepted) before one would be.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import subprocess
from pathlib import Path

try:
    from tests.support.fuzz_inputs import captured, run_cli, snapshot
except ImportError:  # run from tests/support as a script (fuzz_inputs.py CLASS ...)
    from fuzz_inputs import captured, run_cli, snapshot  # type: ignore[no-redef]

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gho"
#: a Python class name in a message a person reads (NotADirectoryError, FileExistsError, ...)
CLASS_NAME = re.compile(r"\b[A-Z][a-zA-Z]+(Error|Exception)\b|\[Errno \d+\]")


def one_case(cls: str, rnd: random.Random, tmp: Path) -> str | None:
    return {"path-overlap": overlap_case, "path-owner": owner_case, "source-lies": lies_case,
            "extract-output": extract_case, "messages": messages_case}[cls](rnd, tmp)


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True, timeout=60)


def _raw(path: Path, mib: int = 2, data: bool = True, rnd: random.Random | None = None) -> Path:
    with open(path, "wb") as fh:
        fh.truncate(mib << 20)
        if data:
            fh.write(b"\x33" * 446 + bytes(64) + b"\x55\xaa")
            fh.seek(1 << 20)
            fh.write((rnd or random.Random(0)).randbytes(64 * 1024))
    return path


def _write_config(cfg: Path, images: list[dict[str, object]], defaults: dict[str, object]) -> None:
    import json

    lines = ["defaults:"] + [f"  {k}: {json.dumps(str(v) if isinstance(v, Path) else v)}" for k, v in defaults.items()]
    lines.append("images:")
    for img in images:
        first = True
        for k, v in img.items():
            lines.append(f"  {'- ' if first else '  '}{k}: {json.dumps(str(v) if isinstance(v, Path) else v)}")
            first = False
    cfg.write_text("\n".join(lines) + "\n")


def _refusal_problem(rc: int | None, err: str, tb: str | None, cfg: Path, must_name: list[str],
                     single: bool = False) -> str | None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if tb is not None:
        return f"traceback {tb}"
    if "Traceback (most recent call last)" in err:
        return "traceback on stderr"
    if rc == 0:
        return "accepted"
    if rc != 2:
        return f"exit code {rc}, expected 2"
    if not lines:
        return "refused without a message"
    if single and len(lines) != 1:
        return f"{len(lines)} lines on stderr"
    if CLASS_NAME.search(err):
        return f"a Python class name in the message: {lines[0][:160]!r}"
    joined = "\n".join(lines)
    for name in must_name:
        if name not in joined:
            return f"the refusal does not name {name!r}: {lines[0][:200]!r}"
    return None


# ----------------------------------------------------------------------------------------- path-overlap


def overlap_case(rnd: random.Random, tmp: Path) -> str | None:
    src, work, out = tmp / "src", tmp / "work", tmp / "out"
    work.mkdir()
    out.mkdir()
    cfg = src / "c.yaml"
    kind = rnd.choice(["final-is-source", "symlinked-output-dir", "dotted-output-dir", "swapped-ids",
                       "source-in-work-folder", "hard-linked-final", "work-folder-is-source-folder",
                       "output-in-other-work-folder", "iso-in-work-folder", "final-is-extent",
                       "symlinked-workdir"])
    fmt = rnd.choice(["raw", "qcow2"])
    defaults: dict[str, object] = {"workdir": work, "output_dir": out, "format": fmt}
    name = [str(src)]
    if kind == "final-is-source":
        s = _raw(src / f"x.{fmt}", rnd=rnd) if fmt == "raw" else src / "x.qcow2"
        if fmt == "qcow2":
            _qemu_img("create", "-f", "qcow2", str(s), "2M")
        images = [{"id": "x", "source": s.name}]
        defaults["output_dir"] = src
        name = [str(s)]
    elif kind == "symlinked-output-dir":
        s = _raw(src / f"x.{fmt}", rnd=rnd) if fmt == "raw" else src / "x.qcow2"
        if fmt == "qcow2":
            _qemu_img("create", "-f", "qcow2", str(s), "2M")
        (tmp / "link").symlink_to(src)
        images = [{"id": "x", "source": s.name}]
        defaults["output_dir"] = tmp / "link"
        name = [str(s)]
    elif kind == "dotted-output-dir":
        _raw(src / "x.raw", rnd=rnd)
        (src / "sub").mkdir()
        images = [{"id": "x", "source": "x.raw"}]
        defaults.update(output_dir=f"{src}/sub/../.", format="raw")
        name = [str(src / "x.raw")]
    elif kind == "swapped-ids":
        _raw(src / "a.raw", rnd=rnd)
        _raw(src / "b.raw", rnd=rnd)
        images = [{"id": "a", "source": "b.raw"}, {"id": "b", "source": "a.raw"}]
        defaults.update(output_dir=src, format="raw")
        name = [str(src / "a.raw"), str(src / "b.raw")]
    elif kind == "source-in-work-folder":
        (work / "x").mkdir()
        s = work / "x" / "overlay.qcow2"
        _qemu_img("create", "-f", "qcow2", str(s), "2M")
        images = [{"id": "x", "source": str(s)}]
        name = [str(s)]
    elif kind == "hard-linked-final":
        s = _raw(src / "disk.raw", rnd=rnd)
        os.link(s, out / "x.raw")
        images = [{"id": "x", "source": "disk.raw"}]
        defaults["format"] = "raw"
        name = [str(s)]
    elif kind == "work-folder-is-source-folder":
        s = _raw(src / "disk.raw", rnd=rnd)
        images = [{"id": "src", "source": "disk.raw"}]
        defaults["workdir"] = tmp
        name = [str(s)]
    elif kind == "symlinked-workdir":
        s = _raw(src / "disk.raw", rnd=rnd)
        (tmp / "wl").symlink_to(tmp)
        images = [{"id": "src", "source": "disk.raw"}]
        defaults["workdir"] = tmp / "wl"
        name = [str(s)]
    elif kind == "output-in-other-work-folder":
        _raw(src / "a.raw", rnd=rnd)
        _raw(src / "b.raw", rnd=rnd)
        images = [{"id": "a", "source": "a.raw", "output_dir": str(work / "b")}, {"id": "b", "source": "b.raw"}]
        name = [str(work / "b")]
    elif kind == "iso-in-work-folder":
        _raw(src / "disk.raw", rnd=rnd)
        (work / "x").mkdir()
        (work / "x" / "tools.iso").write_bytes(b"\0" * 4096)
        images = [{"id": "x", "source": "disk.raw", "cdrom": str(work / "x" / "tools.iso")}]
        name = [str(work / "x" / "tools.iso")]
    else:  # final-is-extent
        ext = _raw(src / "x.raw", rnd=rnd)
        (src / "y.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                                    'createType="monolithicFlat"\n\nRW 4096 FLAT "x.raw" 0\n')
        images = [{"id": "x", "source": "y.vmdk"}]
        defaults.update(output_dir=src, format="raw")
        name = [str(ext)]
    _write_config(cfg, images, defaults)
    before, wbefore = snapshot(src), snapshot(work)
    cmd = rnd.choice(["validate", "plan"])
    rc, err, tb = run_cli([cmd, "--config", str(cfg)])
    problem = _refusal_problem(rc, err, tb, cfg, name)
    if problem is None:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if not all(ln.startswith(str(cfg)) and "image '" in ln and "field '" in ln for ln in lines):
            problem = f"a refusal does not name config, image and field: {lines[0][:200]!r}"
    if problem is None and (snapshot(src) != before or snapshot(work) != wbefore):
        problem = "files changed"
    return None if problem is None else f"{kind}: {problem}"


# ----------------------------------------------------------------------------------------- path-owner


def owner_case(rnd: random.Random, tmp: Path) -> str | None:
    src, work, out = tmp / "src", tmp / "work", tmp / "out"
    work.mkdir()
    out.mkdir()
    cfg = src / "c.yaml"
    _raw(src / "disk.raw", rnd=rnd)
    kind = rnd.choice(["user-work-folder", "user-final-disk", "read-only-final-disk", "final-disk-overwrite",
                       "final-disk-force", "workdir-is-a-file", "output-dir-is-a-file", "final-disk-is-a-folder",
                       "final-disk-symlink", "workdir-under-a-file"])
    image: dict[str, object] = {"id": "x", "source": "disk.raw"}
    defaults: dict[str, object] = {"workdir": work, "output_dir": out, "format": "raw"}
    accept = False
    extra: list[str] = []
    name: list[str] = []
    if kind == "user-work-folder":
        (work / "x").mkdir()
        for f in ("domain.xml", "inspect.json", "ghost.qcow2"):
            (work / "x" / f).write_text("the user's own " + f)
        name = [str(work / "x")]
    elif kind in ("user-final-disk", "read-only-final-disk", "final-disk-overwrite", "final-disk-force"):
        (out / "x.raw").write_bytes(b"the user's own disk")
        if kind == "read-only-final-disk":
            (out / "x.raw").chmod(0o444)
        if kind == "final-disk-overwrite":
            image["overwrite"] = True
            accept = True
        if kind == "final-disk-force":
            extra = ["--force"]
            accept = True
        name = [str(out / "x.raw")]
    elif kind == "workdir-is-a-file":
        (tmp / "wfile").write_text("a file")
        defaults["workdir"] = tmp / "wfile"
        name = [str(tmp / "wfile")]
    elif kind == "output-dir-is-a-file":
        (tmp / "ofile").write_text("a file")
        defaults["output_dir"] = tmp / "ofile"
        name = [str(tmp / "ofile")]
    elif kind == "final-disk-is-a-folder":
        (out / "x.raw").mkdir()
        name = [str(out / "x.raw")]
    elif kind == "final-disk-symlink":
        (tmp / "mine.raw").write_text("the user's own file")
        (out / "x.raw").symlink_to(tmp / "mine.raw")
        name = [str(out / "x.raw")]
    else:
        (tmp / "wfile").write_text("a file")
        defaults["workdir"] = tmp / "wfile" / "sub"
        name = [str(tmp / "wfile")]
    _write_config(cfg, [image], defaults)
    before = {"src": snapshot(src), "work": snapshot(work), "out": snapshot(out)}
    cmd = rnd.choice(["validate", "plan"])
    rc, err, tb = run_cli([cmd, "--config", str(cfg), *extra])
    if accept:
        problem = None if rc == 0 and tb is None else f"refused with overwrite/--force: rc {rc} {err[:200]!r} {tb}"
    else:
        problem = _refusal_problem(rc, err, tb, cfg, name, single=True)
    if problem is None and before != {"src": snapshot(src), "work": snapshot(work), "out": snapshot(out)}:
        problem = "files changed"
    return None if problem is None else f"{kind}: {problem}"


# ----------------------------------------------------------------------------------------- source-lies


def _vhd_checksum(footer: bytearray, at: int = 64) -> None:
    footer[at:at + 4] = b"\0\0\0\0"
    struct.pack_into(">I", footer, at, (~sum(footer)) & 0xFFFFFFFF)


def _differencing_vhd(path: Path, rnd: random.Random) -> None:
    _qemu_img("create", "-f", "vpc", "-o", "subformat=dynamic", str(path), "8M")
    data = bytearray(path.read_bytes())
    for at in (0, len(data) - 512):  # the footer copy at the start and the footer
        foot = data[at:at + 512]
        if foot[:8] != b"conectix":
            continue
        struct.pack_into(">I", foot, 60, 4)
        _vhd_checksum(foot)
        data[at:at + 512] = foot
    dyn_at = struct.unpack_from(">Q", data, 16)[0]
    parent = rnd.choice(["parent.vhd", "C:\\VMs\\base.vhd", "base-disk.vhd"]).encode("utf-16-be")
    data[dyn_at + 64:dyn_at + 64 + len(parent)] = parent
    dyn = data[dyn_at:dyn_at + 1024]
    struct.pack_into(">I", dyn, 36, 0)
    struct.pack_into(">I", dyn, 36, (~sum(dyn)) & 0xFFFFFFFF)
    data[dyn_at:dyn_at + 1024] = dyn
    path.write_bytes(bytes(data))


def _differencing_vhdx(path: Path) -> None:
    import uuid

    _qemu_img("create", "-f", "vhdx", str(path), "8M")
    data = bytearray(path.read_bytes())
    meta_guid = uuid.UUID("8B7CA206-4790-4B9A-B8FE-575F050F886E").bytes_le
    params = uuid.UUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B").bytes_le
    reg = 192 * 1024
    count = struct.unpack_from("<I", data, reg + 8)[0]
    for i in range(count):
        if bytes(data[reg + 16 + i * 32:reg + 32 + i * 32]) == meta_guid:
            off = struct.unpack_from("<Q", data, reg + 32 + i * 32)[0]
            n = struct.unpack_from("<H", data, off + 10)[0]
            for j in range(n):
                at = off + 32 + j * 32
                if bytes(data[at:at + 16]) == params:
                    item = off + struct.unpack_from("<I", data, at + 16)[0]
                    data[item + 4] |= 2  # HasParent
    path.write_bytes(bytes(data))


def _sparse_vmdk(path: Path, rnd: random.Random, stream: bool = False) -> None:
    raw = _raw(path.with_suffix(".src"), 4, rnd=rnd)
    opts = ["-o", "subformat=streamOptimized"] if stream else []
    _qemu_img("convert", "-f", "raw", "-O", "vmdk", *opts, str(raw), str(path))
    raw.unlink()


def lies_case(rnd: random.Random, tmp: Path) -> str | None:
    from pipeline.core.errors import InputError
    from pipeline.steps.inspect import disk_facts

    src = tmp / "src"
    kind = rnd.choice(["empty", "tiny-raw", "differencing-vhd", "differencing-vhdx", "flat-extent-offset",
                       "grain-directory-past-eof", "grain-table-past-eof", "grain-past-eof", "corrupt-stream-grain",
                       "stream-marker-size"])
    if kind == "empty":
        disk = src / f"e.{rnd.choice(['raw', 'img', 'qcow2', 'vhd', 'vhdx', 'vmdk'])}"
        disk.write_bytes(b"")
    elif kind == "tiny-raw":
        disk = src / "t.raw"
        disk.write_bytes(rnd.choice([bytes(512), b"\x33" * 510 + b"\x55\xaa", rnd.randbytes(512)]))
    elif kind == "differencing-vhd":
        disk = src / "child.vhd"
        _differencing_vhd(disk, rnd)
    elif kind == "differencing-vhdx":
        disk = src / "child.vhdx"
        _differencing_vhdx(disk)
    elif kind == "flat-extent-offset":
        disk = src / "d.vmdk"
        sectors = rnd.choice([8, 64, 2048])
        (src / "d-flat.vmdk").write_bytes(bytes(sectors * 512))
        off = rnd.randint(1, sectors)
        disk.write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n'
                        f'createType="monolithicFlat"\n\nRW {sectors} FLAT "d-flat.vmdk" {off}\n')
    elif kind in ("grain-directory-past-eof", "grain-table-past-eof", "grain-past-eof"):
        disk = src / "s.vmdk"
        _sparse_vmdk(disk, rnd)
        data = bytearray(disk.read_bytes())
        sectors = len(data) // 512
        gd = struct.unpack_from("<Q", data, 56)[0]
        rgd = struct.unpack_from("<Q", data, 48)[0]
        far = sectors + rnd.randint(1, 1 << 20)
        if kind == "grain-directory-past-eof":
            struct.pack_into("<Q", data, 56, far)
            if rgd:
                struct.pack_into("<Q", data, 48, far)
        elif kind == "grain-table-past-eof":
            for d in {gd, rgd} - {0}:
                struct.pack_into("<I", data, d * 512, far)
        else:
            for d in {gd, rgd} - {0}:
                gt = struct.unpack_from("<I", data, d * 512)[0]
                struct.pack_into("<I", data, gt * 512 + rnd.randrange(8) * 4, far)
        disk.write_bytes(bytes(data))
    else:
        disk = src / "st.vmdk"
        _sparse_vmdk(disk, rnd, stream=True)
        data = bytearray(disk.read_bytes())
        # the first grain marker follows the header and the embedded descriptor (overhead sectors)
        overhead = struct.unpack_from("<Q", data, 64)[0]
        at = overhead * 512
        clen = struct.unpack_from("<I", data, at + 8)[0]
        if kind == "corrupt-stream-grain":
            for _ in range(rnd.randint(1, 8)):
                data[at + 12 + rnd.randrange(max(1, min(clen, 64)))] ^= 1 << rnd.randrange(8)
        else:
            struct.pack_into("<I", data, at + 8, len(data) + rnd.randint(1, 1 << 20))
        disk.write_bytes(bytes(data))
    before = snapshot(src)
    problem = None
    try:
        with captured():
            disk_facts(disk, "fz")
    except InputError as e:
        msg = e.one_line()
        if "\n" in msg or len(msg) > 2000:
            problem = "refusal is not one bounded line"
        elif disk.name not in msg:
            problem = f"refusal does not name the file: {msg[:150]!r}"
    except BaseException as e:  # noqa: BLE001
        if type(e).__name__ == "Hang":
            raise
        problem = f"traceback {type(e).__name__}: {str(e)[:150]}"
    else:
        problem = "accepted"
    if problem is None and snapshot(src) != before:
        problem = "the source folder changed"
    return None if problem is None else f"{kind}: {problem}"


# ----------------------------------------------------------------------------------------- extract-output


def extract_case(rnd: random.Random, tmp: Path) -> str | None:
    gho = tmp / "src" / "IMG.GHO"
    shutil.copyfile(FIXTURES / "75_none.gho", gho)
    outs = tmp / "outs"
    outs.mkdir()
    kind = rnd.choice(["existing-output", "read-only-output", "existing-output-force", "trailing-slash",
                       "user-file-named-like-a-temp", "output-is-source-symlink", "output-is-source-hardlink",
                       "output-under-a-file"])
    out = outs / "out.raw"
    arg = str(out)
    extra: list[str] = []
    accept = False
    keep: Path | None = None
    if kind in ("existing-output", "read-only-output", "existing-output-force"):
        out.write_bytes(b"the user's own disk")
        if kind == "read-only-output":
            out.chmod(0o444)
        if kind == "existing-output-force":
            extra, accept = ["--force"], True
        else:
            keep = out
    elif kind == "trailing-slash":
        arg = str(outs / "newdir") + "/"
    elif kind == "user-file-named-like-a-temp":
        dead = subprocess.Popen(["true"])
        dead.wait()
        keep = outs / f".out.raw.tmp-{dead.pid}"
        keep.write_bytes(b"the user's own file")
        accept = True
    elif kind == "output-is-source-symlink":
        out.symlink_to(gho)
    elif kind == "output-is-source-hardlink":
        os.link(gho, out)
    else:
        (outs / "afile").write_text("x")
        arg = str(outs / "afile" / "out.raw")
    kept = keep.read_bytes() if keep is not None else None
    src_before = snapshot(tmp / "src")
    rc, err, tb = run_cli(["gho", "extract", str(gho), arg, "--quiet", *extra])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problem = None
    if tb is not None:
        problem = f"traceback {tb}"
    elif accept and rc != 0:
        problem = f"refused: rc {rc} {err[:200]!r}"
    elif not accept and rc != 2:
        problem = f"exit code {rc}, expected 2 (a refusal): {err[:160]!r}"
    elif not accept and len(lines) != 1:
        problem = f"{len(lines)} lines on stderr"
    elif CLASS_NAME.search(err):
        problem = f"a Python class name in the message: {err[:160]!r}"
    elif keep is not None and (not keep.exists() or keep.read_bytes() != kept):
        problem = f"the user's file {keep.name} was replaced or deleted"
    elif kind == "trailing-slash" and (outs / "newdir").exists():
        problem = "a file 'newdir' was created for 'newdir/'"
    elif snapshot(tmp / "src") != src_before:
        problem = "the image changed"
    return None if problem is None else f"{kind}: {problem}"


# ----------------------------------------------------------------------------------------- messages


def messages_case(rnd: random.Random, tmp: Path) -> str | None:
    src, work, out = tmp / "src", tmp / "work", tmp / "out"
    cfg = src / "c.yaml"
    _raw(src / "disk.raw", rnd=rnd)
    kind = rnd.choice(["workdir-is-a-file", "output-dir-is-a-file", "inspect-refusal"])
    defaults: dict[str, object] = {"workdir": work, "output_dir": out}
    image: dict[str, object] = {"id": "x", "source": "disk.raw"}
    if kind == "workdir-is-a-file":
        (tmp / "wfile").write_text("x")
        defaults["workdir"] = tmp / "wfile"
        named = str(tmp / "wfile")
    elif kind == "output-dir-is-a-file":
        (tmp / "ofile").write_text("x")
        defaults["output_dir"] = tmp / "ofile"
        named = str(tmp / "ofile")
    else:
        (src / "d-flat.vmdk").write_bytes(bytes(4096))
        (src / "d.vmdk").write_text('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=1234abcd\n'
                                    'createType="monolithicFlat"\n\nRW 8 FLAT "d-flat.vmdk" 0\n')
        image["source"] = "d.vmdk"
        named = "d.vmdk"
    _write_config(cfg, [image], defaults)
    cmd = "inspect" if kind == "inspect-refusal" else rnd.choice(["validate", "plan", "migrate", "report"])
    argv = [cmd, "--config", str(cfg)] + (["--image", "x"] if cmd == "inspect" else [])
    rc, err, tb = run_cli(argv)
    problem = _refusal_problem(rc, err, tb, cfg, [named], single=True)
    return None if problem is None else f"{kind} ({cmd}): {problem}"
