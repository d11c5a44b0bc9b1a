# ruff: noqa: E501 - case tables read better one per line
"""Seeded fuzz harness for hostile configs, .reg files and VMDK sources (no appliance is launched).

``python tests/support/fuzz_inputs.py CLASS [CLASS…] --cases N --seed S`` runs the classes in this
process and prints one JSON line per class: ``{"class", "cases", "failures": [...], "max_rss_kib",
"seconds"}``. For the long run each class runs in its own process so that its peak RSS is its own;
the fast tier's small sample runs every class in one process. Every case is checked for: the exit code (2
for a refused config, 0 for an accepted one; a refused source raises the one-line InputError), no
traceback (no exception other than the typed ones escapes), at most one line on stderr for a
single-problem refusal (and every config error line names the file), no file left behind, the
sources unchanged, and a time bound per case (a hang is a failure).

Only public entry points are used (``pipeline.app.cli.main``, ``pipeline.steps.inspect.disk_facts``), so the
same harness measures an older checkout (``PYTHONPATH=/work/main``) for before/after counts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

CASE_SECONDS = 20  # a case taking longer is a hang
REG_HEADER = "Windows Registry Editor Version 5.00\r\n"
VALID_REG = REG_HEADER + '\r\n[HKEY_LOCAL_MACHINE\\SYSTEM\\CurrentControlSet\\Services\\atapi]\r\n"Start"=dword:00000000\r\n'


class Hang(Exception):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise Hang(f"no answer within {CASE_SECONDS} s")


# ----------------------------------------------------------------------------------------- checks

def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256 or kind, size) of everything under ``folder`` (never opens a non-file)."""
    out: dict[str, tuple[str, int]] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            st = os.lstat(p)
            rel = str(p.relative_to(folder))
            if os.path.isfile(p) and not os.path.islink(p):
                with open(p, "rb") as fh:  # big files: head, size and mtime are enough
                    digest = hashlib.sha256(fh.read(1 << 20)).hexdigest()
                out[rel] = (f"{digest} {st.st_mtime_ns}", st.st_size)
            else:
                out[rel] = (f"mode {st.st_mode:o}", 0)
    return out


@contextlib.contextmanager
def captured() -> Iterator[io.StringIO]:
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
        yield buf


def run_cli(argv: list[str]) -> tuple[int | None, str, str | None]:
    """(exit code, stderr, traceback-or-None) of ``gho2kvm ARGV`` run in this process."""
    from pipeline.app.cli import main

    with captured() as err:
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = int(e.code) if isinstance(e.code, int) else 2
        except Hang:
            raise
        except BaseException as e:  # noqa: BLE001 - a traceback is what we look for
            return None, err.getvalue(), f"{type(e).__name__}: {str(e)[:200]}"
    return rc, err.getvalue(), None


# ----------------------------------------------------------------------------------------- config cases

def config_text(images: str, defaults: str = "") -> str:
    return (f"defaults:\n  workdir: WORK\n  output_dir: WORK/out\n{defaults}"
            f"images:\n{images}")


def base_image(extra: str = "", ident: str = "xp") -> str:
    return f"  - id: {ident}\n    source: disk.vmdk\n    registry: [mergeide, extra.reg]\n{extra}"


def gen_config(cls: str, rnd: random.Random) -> tuple[bytes | None, str, bool]:
    """(config bytes or None for a special file, what it is, single-problem refusal?)."""
    if cls == "config-keys":
        key = rnd.choice(["[a, b]", "{a: 1}", "[[1], {b: 2}]", "[]", "{}", "[*x]" if False else "[1, [2]]"])
        where = rnd.choice(["top", "defaults", "image", "ghost"])
        line = f"? {key}\n: 1\n" if rnd.random() < 0.5 else f"{key}: 1\n"
        if where == "top":
            return (line + config_text(base_image())).encode(), f"key {key} at top", True
        if where == "defaults":
            return config_text(base_image(), "  " + line.replace("\n: ", "\n  : ")).encode(), f"key {key} in defaults", True
        if where == "image":
            return config_text(base_image("    " + line.replace("\n: ", "\n    : "))).encode(), f"key {key} in image", True
        return config_text(base_image("    ghost:\n      " + line.replace("\n: ", "\n      : "))).encode(), f"key {key} in ghost", True
    if cls == "config-nesting":
        depth = rnd.choice([100, 1000, 5000, 20000, 100000, 300000])
        kind = rnd.choice(["flow-seq", "flow-map", "block"])
        if kind == "flow-seq":
            value = "[" * depth + "]" * depth
        elif kind == "flow-map":
            value = "{a: " * depth + "1" + "}" * depth
        else:
            depth = min(depth, 3000)
            value = "\n" + "".join("  " * (i + 3) + "- \n" for i in range(depth)) + "  " * (depth + 3) + "x"
        return config_text(base_image(f"    description: {value}\n")).encode(), f"{kind} depth {depth}", True
    if cls == "config-encoding":
        text = config_text(base_image("    title: caf\u00e9\n")).encode()
        bad = rnd.choice([b"\xff", b"\xc3\x28", b"\xe9", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80\x80"])
        pos = rnd.randrange(len(text))
        return text[:pos] + bad + text[pos:], f"{bad!r} at {pos}", True
    if cls == "config-odd-yaml":
        value = rnd.choice([
            "!!binary aGVsbG8=", "!!python/object:os.system x", "!!python/name:os.system", "!!set {a, b}",
            "!!omap [a: 1]", "!!timestamp 2001-13-45", "2001-02-30", "!!float nan", ".nan", ".inf", "-.inf",
            "9" * 5000, "0x" + "f" * 5000, "1e999999", "!!int 0b" + "1" * 20000, "!<tag:x> y", "!local z",
            "~", "!!null ''", "!!str", "!!map {}", "!!seq []", "!!bool yes", "&a [*a]",
        ])
        key = rnd.choice(["memory_mib", "vcpus", "source", "id", "registry", "title", "ghost", "verify"])
        if key in ("id", "source"):
            image = f"  - id: {value if key == 'id' else 'xp'}\n    source: {value if key == 'source' else 'disk.vmdk'}\n"
        else:
            image = base_image(f"    {key}: {value}\n")
        merge = "  - <<: [*m]\n    id: yy\n" if rnd.random() < 0.3 else ""
        return config_text(image + merge).encode(), f"{key}: {value[:30]}", not merge
    if cls == "config-alias-bomb":
        width, levels = rnd.choice([(9, 9), (10, 8), (20, 6), (100, 4), (2, 40), (50, 5)])
        lines = ['  a0: &a0 ["lol"]']
        for i in range(1, levels):
            lines.append(f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
        where = rnd.choice(["description", "registry", "memory_mib", "id"])
        text = config_text(base_image(f"    {where}: *a{levels - 1}\n"), "\n".join(
            "  " + ln.strip().replace(": &", "_x: &", 1) for ln in lines) + "\n")
        return text.encode(), f"{width}^{levels} via {where}", False
    if cls == "config-special":
        return None, rnd.choice(["fifo", "dev-zero", "dev-null-symlink", "directory", "huge-sparse", "fifo-symlink",
                                 "just-over-cap"]), True
    if cls == "config-ids":
        ident = rnd.choice(["'.'", "'..'", "'...'", '"a\\nb"', '"a\\rb"', '"x\\ty"', '"\\x1b[31mred"', '"a\\u2028b"',
                            '"a\\x00b"', "'" + "x" * 65 + "'", "'a/b'", "'../x'", "' '", "''", "[a]", "{a: 1}", "12",
                            '"\\u0085x"', "'\u00e9t\u00e9'"])
        source = rnd.choice(["disk.vmdk", '"di\\nsk.vmdk"', '"a\\x00.vmdk"'])
        return config_text(f"  - id: {ident}\n    source: {source}\n").encode(), f"id {ident}", source == "disk.vmdk"
    if cls == "config-mutation":
        text = bytearray(config_text(base_image("    memory_mib: 1024\n    ghost: {backend: native}\n"),
                                     "  registry: [mergeide]\n").encode())
        for _ in range(rnd.randint(1, 8)):
            op = rnd.random()
            pos = rnd.randrange(len(text))
            if op < 0.4:
                text[pos] = rnd.randrange(256)
            elif op < 0.7:
                text.insert(pos, rnd.choice(b":-[]{}&*!|>'\"#%@`,?\n\t "))
            else:
                del text[pos]
        return bytes(text), "mutated", False
    raise ValueError(cls)


def make_special(path: Path, what: str) -> Path:
    if what == "fifo":
        os.mkfifo(path)
    elif what == "fifo-symlink":
        os.mkfifo(path.with_name("real.fifo"))
        path.symlink_to(path.with_name("real.fifo"))
    elif what == "dev-zero":
        return Path("/dev/zero")
    elif what == "dev-null-symlink":
        path.symlink_to("/dev/null")
    elif what == "directory":
        path.mkdir()
    elif what == "huge-sparse":
        with open(path, "wb") as fh:
            fh.write(b"images: []\n")
            fh.truncate(3 << 30)
    elif what == "just-over-cap":
        path.write_bytes(b"images:\n" + b"# " + b"x" * ((1 << 20) + 10) + b"\n")
    return path


def reg_case(rnd: random.Random, folder: Path) -> tuple[str, bool]:
    """Write ``extra.reg`` (or a special file of that name); (what, single-problem refusal?)."""
    reg = folder / "extra.reg"
    kind = rnd.choice(["fifo", "directory", "huge-sparse", "over-cap", "continuations", "mutated", "mutated",
                       "long-line", "utf16-odd", "dev-symlink"])
    if kind == "fifo":
        os.mkfifo(reg)
    elif kind == "directory":
        reg.mkdir()
    elif kind == "dev-symlink":
        reg.symlink_to("/dev/zero")
    elif kind == "huge-sparse":
        with open(reg, "wb") as fh:
            fh.write(VALID_REG.encode())
            fh.truncate(50 << 20)
    elif kind == "over-cap":
        line = '"v"=hex:' + ",".join(["00"] * 400) + "\r\n"
        reg.write_bytes((VALID_REG + line * ((17 << 20) // len(line) + 1)).encode())
    elif kind == "continuations":
        n = rnd.choice([1000, 20000, 80000])
        reg.write_text(VALID_REG + '"Big"=hex:' + ",\\\r\n  ".join(["01,02,03"] * n) + "\r\n")
        return f"{n} continuation lines", False
    elif kind == "long-line":
        reg.write_text(VALID_REG + '"v"="' + "x" * (2 << 20) + '"\r\n')
        return kind, False
    elif kind == "utf16-odd":
        reg.write_bytes(b"\xff\xfe" + VALID_REG.encode("utf-16-le") + b"\x00")
        return kind, False
    else:
        data = bytearray(VALID_REG.encode())
        for _ in range(rnd.randint(1, 6)):
            pos = rnd.randrange(len(data))
            data[pos:pos + 1] = bytes([rnd.randrange(256)]) * rnd.choice([1, 1, 2, 1000])
        reg.write_bytes(bytes(data))
        return kind, False
    return kind, True


# ----------------------------------------------------------------------------------------- VMDK cases

DESC = ('# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="{ctype}"\n\n'
        '# Extent description\n{extents}\n\n# The Disk Data Base\n#DDB\n\n'
        'ddb.adapterType = "ide"\nddb.geometry.cylinders = "16"\n{ddb}')


def sparse_header(desc_off: int, desc_size: int, *, length: int = 512, capacity: int = 2048) -> bytes:
    h = bytearray(512)
    h[:4] = b"KDMV"
    struct.pack_into("<IIQQQQIQQQ", h, 4, 1, 3, capacity, 128, desc_off, desc_size, 512, 0, 0, 128)
    return bytes(h[:length])


def vmdk_case(cls: str, rnd: random.Random, folder: Path) -> tuple[Path, str]:
    disk = folder / "disk.vmdk"
    if cls == "vmdk-header":
        off = rnd.choice([1 << 60, (1 << 64) - 1, 1 << 40, 2, 0, 1, 1 << 32, 7])
        size = rnd.choice([1 << 60, 20, (1 << 64) - 1, 0, 1 << 20, 1 << 13, 1])
        length = rnd.choice([4, 5, 28, 44, 100, 511, 512, 512])
        data = sparse_header(off, size, length=length)
        if length == 512 and rnd.random() < 0.5:
            text = DESC.format(ctype="monolithicSparse", extents='RW 2048 SPARSE "disk.vmdk"', ddb="").encode()
            data += text + bytes(-len(text) % 512)
        disk.write_bytes(data)
        return disk, f"KDMV len {length} descriptorOffset {off} descriptorSize {size}"
    if cls == "vmdk-descriptor":
        kind = rnd.choice(["ddb-parent", "parent-line", "parentcid", "extents-many", "two-createtypes",
                           "extent-fifo", "extent-chardev", "extent-dir", "extent-abs", "extent-dotdot",
                           "extent-symlink-out", "bad-extent-line", "fulldevice", "source-fifo",
                           "source-dir", "ddb-parent-mixed-case"])
        extents = 'RW 2048 FLAT "disk-flat.vmdk" 0'
        ddb, ctype = "", "monolithicFlat"
        (folder / "disk-flat.vmdk").write_bytes(bytes(2048 * 512)[:0])
        os.truncate(folder / "disk-flat.vmdk", 2048 * 512)
        if kind == "ddb-parent":
            ddb = 'ddb.comment = "x parentFileNameHint=\\"/etc/shadow\\" y"\n'
        elif kind == "ddb-parent-mixed-case":
            ddb = 'ddb.note = "PARENTFILENAMEHINT = base.vmdk"\n'
        elif kind == "parent-line":
            ddb = 'parentFileNameHint="base.vmdk"\n'
        elif kind == "parentcid":
            ddb = ""
            extents += "\n"
        elif kind == "extents-many":
            n = rnd.choice([1025, 5000, 20000])
            extents = "\n".join('RW 1 FLAT "disk-flat.vmdk" 0' for _ in range(n))
        elif kind == "two-createtypes":
            ddb = 'ddb.x = "createType=\\"fullDevice\\""\n'
        elif kind in ("extent-fifo", "extent-chardev", "extent-dir", "extent-symlink-out"):
            target = folder / "odd-flat.vmdk"
            if kind == "extent-fifo":
                os.mkfifo(target)
            elif kind == "extent-chardev":
                target.symlink_to("/dev/zero")
            elif kind == "extent-dir":
                target.mkdir()
            else:
                target.symlink_to("/etc/hostname")
            extents = 'RW 2048 FLAT "odd-flat.vmdk" 0'
        elif kind == "extent-abs":
            extents = 'RW 2048 FLAT "/dev/zero" 0'
        elif kind == "extent-dotdot":
            extents = 'RW 2048 FLAT "../disk-flat.vmdk" 0'
        elif kind == "bad-extent-line":
            extents = 'RW +8 FLAT "disk-flat.vmdk" 0'
        elif kind == "fulldevice":
            ctype = "fullDevice"
        text = DESC.format(ctype=ctype, extents=extents, ddb=ddb)
        if kind == "parentcid":
            text = text.replace("parentCID=ffffffff", "parentCID=12345678")
        if kind == "source-fifo":
            os.mkfifo(disk)
        elif kind == "source-dir":
            disk.mkdir()
        else:
            disk.write_text(text)
        return disk, kind
    raise ValueError(cls)


# ----------------------------------------------------------------------------------------- runner

CONFIG_CLASSES = ("config-keys", "config-nesting", "config-encoding", "config-odd-yaml", "config-alias-bomb",
                  "config-special", "config-ids", "config-mutation")
#: docs/safety.md: the one path rule, sources that cannot be what they claim, what a person reads
SAFETY_CLASSES = ("path-overlap", "path-owner", "source-lies", "extract-output", "messages")
CLASSES = (*CONFIG_CLASSES, "reg-files", "vmdk-header", "vmdk-descriptor", *SAFETY_CLASSES)


def one_case(cls: str, rnd: random.Random, tmp: Path) -> str | None:
    """Run one case in a fresh folder; None when every check holds, else what failed."""
    src = tmp / "src"
    src.mkdir()
    work = tmp / "work"
    (src / "extra.reg").write_text(VALID_REG)
    single = True
    if cls.startswith("vmdk-"):
        return vmdk_check(cls, rnd, src)
    if cls in SAFETY_CLASSES:
        try:
            from tests.support import fuzz_safety
        except ImportError:  # run as a script without the repo root on the path: its own folder
            import fuzz_safety  # type: ignore[no-redef]

        return fuzz_safety.one_case(cls, rnd, tmp)
    disk = src / "disk.vmdk"
    disk.write_text(DESC.format(ctype="monolithicFlat", extents='RW 8 FLAT "disk-flat.vmdk" 0', ddb=""))
    (src / "disk-flat.vmdk").write_bytes(bytes(4096))
    cfg = src / "c.yaml"
    if cls == "reg-files":
        (src / "extra.reg").unlink()
        what, single = reg_case(rnd, src)
        cfg.write_text(config_text(base_image()).replace("WORK", str(work)))
    else:
        data, what, single = gen_config(cls, rnd)
        if data is None:
            cfg = make_special(cfg, what)
        else:
            cfg.write_bytes(data.replace(b"WORK", str(work).encode()))
    before = snapshot(src)
    cmd = rnd.choice(["validate", "plan"])
    rc, err, tb = run_cli([cmd, "--config", str(cfg)])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    problem = None
    if tb is not None:
        problem = f"traceback {tb}"
    elif "Traceback (most recent call last)" in err:
        problem = "traceback on stderr"
    elif rc not in (0, 2):
        problem = f"exit code {rc}"
    elif rc == 2 and not lines:
        problem = "refused without a message"
    elif rc == 2 and single and len(lines) != 1:
        problem = f"{len(lines)} lines on stderr"
    elif rc == 2 and not all(ln.startswith(str(cfg)) for ln in lines):
        problem = f"an error line does not name the config: {lines[0][:100]!r}"
    elif any(len(ln) > 2000 for ln in lines):
        problem = f"an error line of {max(len(ln) for ln in lines)} characters"
    elif snapshot(src) != before:
        problem = "the source folder changed"
    elif work.exists() and cmd == "validate":
        problem = "validate left files"
    return None if problem is None else f"{what}: {problem}"


def vmdk_check(cls: str, rnd: random.Random, src: Path) -> str | None:
    from pipeline.core.errors import InputError
    from pipeline.steps.inspect import disk_facts

    disk, what = vmdk_case(cls, rnd, src)
    before = snapshot(src)
    problem = None
    try:
        with captured():
            disk_facts(disk, "fz")
    except Hang:
        raise
    except InputError as e:
        msg = e.one_line()
        if "\n" in msg or len(msg) > 2000:
            problem = "refusal is not one bounded line"
        elif disk.name not in msg:
            problem = f"refusal does not name the file: {msg[:150]!r}"
        elif "(no output)" in msg:
            problem = f"hidden timeout: {msg[:150]!r}"
    except BaseException as e:  # noqa: BLE001
        problem = f"traceback {type(e).__name__}: {str(e)[:150]}"
    else:
        problem = "accepted"
    if problem is None and snapshot(src) != before:
        problem = "the source folder changed"
    return None if problem is None else f"{what}: {problem}"


def run_class(cls: str, cases: int, seed: int) -> dict[str, object]:
    os.environ.setdefault("GHO2KVM_LOG_LEVEL", "WARNING")
    rnd = random.Random(f"{seed}:{cls}")
    failures: list[str] = []
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.monotonic()
    for i in range(cases):
        with tempfile.TemporaryDirectory(prefix="gho2kvm-fuzz-") as tmp:
            signal.alarm(CASE_SECONDS)
            try:
                problem = one_case(cls, rnd, Path(tmp))
            except Hang as e:
                problem = f"hang: {e}"
            except BaseException as e:  # noqa: BLE001 - the harness itself must go on
                problem = f"harness: {type(e).__name__}: {str(e)[:150]}"
            finally:
                signal.alarm(0)
            if problem:
                failures.append(f"#{i} {problem}")
    return {"class": cls, "cases": cases, "failures": failures,
            "max_rss_kib": peak_rss_kib(),
            "seconds": round(time.monotonic() - t0, 1)}


def peak_rss_kib() -> int:
    """This process's own peak RSS. ``ru_maxrss`` survives ``exec`` on Linux, so a class process started
    by a big parent (a long pytest session) would report the parent's peak; the memory map's
    high-water mark (``VmHWM``) starts afresh at ``exec``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("cls", nargs="+", choices=CLASSES)
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--memory-limit-mib", type=int, default=4096)
    a = ap.parse_args(argv)
    lim = a.memory_limit_mib << 20
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))  # an unbounded reader fails fast, not the machine
    for cls in a.cls:
        print(json.dumps(run_class(cls, a.cases, a.seed)), flush=True)
    return 0


def run_all(cases: int, seed: int, python: str = sys.executable, pythonpath: str | None = None,
            one_process: bool = False) -> list[dict[str, object]]:
    """Every class in its own process (or, for a small sample, all in one); their JSON summaries."""
    import subprocess

    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    groups = [list(CLASSES)] if one_process else [[cls] for cls in CLASSES]
    out: list[dict[str, object]] = []
    for group in groups:
        r = subprocess.run([python, __file__, *group, "--cases", str(cases), "--seed", str(seed)],
                           capture_output=True, text=True, env=env,
                           timeout=(CASE_SECONDS * cases + 120) * len(group))
        done = {}
        for line in r.stdout.splitlines():
            with contextlib.suppress(ValueError):
                summary = json.loads(line)
                done[summary["class"]] = summary
        for cls in group:
            out.append(done.get(cls) or {"class": cls, "cases": cases, "max_rss_kib": 0, "seconds": 0,
                                         "failures": [f"harness died: {r.stderr[-300:]}"]})
    return out


if __name__ == "__main__":
    sys.exit(main())
