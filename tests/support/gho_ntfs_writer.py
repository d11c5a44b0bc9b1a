"""Test-only WRITER of NTFS file-aware Ghost sections, written from docs/gho-format.md §11 (never shipped).

It takes a real NTFS volume (made by mkntfs, filled through ntfs-3g), walks its $MFT in record order
and emits the partition header, a metadata area (filler, the boot sector, filler, a checksum packet)
and the packet stream of §11.4 cut into blocks, with the options of the §11.10 validation plan.
The NTFS parsing here is deliberately separate from the reader's.
"""

from __future__ import annotations

import contextlib
import mmap
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.gho_writer import ImageWriter, encrypt, with_subtype, write_fat_section

PIECE = 32768
ESCAPE = b"\x01\x00\x00\x00"


def id_packet(ident: int, value: int) -> bytes:
    return b"\x0e" + struct.pack("<H", ident) + bytes(4) + struct.pack("<Q", value) + b"\x0f"


def len_packet(value: int) -> bytes:
    return b"\x0f" + struct.pack("<I", value) + bytes(4) + b"\x0e"


def chk_packet(n: int) -> bytes:
    return b"\x0a" + struct.pack("<Q", (n * 0x9E3779B97F4A7C15) & (2**64 - 1)) + b"\x0b"


def default_omit(record: int, atype: int, aname: str, fname: str | None) -> bool:
    """What rusty-backup saw Ghost leave out (§11.5): $MFTMirr and $Bitmap data, page/hibernation files."""
    if atype != 0x80 or aname:
        return False
    return record in (1, 6) or (fname or "").lower() in ("pagefile.sys", "hiberfil.sys")


@dataclass
class NtfsOptions:
    framed: bool = True  # compression none: [u16 len] framing, or a raw packet stream
    #: with a password: "a" = one cipher unit per block payload, "b" = 32 KiB units (raw), "c" = clear
    cipher: str = "a"
    #: "none" | "groups" (after every group and 0x8040) | "pieces" (also after every data piece)
    chk: str = "groups"
    free: str = "skip"  # free FILE records: "skip" | "8008"
    cut: list[int] | None = None  # None: one packet or piece per block; else cut the stream by these sizes
    stored_every: int = 0  # every n-th block as a stored block (01 00 00 00 + data)
    omit: Callable[[int, int, str, str | None], bool] = default_omit
    corrupt_copies: set[int] = field(default_factory=set)  # copies written with a broken update sequence
    fixed_form: bool = False  # record copies with the update sequence applied
    unknown_after: int | None = None  # announce the record after this one with id 0x8080
    repeat: dict[int, int] = field(default_factory=dict)  # announce record n again, its data all this byte


class NtfsSource:
    """Just enough NTFS to walk a volume's $MFT (on-disk facts of docs/gho-format.md §11.2 and §11.5)."""

    def __init__(self, path: Path) -> None:
        self.f = open(path, "rb")  # noqa: SIM115
        self.v = mmap.mmap(self.f.fileno(), 0, access=mmap.ACCESS_READ)
        b = self.v[:512]
        self.bps = struct.unpack_from("<H", b, 11)[0]
        self.k = self.bps * b[13]
        self.total = struct.unpack_from("<Q", b, 0x28)[0]
        mft_lcn = struct.unpack_from("<Q", b, 0x30)[0]
        c = struct.unpack_from("<b", b, 0x40)[0]
        self.rs = 1 << -c if c < 0 else c * self.k
        rec0 = self.fixup(self.v[mft_lcn * self.k:mft_lcn * self.k + self.rs])
        data = [a for a in self.attrs(rec0) if a["type"] == 0x80][0]
        self.mft_runs = data["runs"]
        self.nrec = data["size"] // self.rs
        self.boot = bytes(b)

    def close(self) -> None:
        with contextlib.suppress(BufferError):  # a generator still holds a view; the map goes with it
            self.v.close()
        self.f.close()

    def clusters(self, lcn: int, count: int) -> memoryview:
        return memoryview(self.v)[lcn * self.k:(lcn + count) * self.k]

    def record(self, n: int) -> bytes:
        off = n * self.rs
        out = b""
        vcn = 0
        for count, lcn in self.mft_runs:
            lo, hi = vcn * self.k, (vcn + count) * self.k
            if lo <= off < hi and lcn is not None:
                s = lcn * self.k + off - lo
                out = self.v[s:s + self.rs]
                break
            vcn += count
        return out

    @staticmethod
    def fixup(raw: bytes) -> bytes:
        r = bytearray(raw)
        uo, un = struct.unpack_from("<HH", r, 4)
        for i in range(1, un):
            r[i * 512 - 2:i * 512] = r[uo + 2 * i:uo + 2 * i + 2]
        return bytes(r)

    @staticmethod
    def attrs(rec: bytes) -> list[dict]:
        out = []
        pos = struct.unpack_from("<H", rec, 0x14)[0]
        while pos + 8 <= len(rec):
            t, ln = struct.unpack_from("<II", rec, pos)
            if t == 0xFFFFFFFF or ln == 0:
                break
            nl, no = rec[pos + 9], struct.unpack_from("<H", rec, pos + 10)[0]
            name = rec[pos + no:pos + no + 2 * nl].decode("utf-16-le")
            a: dict = {"type": t, "name": name, "nonres": bool(rec[pos + 8])}
            if a["nonres"]:
                mp = struct.unpack_from("<H", rec, pos + 0x20)[0]
                a["size"] = struct.unpack_from("<Q", rec, pos + 0x30)[0]
                runs = []
                p, lcn = pos + mp, 0
                while rec[p]:
                    h = rec[p]
                    ln_b, off_b = h & 15, h >> 4
                    count = int.from_bytes(rec[p + 1:p + 1 + ln_b], "little")
                    if off_b:
                        lcn += int.from_bytes(rec[p + 1 + ln_b:p + 1 + ln_b + off_b], "little", signed=True)
                        runs.append((count, lcn))
                    else:
                        runs.append((count, None))
                    p += 1 + ln_b + off_b
                a["runs"] = runs
            else:
                vl, vo = struct.unpack_from("<IH", rec, pos + 0x10)
                a["value"] = rec[pos + vo:pos + vo + vl]
            out.append(a)
            pos += ln
        return out

    def file_name(self, rec: bytes) -> str | None:
        for a in self.attrs(rec):
            if a["type"] == 0x30 and not a["nonres"]:
                v = a["value"]
                return v[66:66 + 2 * v[64]].decode("utf-16-le")
        return None


def packet_units(src: NtfsSource, opts: NtfsOptions, omitted: list[tuple[int, int, int]]) -> Iterator[bytes]:
    """The packet stream of §11.4 as units: every packet, record copy and data piece on its own."""
    nchk = 0
    for i, n in enumerate([*range(src.nrec), *opts.repeat]):
        again = i >= src.nrec  # the second announcement of a record (§11.10 case 10)
        raw = src.record(n)
        if len(raw) < src.rs or raw[:4] != b"FILE":
            continue
        fixed = src.fixup(raw)
        in_use = struct.unpack_from("<H", fixed, 0x16)[0] & 1
        if not in_use:
            if opts.free == "8008":
                yield id_packet(0x8008, n)
                yield len_packet(src.rs)
                yield raw
            continue
        rid = 0x8080 if opts.unknown_after is not None and n == opts.unknown_after + 1 else 0x8004
        yield id_packet(rid, n)
        yield len_packet(src.rs)
        copy = fixed if opts.fixed_form else raw
        if n in opts.corrupt_copies:
            uo = struct.unpack_from("<H", copy, 4)[0]
            copy = copy[:uo] + b"\xde\xad" + copy[uo + 2:]
            copy = copy[:510] + b"\xbe\xef" + copy[512:]
        yield copy
        fname = src.file_name(fixed)
        for a in src.attrs(fixed):
            if not a["nonres"]:
                continue
            if opts.omit(n, a["type"], a["name"], fname):
                yield id_packet(0x8040, 0)
                for count, lcn in a["runs"]:
                    if lcn is not None:
                        omitted.append((n, lcn, count))
                if opts.chk != "none":
                    nchk += 1
                    yield chk_packet(nchk)
                continue
            yield id_packet(0x8020, 0)
            for k, (count, lcn) in enumerate(a["runs"]):
                yield id_packet(0x0002, k)
                if lcn is None:
                    continue
                yield len_packet(count)
                data = memoryview(bytes([opts.repeat[n]]) * count * src.k) if again else \
                    src.clusters(lcn, count)
                for p in range(0, len(data), PIECE):
                    yield bytes(data[p:p + PIECE])
                    if opts.chk == "pieces":
                        nchk += 1
                        yield chk_packet(nchk)
                data.release()
        if opts.chk != "none":
            nchk += 1
            yield chk_packet(nchk)


def write_ntfs_section(w: ImageWriter, volume: Path,
                       opts: NtfsOptions | None = None) -> list[tuple[int, int, int]]:
    """Append one subtype-4 section; returns the (record, LCN, count) runs whose data was omitted."""
    opts = opts or NtfsOptions()
    src = NtfsSource(volume)
    omitted: list[tuple[int, int, int]] = []
    try:
        w.raw(with_subtype(w.header, 0x04))
        filler = bytes(((k * 13 + 5) & 0xFF) | 0x80 for k in range(0x600))
        w.raw(filler[:0x200] + src.boot + filler[0x200:] + chk_packet(0))
        units = packet_units(src, opts, omitted)
        raw_none = w.compression == "none" and not opts.framed
        seed = w.seed
        if raw_none:
            buf = bytearray()
            for u in units:
                buf += u
                while len(buf) >= PIECE:
                    unit, buf = bytes(buf[:PIECE]), buf[PIECE:]
                    w.raw(encrypt(unit, seed) if seed is not None and opts.cipher == "b" else unit)
            if buf:
                w.raw(encrypt(bytes(buf), seed) if seed is not None and opts.cipher == "b" else bytes(buf))
            return omitted
        nblock = 0

        def block(data: bytes) -> None:
            nonlocal nblock
            nblock += 1
            if opts.stored_every and nblock > 1 and nblock % opts.stored_every == 0:
                p = ESCAPE + data
            else:
                p = w.payload(data)
                if w.compression == "none" and p[:4] == ESCAPE:
                    p = ESCAPE + p
            if seed is not None and opts.cipher == "a":
                p = encrypt(p, seed)
            w.raw(struct.pack("<H", len(p) + 2) + p)

        if opts.cut is None:
            for u in units:
                block(u)
        else:
            first = next(units)
            block(first)  # the first block is exactly the first ID packet (§11.2)
            buf = bytearray()
            sizes = opts.cut
            i = 0
            for u in units:
                buf += u
                while len(buf) >= sizes[i % len(sizes)]:
                    s = sizes[i % len(sizes)]
                    block(bytes(buf[:s]))
                    del buf[:s]
                    i += 1
            if buf:
                block(bytes(buf))
        return omitted
    finally:
        src.close()


@dataclass
class Part:
    kind: str  # "ntfs" | "fat"
    path: Path
    opts: NtfsOptions | None = None


def write_ntfs_image(path: Path, parts: list[Part], compression: str, *, password: str | None = None,
                     image_id: int = 0x5EC70004) -> list[list[tuple[int, int, int]]]:
    """A file-aware image (type 0) of NTFS and FAT volumes in disk order; omitted runs per partition."""
    w = ImageWriter(path, compression, password=password, image_type=0, image_id=image_id, descriptor=0x2000)
    out = []
    for p in parts:
        if p.kind == "ntfs":
            out.append(write_ntfs_section(w, p.path, p.opts))
        else:
            write_fat_section(w, p.path.read_bytes())
            out.append([])
    w.close()
    return out


# -- test volumes: mkntfs, filled through an ntfs-3g FUSE mount ------------------------------------
def _run(*argv: str) -> None:
    import subprocess

    subprocess.run(argv, check=True, capture_output=True, timeout=120)


class mounted:  # noqa: N801 - a context manager used like a function
    """``with mounted(volume, mountpoint, ro=False):`` an ntfs-3g FUSE mount."""

    def __init__(self, volume: Path, mnt: Path, ro: bool = False, plain: bool = False) -> None:
        self.volume, self.mnt, self.ro, self.plain = volume, mnt, ro, plain

    def __enter__(self) -> Path:
        self.mnt.mkdir(parents=True, exist_ok=True)
        opts = "ro" if self.ro else "rw" if self.plain else "compression,streams_interface=windows"
        _run("ntfs-3g", "-o", opts, str(self.volume), str(self.mnt))
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        _run("fusermount", "-u", str(self.mnt))


def make_volume(path: Path, mib: int, *, cluster: int = 4096, hidden: int = 63, label: str = "GHOSTNTFS",
                fill: Callable[[Path], None] | None = None,
                plain_fill: Callable[[Path], None] | None = None) -> Path:
    """A fresh NTFS volume of ``mib`` MiB (mkntfs), filled by ``plain_fill(mountpoint)`` through a mount
    without compression support (its allocator fragments files written backwards), then ``fill``."""
    with open(path, "wb") as f:
        f.truncate(mib << 20)
    _run("mkntfs", "-q", "-F", "-f", "-c", str(cluster), "-s", "512", "-p", str(hidden), "-H", "255",
         "-S", "63", "-L", label, str(path))
    if plain_fill is not None:
        with mounted(path, path.with_name(path.name + ".mnt"), plain=True) as m:
            plain_fill(m)
    if fill is not None:
        with mounted(path, path.with_name(path.name + ".mnt")) as m:
            fill(m)
    return path
