#!/usr/bin/env python3
"""TEST STAND-IN for Symantec/Norton Ghost's proprietary ``ghost64.exe`` — NOT Ghost.

It implements only the command-line contract the pipeline relies on, so the ghost-convert code
can be tested without the proprietary program:

    ghost64_standin.py -clone,mode=restore,src=IMAGE.GHO,dst=OUT.vmdk -batch -sure
                       [-VMDKTYPE=sparse|flat] [-VMDKSIZE=MB] [-VMDKSPLIT=MB]
                       [-VMDKADAPTER=ide|lsilogic|buslogic] [-pwd=PASSWORD] [-afile=PATH]

Switches are matched case-insensitively, like Ghost's. ``Z:\\…`` (Wine) and ``\\…`` paths are
turned back into POSIX paths. It does not read the GHO at all (``src`` only has to exist): the
disk contents come from a raw file named by ``GHOST_STANDIN_PAYLOAD``, written with
``qemu-img convert -O vmdk -o subformat=monolithicSparse|monolithicFlat,adapter_type=…``. For
flat disks the extent is renamed ``NAME-s001.vmdk`` (as Ghost names it), the descriptor points at
it, and a ``GHOSTERR.TXT`` is left beside the output. ``-VMDKSPLIT`` is accepted and ignored.

Environment:
  GHOST_STANDIN_PAYLOAD=PATH    raw disk contents to write (required for a successful run)
  GHOST_STANDIN_PASSWORD=PW     image password; a missing or different -pwd= fails
  GHOST_STANDIN_FAIL=N          fail with error number N (message: GHOST_STANDIN_MESSAGE)
  GHOST_STANDIN_NO_OUTPUT=1     exit 0 without writing anything
  GHOST_STANDIN_LOG=PATH        append one JSON line per call: {"argv": [...], "cwd": ...}

Failures write an abort log in Ghost's format (``Error Number: (N)`` then ``Message: …``, and the
command line, password included, as Ghost does) to the ``-afile`` path (default GHOSTERR.TXT in
the working directory) and exit 10. Error numbers other than GHOST_STANDIN_FAIL's are the stand-in's
own choice, not a claim about which number real Ghost uses for that condition.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

EXIT_OK = 0
EXIT_SYNTAX = 2
EXIT_ERROR = 10

ERR_SYNTAX = 19901
ERR_SOURCE = 19900
ERR_PASSWORD = 19902
ERR_TARGET = 19903


class GhostFailure(Exception):
    def __init__(self, number: int, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.number = number
        self.message = message
        self.code = code


def to_posix(path: str) -> str:
    if len(path) >= 2 and path[1] == ":" and path[0].lower() == "z":
        return path[2:].replace("\\", "/") or "/"
    if path.startswith("\\"):
        return path.replace("\\", "/")
    return path


def parse(argv: list[str]) -> dict[str, str]:
    opts: dict[str, str] = {}
    for arg in argv:
        if not arg.startswith("-"):
            raise GhostFailure(ERR_SYNTAX, f"Invalid argument: {arg}", EXIT_SYNTAX)
        body = arg[1:]
        if body.lower().startswith("clone,"):
            for part in body.split(",")[1:]:
                key, sep, value = part.partition("=")
                if not sep:
                    raise GhostFailure(ERR_SYNTAX, f"Invalid clone parameter: {part}", EXIT_SYNTAX)
                opts[f"clone.{key.lower()}"] = value
            opts["clone"] = "1"
            continue
        key, sep, value = body.partition("=")
        key = key.lower()
        known_flags = {"batch", "sure"}
        known_values = {"vmdktype", "vmdksize", "vmdksplit", "vmdkadapter", "afile", "pwd"}
        if key in known_flags and not sep:
            opts[key] = "1"
        elif key in known_values and sep:
            opts[key] = value
        else:
            raise GhostFailure(ERR_SYNTAX, f"Invalid switch: {arg.split('=')[0]}", EXIT_SYNTAX)
    if "clone" not in opts:
        raise GhostFailure(ERR_SYNTAX, "No -clone switch given", EXIT_SYNTAX)
    if opts.get("clone.mode", "").lower() != "restore":
        raise GhostFailure(ERR_SYNTAX, f"Unsupported clone mode: {opts.get('clone.mode')}", EXIT_SYNTAX)
    for need in ("clone.src", "clone.dst"):
        if not opts.get(need):
            raise GhostFailure(ERR_SYNTAX, f"Missing {need.split('.')[1]}= in -clone", EXIT_SYNTAX)
    return opts


def write_vmdk(opts: dict[str, str]) -> None:
    payload = os.environ.get("GHOST_STANDIN_PAYLOAD")
    if not payload or not os.path.isfile(payload):
        raise GhostFailure(ERR_SOURCE, "Stand-in has no payload (set GHOST_STANDIN_PAYLOAD)")
    dst = to_posix(opts["clone.dst"])
    vtype = opts.get("vmdktype", "sparse").lower()
    adapter = opts.get("vmdkadapter", "ide").lower()
    if vtype not in ("sparse", "flat"):
        raise GhostFailure(ERR_SYNTAX, f"Invalid VMDK type: {vtype}", EXIT_SYNTAX)
    if adapter not in ("ide", "lsilogic", "buslogic"):
        raise GhostFailure(ERR_SYNTAX, f"Invalid VMDK adapter: {adapter}", EXIT_SYNTAX)
    if "vmdksplit" in opts and not opts["vmdksplit"].isdigit():
        raise GhostFailure(ERR_SYNTAX, "Invalid VMDK split size", EXIT_SYNTAX)
    if not os.path.isdir(os.path.dirname(dst) or "."):
        raise GhostFailure(ERR_TARGET, f"Cannot create destination file {opts['clone.dst']}")

    with tempfile.TemporaryDirectory(prefix="ghost-standin-") as work:
        source = payload
        if "vmdksize" in opts:
            if not opts["vmdksize"].isdigit():
                raise GhostFailure(ERR_SYNTAX, "Invalid VMDK size", EXIT_SYNTAX)
            size = int(opts["vmdksize"]) * 1024 * 1024
            if size < os.path.getsize(payload):
                raise GhostFailure(ERR_TARGET, "Destination drive is too small")
            source = os.path.join(work, "sized.raw")
            shutil.copyfile(payload, source)
            os.truncate(source, size)
        subformat = "monolithicFlat" if vtype == "flat" else "monolithicSparse"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "vmdk",
             "-o", f"subformat={subformat},adapter_type={adapter}", source, dst],
            check=True, stdout=subprocess.DEVNULL,
        )
    if vtype == "flat":
        stem = os.path.splitext(os.path.basename(dst))[0]
        folder = os.path.dirname(dst) or "."
        qemu_extent, ghost_extent = f"{stem}-flat.vmdk", f"{stem}-s001.vmdk"
        os.rename(os.path.join(folder, qemu_extent), os.path.join(folder, ghost_extent))
        with open(dst, "rb") as f:
            desc = f.read()
        with open(dst, "wb") as f:
            f.write(desc.replace(f'"{qemu_extent}"'.encode(), f'"{ghost_extent}"'.encode()))
        with open(os.path.join(folder, "GHOSTERR.TXT"), "w") as f:
            f.write(f"Stand-in for ghost64.exe\nDate   : {time.ctime()}\nOperation completed\n")


def write_error_file(path: str, failure: GhostFailure, argv: list[str]) -> None:
    try:
        with open(path, "w", newline="\r\n") as f:
            f.write("*********************************\n")
            f.write(f"Date   : {time.ctime()}\n")
            f.write(f"Error Number: ({failure.number})\n")
            f.write(f"Message: {failure.message}\n")
            f.write("Version: ghost64 stand-in (tests/support/fakes/ghost64_standin.py)\n")
            f.write(f"Command line arguments: {' '.join(argv)}\n")
    except OSError as e:
        print(f"cannot write abort log {path}: {e}", file=sys.stderr)


def main(argv: list[str]) -> int:
    log = os.environ.get("GHOST_STANDIN_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"argv": argv, "cwd": os.getcwd()}) + "\n")
    afile = "GHOSTERR.TXT"
    for arg in argv:
        if arg.lower().startswith("-afile="):
            afile = to_posix(arg.split("=", 1)[1])
    try:
        opts = parse(argv)
        forced = os.environ.get("GHOST_STANDIN_FAIL")
        if forced:
            number = int(forced)
            message = os.environ.get("GHOST_STANDIN_MESSAGE") or "Forced failure"
            raise GhostFailure(number, message)
        if not os.path.isfile(to_posix(opts["clone.src"])):
            raise GhostFailure(ERR_SOURCE, f"Unable to open image file {opts['clone.src']}")
        expected = os.environ.get("GHOST_STANDIN_PASSWORD")
        if expected is not None and opts.get("pwd") != expected:
            raise GhostFailure(ERR_PASSWORD, "Invalid password")
        if os.environ.get("GHOST_STANDIN_NO_OUTPUT") == "1":
            print("Progress: 100%")
            return EXIT_OK
        for pct in (0, 25, 50, 75):
            print(f"Progress: {pct}%", flush=True)
        write_vmdk(opts)
        print("Progress: 100%", flush=True)
    except GhostFailure as failure:
        write_error_file(afile, failure, argv)
        print(f"Ghost error {failure.number}: {failure.message}", file=sys.stderr)
        print(f"Command line: {' '.join(argv)}", file=sys.stderr)  # like the abort log: password too
        return failure.code
    except subprocess.CalledProcessError as e:
        failure = GhostFailure(ERR_TARGET, f"Write to destination failed ({e})")
        write_error_file(afile, failure, argv)
        return failure.code
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
