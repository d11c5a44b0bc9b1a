# ruff: noqa: E501 - messages and case descriptions read better on one line
"""Seeded hostile NTFS file-aware images: what the format gives twice, made to disagree (docs/safety.md).

Built on :mod:`tests.support.gho_ntfs_writer` (real mkntfs volumes, compression none, framed) and run
through ``gho extract`` like :mod:`tests.support.fuzz_gho` (a forked child, one line, no traceback).
Every case is an inconsistent image, so exit 0 is a failure ("silent wrong volume"). Classes:

* ``ntfs-twice``: one record's run LCN, in-use flag or data size changed in its stored copy or in the
  ``$MFT`` data, not in the other;
* ``ntfs-free-space``: ``$Bitmap`` stored; a run moved into clusters it marks free (copy and ``$MFT``
  changed alike, or the copy alone);
* ``ntfs-chain-start``: two NTFS partitions; the metadata area's closing checksum packet of the first
  loses its first or last byte (the chain-start scan must not cross the next partition header);
* ``ntfs-geometry``: total sectors changed in the metadata-area boot sector, or in it and in the boot
  sector stored at LCN 0 alike (partition 2 would move).

``python -m tests.support.fuzz_ntfs [--cases N] [--seed S]`` prints cases and failures per class.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.support.fuzz_gho import run_cli

CLASSES = ("ntfs-twice", "ntfs-free-space", "ntfs-chain-start", "ntfs-geometry")
STRIDE = 512


def _fill(m: Path) -> None:
    rnd = random.Random(3)
    for i in range(12):
        (m / f"file{i:02d}.bin").write_bytes(rnd.randbytes(rnd.choice([5000, 20000, 70000])))
    (m / "dir").mkdir()
    (m / "dir" / "inner.txt").write_text("inner\n" * 3000)


@dataclass
class Base:
    vol: Path
    image: bytes
    name: str


def build_bases(folder: Path) -> dict[str, Base]:
    from tests.support.gho_ntfs_writer import NtfsOptions, Part, make_volume, write_ntfs_image

    v1 = make_volume(folder / "v1.img", 12, fill=_fill, label="ONE")
    v2 = make_volume(folder / "v2.img", 12, hidden=24576 + 63, fill=_fill, label="TWO")
    out: dict[str, Base] = {}
    for name, parts in (
        ("one", [Part("ntfs", v1)]),
        ("bitmap", [Part("ntfs", v1, NtfsOptions(omit=lambda r, t, a, f: t == 0x80 and not a and r == 1))]),
        ("two", [Part("ntfs", v1), Part("ntfs", v2)]),
    ):
        path = folder / f"{name}.gho"
        write_ntfs_image(path, parts, "none")
        out[name] = Base(v1, path.read_bytes(), name)
    return out


def _attrs(rec: bytes) -> list[tuple[int, int, int]]:
    """(type, attribute offset, mapping-pairs offset) of the non-resident attributes of a fixed-up record."""
    out = []
    pos = struct.unpack_from("<H", rec, 0x14)[0]
    while pos + 16 <= len(rec):
        t, ln = struct.unpack_from("<II", rec, pos)
        if t == 0xFFFFFFFF or ln < 16:
            break
        if rec[pos + 8]:
            out.append((t, pos, pos + struct.unpack_from("<H", rec, pos + 0x20)[0]))
        pos += ln
    return out


def _safe(off: int) -> bool:
    return off % STRIDE not in (STRIDE - 2, STRIDE - 1)  # the update sequence owns those bytes


def _records(vol: Path) -> tuple[list[tuple[int, bytes, bytes]], int, int]:
    """(n, raw, fixed) of in-use records with non-resident attributes; record size; cluster size."""
    from tests.support.gho_ntfs_writer import NtfsSource

    src = NtfsSource(vol)
    try:
        out = []
        for n in range(src.nrec):
            raw = bytes(src.record(n))
            if raw[:4] != b"FILE":
                continue
            fixed = src.fixup(raw)
            if struct.unpack_from("<H", fixed, 0x16)[0] & 1 and _attrs(fixed) and n not in (0, 8):
                out.append((n, raw, fixed))
        return out, src.rs, src.k
    finally:
        src.close()


def _free_range(vol: Path, count: int, limit: int) -> int | None:
    """A run of ``count`` clusters the volume's $Bitmap marks free, below ``limit``."""
    from tests.support.gho_ntfs_writer import NtfsSource

    src = NtfsSource(vol)
    try:
        rec6 = src.fixup(bytes(src.record(6)))
        data = [a for a in src.attrs(rec6) if a["type"] == 0x80][0]
        bits = b"".join(bytes(src.clusters(lcn, c)) for c, lcn in data["runs"] if lcn is not None)
        clusters = src.total * src.bps // src.k
        run = 0
        for c in range(min(clusters, limit)):
            run = run + 1 if not bits[c // 8] >> (c % 8) & 1 else 0
            if run == count:
                return c - count + 1
        return None
    finally:
        src.close()


def _both(img: bytes, raw: bytes) -> tuple[int, int] | None:
    """Offsets of a record in the $MFT data (first) and as its stored copy (second)."""
    a = img.find(raw)
    b = img.find(raw, a + 1) if a >= 0 else -1
    return (a, b) if a >= 0 and b >= 0 else None


def make_case(rnd: random.Random, klass: str, bases: dict[str, Base]) -> tuple[str, bytes]:
    if klass in ("ntfs-twice", "ntfs-free-space"):
        base = bases["one" if klass == "ntfs-twice" else "bitmap"]
        recs, _rs, _k = _records(base.vol)
        img = bytearray(base.image)
        for _ in range(50):
            n, raw, fixed = rnd.choice(recs)
            where = _both(base.image, raw)
            if where is None:
                continue
            t, apos, mp = rnd.choice(_attrs(fixed))
            h = fixed[mp]
            ln_b, off_b = h & 15, h >> 4
            if klass == "ntfs-twice":
                what = rnd.choice(["lcn", "in-use", "size"] if off_b else ["in-use", "size"])
                target = rnd.choice(["copy", "$MFT"])
                at = where[1] if target == "copy" else where[0]
                if what == "lcn":
                    off = mp + 1 + ln_b
                    delta = rnd.choice([1, 2, 7, 16, 100])
                elif what == "in-use":
                    off, delta = 0x16, 1
                else:
                    off, delta = apos + 0x30 + rnd.randrange(3), rnd.choice([1, 8, 64])
                if not _safe(off):
                    continue
                img[at + off] = (img[at + off] + delta) % 256 if what != "in-use" else img[at + off] ^ 1
                return f"record {n} attribute 0x{t:x} {what} changed in the {target}", bytes(img)
            if not off_b:
                continue
            count = int.from_bytes(fixed[mp + 1:mp + 1 + ln_b], "little")
            new = _free_range(base.vol, count, 1 << (8 * off_b - 1))
            if new is None or not all(_safe(mp + 1 + ln_b + i) for i in range(off_b)):
                continue
            targets = rnd.choice([("copy",), ("copy", "$MFT")])
            for tg in targets:
                at = where[1] if tg == "copy" else where[0]
                img[at + mp + 1 + ln_b:at + mp + 1 + ln_b + off_b] = new.to_bytes(off_b, "little", signed=True)
            return (f"record {n} attribute 0x{t:x} first run moved to free LCN {new} in the {' and '.join(targets)}",
                    bytes(img))
        raise RuntimeError("no record to mutate")
    if klass == "ntfs-chain-start":
        img = bytearray(bases["two"].image)
        boot = img.find(b"NTFS    ") - 3
        chk = img.find(b"\x0a", boot + 512)
        while img[chk + 9] != 0x0B:
            chk = img.find(b"\x0a", chk + 1)
        which = rnd.choice([0, 9])
        img[chk + which] ^= rnd.choice([1, 0x40, 0xFF])
        return f"metadata checksum packet of partition 1: byte {which} changed", bytes(img)
    img = bytearray(bases["two" if rnd.random() < 0.5 else "one"].image)
    boot = img.find(b"NTFS    ") - 3
    total = struct.unpack_from("<Q", img, boot + 0x28)[0]
    both = rnd.random() < 0.5
    # alike in both copies, a change within the last cluster contradicts nothing the image holds
    # (docs/safety.md, what cannot be detected): only larger ones are cases there
    new = max(1, total + rnd.choice([4096, total // 2, -(total // 2), total] if both else
                                    [-1, 1, 8, 4096, total // 2, -(total // 2), total]))
    struct.pack_into("<Q", img, boot + 0x28, new)
    if both:  # the $Boot data at LCN 0 too: its first sector equals the metadata copy
        orig = bytes(bases["one"].image[boot:boot + 512])
        at = bytes(img).find(orig, boot + 512)
        if at >= 0:
            struct.pack_into("<Q", img, at + 0x28, new)
    return f"total sectors {total} -> {new} in the metadata copy{' and at LCN 0' if both else ''}", bytes(img)


def run(seed: int, n: int, verbose: bool = False) -> tuple[Counter[str], Counter[str], list[str]]:
    import pipeline.app.cli  # noqa: F401  the forked children start warm

    rnd = random.Random(seed)
    per: Counter[str] = Counter()
    fails: Counter[str] = Counter()
    notes: list[str] = []
    base_dir = Path(tempfile.mkdtemp(prefix="ntfs-fuzz-"))
    try:
        bases = build_bases(base_dir)
        for k in range(n):
            klass = CLASSES[k % len(CLASSES)]
            what, data = make_case(rnd, klass, bases)
            work = base_dir / f"c{k}"
            work.mkdir()
            src = work / "IMG.GHO"
            src.write_bytes(data)
            argv = ["gho", "extract", str(src), str(work / "disk.raw"), "--quiet"]
            if rnd.random() < 0.5:
                argv.append("--strict")
            o = run_cli(argv, work)
            lines = [ln for ln in o.stderr.splitlines() if ln.strip()]
            problem = None
            if o.rc is None:
                problem = "hang"
            elif "Traceback" in o.stderr:
                problem = "traceback"
            elif o.rc == 0:
                problem = "silent wrong volume (exit 0)"
            elif len(lines) != 1:
                problem = f"{len(lines)} lines on stderr"
            elif (work / "disk.raw").exists():
                problem = "output left after a refusal"
            per[klass] += 1
            if problem:
                fails[klass] += 1
                notes.append(f"#{k} {klass} [{what}] {'strict' if '--strict' in argv else ''}: {problem} :: "
                             f"{(lines or [''])[-1][:200]}")
                if verbose:
                    print(notes[-1], flush=True)
            shutil.rmtree(work)
    finally:
        shutil.rmtree(base_dir, ignore_errors=True)
    return per, fails, notes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=int(os.environ.get("NTFS_FUZZ_CASES", "80")))
    ap.add_argument("--seed", type=int, default=int(os.environ.get("NTFS_FUZZ_SEED", "26")))
    ap.add_argument("-v", "--verbose", action="store_true")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    per, fails, notes = run(a.seed, a.cases, a.verbose)
    for line in notes[:40]:
        print(line)
    print(f"{sum(per.values())} cases, {sum(fails.values())} failing, {time.monotonic() - t0:.0f} s")
    for k in CLASSES:
        print(f"  {k:18s} {per[k]:4d} cases  {fails[k]:4d} failing")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
