"""qemu-img: info, check, overlay creation, convert with progress, compare."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.choices import Step
from pipeline.core.errors import InputError, ToolError
from pipeline.tools.run import run

QEMU_IMG = "qemu-img"
_PROGRESS_RE = re.compile(r"\(\s*(\d+(?:\.\d+)?)/100%\)")


@functools.cache
def version() -> str:
    out = run([QEMU_IMG, "--version"], step=Step.INSPECT, timeout=30).stdout
    m = re.search(r"version\s+(\S+)", out)
    return m.group(1) if m else out.strip().splitlines()[0]


def info(path: Path, *, image_id: str | None, step: str, fmt: str | None = None,
         backing_chain: bool = False) -> dict[str, Any]:
    argv = [QEMU_IMG, "info", "--output=json"]
    if fmt:
        argv += ["-f", fmt]
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(str(path))
    try:
        out = run(argv, step=step, image_id=image_id, timeout=120).stdout
    except ToolError as e:
        # its own words when it ran and said something; the wrapper's line otherwise (timed out, not found)
        own = e.stderr.strip().splitlines()[-3:] if e.returncode is not None else []
        said = " | ".join(own) if own else e.message
        raise InputError(f"{path}: qemu-img cannot read the image: {said}",
                         image_id=image_id, step=step) from None
    return json.loads(out)


def check(path: Path, fmt: str, *, image_id: str | None, step: str) -> dict[str, Any] | None:
    """Run ``qemu-img check`` for formats that support it; None if unsupported."""
    if fmt not in ("qcow2", "vmdk", "vdi", "vhdx", "qed", "parallels"):
        return None
    r = run([QEMU_IMG, "check", "--output=json", "-f", fmt, str(path)], step=step, image_id=image_id,
            timeout=600, check=False)
    # exit 0 ok, 1 check not completed, 2 corruptions, 3 leaks (harmless), 63 unsupported
    if r.returncode == 63:
        return None
    if r.returncode in (0, 3):
        try:
            return json.loads(r.stdout) if r.stdout.strip() else {"check-errors": 0}
        except ValueError:
            return {"check-errors": 0}
    msg = (r.stderr.strip() or r.stdout.strip()).splitlines()
    raise InputError(f"{path}: qemu-img check found the image damaged or unreadable (exit {r.returncode}): "
                     f"{' | '.join(msg[-2:]) if msg else 'no details'}", image_id=image_id, step=step)


def create(path: Path, fmt: str, size: int, *, image_id: str | None, step: str) -> None:
    """A new empty image of ``size`` bytes (qemu-img's default options for ``fmt``)."""
    run([QEMU_IMG, "create", "-q", "-f", fmt, str(path), str(size)], step=step, image_id=image_id,
        timeout=120)


def create_overlay(overlay: Path, backing: Path, backing_fmt: str, *, image_id: str | None,
                   step: str) -> None:
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-F", backing_fmt, "-b", str(backing.absolute()),
         str(overlay)], step=step, image_id=image_id, timeout=120)


def convert(src: Path, src_fmt: str, dst: Path, dst_fmt: str, *, image_id: str | None, step: str,
            progress: Callable[[float], None] | None = None, timeout: float = 24 * 3600) -> None:
    argv = [QEMU_IMG, "convert", "-p", "-f", src_fmt, "-O", dst_fmt]
    if dst_fmt == "raw":
        argv += ["-S", "4k"]  # keep zero areas as holes
    argv += [str(src), str(dst)]

    def on_out(chunk: str) -> None:
        m = _PROGRESS_RE.search(chunk)
        if m and progress:
            progress(float(m.group(1)))

    run(argv, step=step, image_id=image_id, timeout=timeout, on_stdout=on_out)


def compare(a: Path, a_fmt: str, b: Path, b_fmt: str, *, image_id: str | None, step: str,
            timeout: float = 24 * 3600) -> None:
    r = run([QEMU_IMG, "compare", "-f", a_fmt, "-F", b_fmt, str(a), str(b)], step=step,
            image_id=image_id, timeout=timeout, check=False)
    if r.returncode != 0:
        raise ToolError(f"verification failed: {b} differs from {a}: {r.stdout.strip() or r.stderr.strip()}",
                        tool="qemu-img", argv=r.argv, returncode=r.returncode, stderr=r.stderr,
                        image_id=image_id, step=step)


def _overlay_opts(overlay: Path, base: Path, base_fmt: str, prefix: str = "") -> str:
    """``--image-opts`` for ``overlay`` (qcow2) read over ``base`` instead of its recorded backing file
    (every key under ``prefix``, for a view stacked on it)."""
    def esc(p: Path) -> str:
        return str(p.absolute()).replace(",", ",,")

    p = prefix
    return (f"{p}driver=qcow2,{p}file.driver=file,{p}file.filename={esc(overlay)},"
            f"{p}backing.driver={base_fmt},{p}backing.file.driver=file,{p}backing.file.filename={esc(base)}")


def commit_onto(overlay: Path, base: Path, base_fmt: str, *, image_id: str | None, step: str,
                progress: Callable[[float], None] | None = None, timeout: float = 24 * 3600) -> None:
    """Write the clusters of ``overlay`` into ``base`` (taken as its backing file). ``-d``: the overlay
    itself is left as it was."""
    def on_out(chunk: str) -> None:
        m = _PROGRESS_RE.search(chunk)
        if m and progress:
            progress(float(m.group(1)))

    run([QEMU_IMG, "commit", "-p", "-d", "--image-opts", _overlay_opts(overlay, base, base_fmt)],
        step=step, image_id=image_id, timeout=timeout, on_stdout=on_out)


#: ranges of an overlay closer than this are compared as one. 0: only touching ranges are merged — a
#: merged range would also cover clusters the overlay does not hold, and there ``qemu-img compare`` reads
#: the raw view of the overlay as unallocated (= zeros: the view hides the overlay's backing file) while
#: the disk has data, a false mismatch (seen on an adopted .gho whose overlay has zero clusters)
COMPARE_GAP = 0


def own_ranges(overlay: Path, *, image_id: str | None, step: str,
               gap: int = COMPARE_GAP) -> list[tuple[int, int]]:
    """(start, length) of the guest ranges the qcow2 ``overlay`` itself holds (``qemu-img map`` with its
    backing cut off), ranges less than ``gap`` apart merged."""
    spec = json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(overlay.absolute())},
                       "backing": None})
    out = run([QEMU_IMG, "map", "--output=json", f"json:{spec}"], step=step,
              image_id=image_id, timeout=600).stdout
    merged: list[tuple[int, int]] = []
    for e in json.loads(out):
        if not e.get("present"):
            continue
        s, n = int(e["start"]), int(e["length"])
        if merged and s - (merged[-1][0] + merged[-1][1]) < gap:
            merged[-1] = (merged[-1][0], s + n - merged[-1][0])
        else:
            merged.append((s, n))
    return merged


def compare_onto(overlay: Path, base: Path, base_fmt: str, *, image_id: str | None, step: str,
                 timeout: float = 24 * 3600) -> int:
    """Fail unless ``overlay`` read over ``base`` equals ``base`` (after :func:`commit_onto`); returns the
    bytes compared.

    Only the overlay's own clusters (:func:`own_ranges`) are compared: everywhere else the overlay reads
    ``base`` itself, so those bytes are equal by construction and re-reading them (the whole disk, twice)
    checks nothing. Each range is compared through raw views (``offset``/``size``) of both sides.
    """
    b = str(base.absolute()).replace(",", ",,")
    done = 0
    for start, length in own_ranges(overlay, image_id=image_id, step=step):
        view = f"driver=raw,offset={start},size={length}"
        over = f"{view},{_overlay_opts(overlay, base, base_fmt, 'file.')}"
        r = run([QEMU_IMG, "compare", "--image-opts", over,
                 f"{view},file.driver={base_fmt},file.file.driver=file,file.file.filename={b}"], step=step,
                image_id=image_id, timeout=timeout, check=False)
        if r.returncode != 0:
            said = (r.stdout.strip() or r.stderr.strip()).replace("offset ", f"offset {start} + ", 1)
            raise ToolError(f"verification failed: {base} differs from {overlay} committed into it: {said}",
                            tool="qemu-img", argv=r.argv, returncode=r.returncode, stderr=r.stderr,
                            image_id=image_id, step=step)
        done += length
    return done


def needed_bytes(path: Path, fmt: str, *, image_id: str | None, step: str) -> int:
    """The bytes a copy of ``path`` needs at most on the output's filesystem (its allocated size)."""
    data = info(path, image_id=image_id, step=step, fmt=fmt)
    return int(data.get("actual-size") or 0)
