"""``gho`` sub-command: ``gho info FILE [--json]`` and ``gho extract FILE OUT [--format raw|qcow2]
[--password-env VAR]`` (the format follows OUT's suffix: ``.qcow2`` is written as qcow2 in place)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.core import atomic, space
from pipeline.core.choices import DiskFormat, values
from pipeline.core.errors import Gho2KvmError, InputError, escape, plain_error
from pipeline.core.settings import password_from_env
from pipeline.gho.errors import GhoError
from pipeline.gho.extract import OpenDisk, extract
from pipeline.gho.info import read_info

EXIT_OK, EXIT_FAIL, EXIT_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as SIGINT does), so the atomic temp is removed on either."""
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``gho`` command to an argparse ``subparsers`` object; every leaf sets ``func``."""
    p = subparsers.add_parser("gho", help="read Norton Ghost .GHO images natively",
                              description="Read Norton Ghost .GHO images without Ghost.")
    sub = p.add_subparsers(dest="gho_command", metavar="{info,extract}")
    sub.required = True
    pi = sub.add_parser("info", help="show what an image holds")
    pi.add_argument("file", help="the .GHO file (continuation .GHS files are found next to it)")
    pi.add_argument("--json", action="store_true", help="print JSON")
    pi.add_argument("--password-env", metavar="VAR", help="environment variable holding the password")
    pi.add_argument("--strict", action="store_true", help="refuse advisory mismatches (checksums, catalogue)")
    pi.set_defaults(func=cmd_info)
    px = sub.add_parser("extract", help="rebuild the whole disk as a sparse raw file or a qcow2")
    px.add_argument("file", help="the .GHO file")
    px.add_argument("out", help="output disk (written atomically)")
    px.add_argument("--format", choices=values(DiskFormat),
                    help="output format (default: qcow2 for a .qcow2 name, else raw)")
    px.add_argument("--password-env", metavar="VAR", help="environment variable holding the password")
    px.add_argument("--quiet", action="store_true", help="no progress on stderr")
    px.add_argument("--force", action="store_true", help="replace an existing output file")
    px.add_argument("--strict", action="store_true",
                    help="refuse advisory mismatches (checksums, catalogue, header copies), do not warn")
    px.set_defaults(func=cmd_extract)
    return p


def _password(args: argparse.Namespace) -> str | None:
    try:
        return password_from_env(getattr(args, "password_env", None), what="--password-env")
    except InputError as e:
        raise GhoError(f"{args.file}: {e.message}") from None


def _fail(e: BaseException, out: str | None = None, written: int | None = None) -> int:
    if isinstance(e, Gho2KvmError):
        print(f"error: {e.one_line()}", file=sys.stderr)
        return EXIT_INPUT if isinstance(e, (GhoError, InputError)) else EXIT_FAIL
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) and out is not None:
        free = space.free_bytes(Path(os.path.abspath(out)).parent)
        print(f"error: {escape(out, 300)}: no space left on the device ({_needed(written)}"
              f"{free if free is not None else '?'} bytes free)", file=sys.stderr)
        return EXIT_FAIL
    print(f"error: {plain_error(e)}", file=sys.stderr)
    return EXIT_FAIL


def _needed(written: int | None) -> str:
    return f"the disk needs more than the {written} bytes written so far, " if written else ""


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    try:
        info = read_info(args.file, password=_password(args), strict=args.strict)
    except (Gho2KvmError, OSError) as e:
        return _fail(e)
    if args.json:
        print(json.dumps(info.to_dict(), indent=2))
        return EXIT_OK
    print(f"{info.path}: Ghost {info.generation}-style image, compression {info.compression}, "
          f"{info.image_type}, {'password-protected' if info.password else 'no password'}")
    if info.spans:
        print(f"  spans: {', '.join(info.spans)}")
    for p in info.partitions:
        extra = f", {p.files} files, {_size(p.file_bytes)}" if p.files is not None else ""
        label = f" '{p.label}'" if p.label else ""
        if p.kind == "ntfs" and p.geometry:
            extra = f", {p.geometry['cluster_size']}-byte clusters{extra}"
        print(f"  partition {p.index}: {p.kind} {p.fs or '?'}{label}, size {_size(p.size)}, "
              f"hidden sectors {p.hidden_sectors if p.hidden_sectors is not None else '?'}{extra}"
              + (f" ({'; '.join(p.notes)})" if p.notes else ""))
    for w in info.warnings:
        print(f"  warning: {w}")
    return EXIT_OK


def _opener(args: argparse.Namespace) -> OpenDisk:
    # the same choice as the ghost-convert step's (a qcow2 through qemu-nbd: the one tool this runs)
    from pipeline.steps.ghost_convert import disk_opener

    fmt = args.format or ("qcow2" if Path(args.out).suffix.lower() == ".qcow2" else "raw")
    return disk_opener(fmt, image_id=None, step="gho extract")


def cmd_extract(args: argparse.Namespace) -> int:
    last = [-1]
    written = [0]

    def progress(done: int, total: int) -> None:
        written[0] = done
        pct = done * 100 // total if total else 100
        if pct != last[0] and not args.quiet:
            last[0] = pct
            print(f"\r{pct:3d}%", end="", file=sys.stderr, flush=True)

    try:
        with _terminate_as_interrupt():
            atomic.remove_dead_temps(Path(args.out))
            result = extract(args.file, args.out, password=_password(args), progress=progress,
                             strict=args.strict, open_disk=_opener(args), force=args.force)
    except (Gho2KvmError, OSError) as e:
        if last[0] >= 0 and not args.quiet:
            print(file=sys.stderr)
        return _fail(e, args.out, written[0])
    except KeyboardInterrupt:
        if last[0] >= 0 and not args.quiet:
            print(file=sys.stderr)
        print(f"error: {args.file}: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    if last[0] >= 0 and not args.quiet:
        print(file=sys.stderr)
    files = sum(p.files for p in result.partitions)
    print(f"{result.output}: {_size(result.disk_size)} disk, {len(result.partitions)} partitions, "
          f"{files} files, {_size(result.bytes_written)} written")
    bc = result.boot_chain
    fixed = ", ".join(str(f["partition"]) for f in bc.get("hidden_sectors_fixed", [])) or "none"
    print(f"  boot: MBR code from {bc.get('mbr_code')}, active partition {bc.get('active_partition')}, "
          f"hidden sectors set to the partition start on: {fixed}")
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m pipeline.app.gho_cli``)."""
    parser = argparse.ArgumentParser(prog="gho2kvm-gho")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
