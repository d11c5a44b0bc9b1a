"""Benchmark of the native GHO reader.

Run from the repo root: ``.venv/bin/python -m bench.bench_gho`` (about a minute on 2 cores; needs
~1.2 GiB free, sparse).

* High (zlib) block decode throughput vs stdlib ``zlib.decompress`` on the same blocks, same run.
* Fast block decode throughput: the C extension (pipeline.gho._native, built at install) and pure Python.
* End-to-end ``extract`` of synthetic sector images made with the test writer
  (``tests/support/gho_writer.py``) in a child process: wall time, output MB/s and peak RSS
  (``ru_maxrss``), for a small and a ≥ 1 GiB image, to show memory does not grow with image size.
  Files go to ``var/bench/`` and are deleted.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import time
import zlib
from pathlib import Path

from pipeline.gho.codecs import BlockDecoder, fast_decode
from pipeline.gho.native import fast_decoder
from tests.support import gho_writer as gw

ROOT = Path(__file__).resolve().parents[1]

BLOCK = 32768
MB = 1e6


def corpus(nbytes: int) -> list[bytes]:
    """Real-world bytes (Python sources and shared libraries), cut into 32 KiB blocks."""
    lib = sysconfig.get_paths()["stdlib"]
    names = sorted(glob.glob(f"{lib}/**/*.py", recursive=True))[:400]
    names += sorted(glob.glob(f"{lib}/lib-dynload/*.so"))[:40]
    buf = bytearray()
    k = 0
    while len(buf) < nbytes:
        with open(names[k % len(names)], "rb") as f:
            buf += f.read()
        k += 1
    return [bytes(buf[i:i + BLOCK]) for i in range(0, nbytes, BLOCK)]


def best_of(n: int, fn) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_high(rows: list[tuple[str, str, str]]) -> None:
    blocks = corpus(32 << 20)
    payloads = [zlib.compress(b, 6) for b in blocks]
    total = sum(map(len, blocks))
    dec = BlockDecoder(3)

    def ours() -> None:
        for p in payloads:
            dec.decode(p, BLOCK)

    def stdlib() -> None:
        for p in payloads:
            zlib.decompress(p)

    t_std = best_of(3, stdlib)
    t_ours = best_of(3, ours)
    rows.append(("High: stdlib zlib.decompress", f"{total / t_std / MB:.0f} MB/s", "reference"))
    rows.append(("High: BlockDecoder (zlib, checked)", f"{total / t_ours / MB:.0f} MB/s",
                 f"{t_std / t_ours:.2f}x stdlib (goal >= 0.5x)"))


def bench_fast(rows: list[tuple[str, str, str]]) -> None:
    blocks = corpus(2 << 20)
    t = time.perf_counter()
    payloads = [gw.fast_encode(b) for b in blocks]
    enc = time.perf_counter() - t
    total = sum(map(len, blocks))
    ratio = sum(map(len, payloads)) / total
    native = fast_decoder()
    if native is not None:
        nat = native

        def run_native() -> None:
            for p in payloads:
                nat(p, BLOCK)

        t_n = best_of(3, run_native)
        rows.append(("Fast: C extension (pipeline.gho._native)", f"{total / t_n / MB:.0f} MB/s",
                     f"goal >= 50 MB/s; ratio {ratio:.2f}"))
    else:
        rows.append(("Fast: C extension (pipeline.gho._native)", "n/a", "extension not built (make venv)"))

    def run_py() -> None:
        for p in payloads:
            fast_decode(p, BLOCK)

    t_p = best_of(1, run_py)
    rows.append(("Fast: pure Python fallback", f"{total / t_p / MB:.1f} MB/s", "distinct data blocks"))
    mix = [b if k % 4 == 0 else bytes(BLOCK) for k, b in enumerate(blocks)]  # 3/4 free space
    mix_p = [gw.fast_encode(b) if k % 4 == 0 else gw.fast_encode(bytes(BLOCK)) for k, b in enumerate(blocks)]
    dec = BlockDecoder(2, native=False)
    t = time.perf_counter()
    for p in mix_p:
        dec.decode(p, BLOCK)
    t_m = time.perf_counter() - t
    rows.append(("Fast: pure Python, disk-like mix", f"{sum(map(len, mix)) / t_m / MB:.1f} MB/s",
                 "1/4 data, 3/4 zero blocks (cached)"))
    rows.append(("(test writer Fast encoder)", f"{total / enc / MB:.1f} MB/s", "pure Python, tests only"))


def make_sector_image(path: Path, disk_bytes: int, data_blocks: list[bytes]) -> None:
    start = 2048
    sectors = disk_bytes // 512 - start
    w = gw.ImageWriter(path, "high")
    w.track0(gw.mbr([(0x83, start, sectors)]) + bytes(start * 512 - 512))
    zero = bytes(BLOCK)

    def blocks():  # type: ignore[no-untyped-def]
        for k in range(sectors * 512 // BLOCK):
            yield data_blocks[(k // 8) % len(data_blocks)] if k % 8 == 0 else zero

    w.sector_partition(blocks())
    w.close()


CHILD = """
import sys, time
from pipeline.gho import extract
if sys.argv[1] == "-":
    print(0, 0, 0)
    raise SystemExit(0)
t = time.perf_counter()
r = extract(sys.argv[1], sys.argv[2])
print(time.perf_counter() - t, r.disk_size, r.bytes_written)
"""


def run_child(args: list[str], log: Path) -> tuple[str, int]:
    """Run the extract child with posix_spawn (vfork-style: the child's peak RSS is its own, not a copy
    of this process) and return (its stdout, its ru_maxrss in KiB)."""
    actions = [(os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)]
    pid = os.posix_spawn(sys.executable, [sys.executable, "-c", CHILD, *args], os.environ,
                         file_actions=actions)
    _pid, status, ru = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"extract child failed with status {status}")
    return log.read_text(), ru.ru_maxrss


def bench_extract(rows: list[tuple[str, str, str]], work: Path) -> None:
    _out, base = run_child(["-", "-"], work / "child.log")
    rows.append(("python + import pipeline.gho only", "", f"peak RSS {base / 1024:.0f} MiB (baseline)"))
    data = corpus(200 * BLOCK)
    for label, size in (("128 MiB", 128 << 20), ("1 GiB", 1 << 30)):
        img = work / "SYN.GHO"
        out = work / "syn.raw"
        make_sector_image(img, size, data)
        line, maxrss = run_child([str(img), str(out)], work / "child.log")
        secs, disk, written = line.split()
        rows.append((f"extract sector High, {label} disk", f"{int(disk) / float(secs) / MB:.0f} MB/s",
                     f"peak RSS {maxrss / 1024:.0f} MiB; image {img.stat().st_size / MB:.0f} MB, "
                     f"{int(written) / MB:.0f} MB data written, {float(secs):.1f} s"))
        img.unlink()
        out.unlink()


NTFS_MAKER = """
import sys
from pathlib import Path
from bench import bench_gho
from tests.support import gho_ntfs_writer as nw
work = Path(sys.argv[1])
chunk = b"".join(bench_gho.corpus(200 * bench_gho.BLOCK))  # ~6.5 MB of real-world bytes

def fill(m):
    for k in range(92):
        (m / f"file{k:03d}.bin").write_bytes(chunk[k % 7:] + chunk[:k % 7])

vol = nw.make_volume(work / "ntfs.img", 1024, fill=fill, label="BENCH")
nw.write_ntfs_image(work / "NTFS.GHO", [nw.Part("ntfs", vol)], "high")
vol.unlink()
"""


def bench_ntfs(rows: list[tuple[str, str, str]], work: Path) -> None:
    """A 1 GiB NTFS volume (mkntfs, ~600 MB of files through ntfs-3g) as an NTFS file-aware High image.

    The image is made in a separate process: a child spawned from a big parent inherits its peak RSS.
    """
    if not (shutil.which("mkntfs") and shutil.which("ntfs-3g") and os.path.exists("/dev/fuse")):
        rows.append(("extract NTFS file-aware", "skipped", "needs mkntfs, ntfs-3g and FUSE"))
        return
    import subprocess

    subprocess.run([sys.executable, "-c", NTFS_MAKER, str(work)], check=True, cwd=ROOT)
    img = work / "NTFS.GHO"
    out = work / "ntfs.raw"
    line, maxrss = run_child([str(img), str(out)], work / "child.log")
    secs, disk, written = line.split()
    rows.append(("extract NTFS file-aware High, 1 GiB volume", f"{int(disk) / float(secs) / MB:.0f} MB/s",
                 f"peak RSS {maxrss / 1024:.0f} MiB; image {img.stat().st_size / MB:.0f} MB, "
                 f"{int(written) / MB:.0f} MB data written ({int(written) / float(secs) / MB:.0f} MB/s), "
                 f"{float(secs):.1f} s"))
    img.unlink()
    out.unlink()


def main() -> int:
    work = ROOT / "var" / "bench" / "gho"  # its own folder: the other benches cache sources in var/bench
    work.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, str]] = []
    t0 = time.perf_counter()
    try:
        bench_extract(rows, work)  # first, while this process is small
        bench_ntfs(rows, work)
        bench_high(rows)
        bench_fast(rows)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    print(f"{'measure':<{w0}}  {'output':>{w1}}  notes")
    print("-" * (w0 + w1 + 40))
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:>{w1}}  {c}")
    print(f"(total {time.perf_counter() - t0:.0f} s, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")
    from bench.common import emit, row

    cmd = ".venv/bin/python bench/bench_gho.py"
    out = []
    for a, b, c in rows:
        goal = c.split("goal ", 1)[1].split(";")[0].rstrip(")") if "goal " in c else ""
        out.append(row(a, f"{b} ({c})" if c else b, goal, None, cmd))
    emit("gho", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
