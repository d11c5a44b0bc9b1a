"""Opening an image: spans, header, password, layout, and the per-section readers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.gho.bootsector import detect_fs
from pipeline.gho.codecs import BlockDecoder
from pipeline.gho.crypto import seed_from_password, verifier_ok
from pipeline.gho.errors import MAX_SECTIONS, Advisories, GhoError
from pipeline.gho.fat import FatSection
from pipeline.gho.header import (
    HEADER_SIZE,
    SUBTYPE_EXT,
    SUBTYPE_FAT,
    SUBTYPE_NTFS,
    FileHeader,
    parse_file_header,
)
from pipeline.gho.ntfs import NtfsSection, section_reader
from pipeline.gho.pool import default_threads
from pipeline.gho.records import Layout, Walker
from pipeline.gho.sector import SectorSection, decode_track0
from pipeline.gho.spans import find_spans, is_regular, read_head, resolve_first
from pipeline.gho.stream import SpanStream

EXT_UNSUPPORTED = "ext2/ext3 file-aware GHO not supported yet"


def generation(descriptor_size: int) -> str:
    """§2.1: a 0x800-byte descriptor area is 7.5-style, a larger one 11.x-style (a guess)."""
    return "7.5" if descriptor_size <= 0x800 else "11.x"


@dataclass
class Volume:
    index: int
    kind: str
    offset: int
    reader: FatSection | SectorSection | NtfsSection | None
    fs: str | None = None
    label: str | None = None
    hidden_sectors: int | None = None
    size: int | None = None
    notes: list[str] = field(default_factory=list)


class Image:
    """An opened image; use as a context manager."""

    def __init__(self, path: str | Path, *, strict: bool = False, threads: int | None = None,
                 listing: dict[str, Path] | None = None) -> None:
        """``threads``: blocks decoded at once while writing (None: every CPU this process may use);
        ``listing``: the folder's files by name, when the caller has listed it already (scan)."""
        p = Path(path)
        if not p.exists():
            raise GhoError(f"{p}: no such file")
        if not is_regular(p):
            raise GhoError(f"{p}: not a regular file")
        if not os.access(p, os.R_OK):
            raise GhoError(f"{p.name}: cannot read: permission denied")
        head = read_head(p)
        if len(head) >= 3 and head[0:2] == b"\xfe\xef" and head[2] == 0x09:
            first = resolve_first(p)
            if first is None:
                raise GhoError(f"{p.name}: is a span continuation file (.GHS) and its first file (.GHO) "
                               "was not found next to it")
            p, head = first, read_head(first)
        self.path = p
        #: advisory mismatches (warnings, or refusals with ``strict``) of the whole image
        self.advisories = Advisories(strict)
        self.header: FileHeader = parse_file_header(head, p.name)
        self.spans = find_spans(p, listing if p.parent == Path(path).parent else None)
        self.stream = SpanStream(p, self.spans)
        self.walker = Walker(self.stream, self.header)
        self.walker.threads = default_threads() if threads is None else max(1, threads)
        self.seed: int | None = None
        self._layout: Layout | None = None
        self.volumes_cache: list[Volume] = []

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> Image:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def name(self) -> str:
        return self.path.name

    def unlock(self, password: str | None) -> None:
        """Check ``password`` against the header verifier (§9.3); no-op for unprotected images."""
        if not self.header.password:
            return
        if password is None or password == "":
            raise GhoError(f"{self.name}: image is password-protected; a password is required")
        seed = seed_from_password(password)
        if not verifier_ok(self.header.raw, seed):
            raise GhoError(f"{self.name}: wrong password (the header verifier does not decrypt to "
                           "'BinaryResearch')")
        self.seed = seed
        self.walker.seed = seed

    @property
    def layout(self) -> Layout:
        if self._layout is None:
            self._layout = self.walker.scan()
            self._check_part_headers(self._layout)
        return self._layout

    def _check_part_headers(self, layout: Layout) -> None:
        """Each partition header repeats the file header (§5.1): fields that select how the image is read
        must match (refusal); any other differing byte is an advisory mismatch."""
        if len(layout.sections) > MAX_SECTIONS:
            raise GhoError(f"{self.name}: {len(layout.sections)} partition sections, at most {MAX_SECTIONS} "
                           "are supported")
        fh = self.header.raw
        for sec in layout.sections:
            ph = self.stream.read(sec.header_offset, HEADER_SIZE, "a partition header")
            where = f"{self.name}: partition {sec.index + 1} header at offset {sec.header_offset}"
            for off, ln, what in ((0x0A, 1, "image type"), (0x0B, 1, "password flag"),
                                  (0x0C, 15, "password verifier"), (0x1B, 10, "stored password")):
                if ph[off:off + ln] != fh[off:off + ln]:
                    raise GhoError(f"{where}: {what} (byte 0x{off:02x}) is {ph[off:off + ln].hex()}, "
                                   f"the file header says {fh[off:off + ln].hex()}")
            diff = [k for k in range(HEADER_SIZE) if k not in (0x02, 0x43) and ph[k] != fh[k]]
            if diff:
                k = diff[0]
                self.advisories.add(f"{where}: byte 0x{k:02x} is 0x{ph[k]:02x}, the file header has "
                                    f"0x{fh[k]:02x} ({len(diff)} bytes differ from the file header)")

    @property
    def locked(self) -> bool:
        return self.header.password and self.seed is None

    def decoder(self) -> BlockDecoder:
        return BlockDecoder(self.header.compression)

    def track0(self) -> bytes:
        return decode_track0(self.walker, self.layout, self.decoder(), self.seed)

    def volumes(self, parse: bool = True) -> list[Volume]:
        """One :class:`Volume` per section; FAT sections are parsed (pass 1) unless locked."""
        out = []
        self.walker.slots = 0
        for sec in self.layout.sections:
            v = Volume(sec.index, sec.kind, sec.header_offset, None)
            if sec.subtype == SUBTYPE_FAT:
                v.kind = "fat"
                if self.locked:
                    v.notes.append("encrypted: give the password to list its contents")
                elif parse:
                    fs = FatSection(self.walker, sec, self.decoder(), self.seed, self.advisories)
                    fs.parse()
                    g = fs.geometry
                    assert g is not None
                    v.reader, v.fs, v.label = fs, g.fs_name, fs.label
                    v.hidden_sectors, v.size = g.hidden_sectors, g.size
            elif sec.subtype == SUBTYPE_NTFS:
                v.fs = "NTFS"
                if sec.ntfs.locked:
                    v.notes.append("encrypted: give the password to list its contents")
                else:
                    nt = section_reader(self.walker, sec, self.decoder(), self.seed)
                    v.reader, v.hidden_sectors, v.size = nt, nt.hidden_sectors, nt.size
            elif sec.subtype == SUBTYPE_EXT:
                v.fs = "ext2/3"
                v.notes.append(EXT_UNSUPPORTED)
            else:
                ss = SectorSection(self.walker, sec, self.decoder(), self.seed)
                v.reader = ss
                if not (self.locked and sec.raw):
                    boot = ss.boot_sector()
                    v.fs, _fs_size, v.label = detect_fs(boot)
                    if v.fs and v.fs.startswith("FAT") or v.fs == "NTFS":
                        v.hidden_sectors = int.from_bytes(boot[28:32], "little")
                    v.size = ss.size()
            out.append(v)
        return out
