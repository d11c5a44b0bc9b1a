"""Sector sections (docs/gho-format.md §8): track 0, block chains, raw uncompressed data."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from pipeline.gho.codecs import HARD_LIMIT, BlockDecoder, CodecError
from pipeline.gho.crypto import decrypt
from pipeline.gho.errors import GhoError
from pipeline.gho.pool import ordered_map
from pipeline.gho.records import Layout, Section, Walker
from pipeline.gho.sparse import SparseWriter

UNIT = 32768


class SectorSection:
    """A sector-mode partition: its decoded bytes are the volume, block by block."""

    def __init__(self, walker: Walker, section: Section, decoder: BlockDecoder, seed: int | None) -> None:
        self.walker = walker
        self.section = section
        self.decoder = decoder
        self.seed = seed
        self.name = walker.name

    def _decode(self, off: int, ln: int) -> bytes:
        return self._decode_payload((off, self.walker.stream.read(off, ln, f"the block at offset {off - 2}")))

    def _decode_payload(self, block: tuple[int, bytes]) -> bytes:
        """The decoded bytes of the block whose payload is at ``off`` (a worker job, pipeline.gho.pool)."""
        off, payload = block
        if self.seed is not None and self.decoder.compression == 0:
            payload = decrypt(payload, self.seed)
        try:
            return self.decoder.decode(payload, HARD_LIMIT)
        except CodecError as e:
            raise GhoError(e.at(self.name, off - 2, f"partition {self.section.index + 1}")) from None

    def _raw_chunk(self, start: int, rel: int, n: int) -> bytes:
        data = self.walker.stream.read(start + rel, n, "uncompressed sector data")
        if self.seed is not None:
            data = decrypt(data, self.seed)
        return data

    def boot_sector(self) -> bytes:
        sec = self.section
        if sec.first_block is None:
            return b""
        if sec.raw:
            total = sec.last_block[1] if sec.last_block else 0
            return self._raw_chunk(sec.first_block[0], 0, min(512, total))
        return self._decode(*sec.first_block)[:512]

    def size(self) -> int:
        sec = self.section
        if sec.first_block is None or sec.last_block is None:
            return 0
        if sec.raw:
            return sec.last_block[1]
        first = len(self._decode(*sec.first_block))
        last = len(self._decode(*sec.last_block)) if sec.blocks > 1 else first
        if first % 512 or first > HARD_LIMIT:
            raise GhoError(f"{self.name}: first block of the partition at offset {sec.header_offset} "
                           f"decodes to {first} bytes, expected a multiple of 512")
        return (sec.blocks - 1) * first + last

    def write(self, out: SparseWriter, base: int, progress: Callable[[int], None] | None = None) -> int:
        sec = self.section
        if sec.raw and sec.last_block is not None:
            start, total = sec.last_block
            stream = self.walker.stream

            def chunks() -> Iterator[tuple[int, bytes]]:
                for rel in range(0, total, UNIT):
                    yield rel, stream.read(start + rel, min(UNIT, total - rel), "uncompressed sector data")

            def plain(chunk: tuple[int, bytes]) -> tuple[int, bytes]:
                rel, data = chunk
                return rel, decrypt(data, self.seed) if self.seed is not None else data

            threads = self.walker.threads if self.seed is not None else 1
            for rel, data in ordered_map(plain, chunks(), threads):
                out.write_at(base + rel, data)
                if progress:
                    progress(start + rel + len(data))
            return total
        pos = 0
        bsize = None
        stream = self.walker.stream

        def payloads() -> Iterator[tuple[int, bytes]]:
            for off, ln in self.walker.iter_blocks(sec.body_start, sec.end):
                yield off, stream.read(off, ln, f"the block at offset {off - 2}")

        def job(block: tuple[int, bytes]) -> tuple[int, int, bytes]:
            return block[0], len(block[1]), self._decode_payload(block)

        for off, ln, data in ordered_map(job, payloads(), self.walker.decode_threads(self.decoder)):
            if bsize is not None and pos % bsize:
                raise GhoError(f"{self.name}: short block before the end of the chain at offset {off - 2}")
            if bsize is None:
                bsize = len(data)
            out.write_at(base + pos, data)
            pos += len(data)
            if progress:
                progress(off + ln)
        return pos


def decode_track0(walker: Walker, layout: Layout, decoder: BlockDecoder, seed: int | None) -> bytes:
    """The sectors before the first partition (MBR first), decoded from the kind 0x06 records (§8.2)."""
    parts = []
    for rec in layout.track0:
        off, ln = rec.body_offset + 2, rec.length - 2
        payload = walker.stream.read(off, ln, f"the track-0 record at offset {rec.offset}")
        if seed is not None and decoder.compression == 0:
            payload = decrypt(payload, seed)
        try:
            parts.append(decoder.decode(payload, HARD_LIMIT))
        except CodecError as e:
            raise GhoError(e.at(walker.name, rec.offset, "track-0 record")) from None
    data = b"".join(parts)
    if data and data[510:512] != b"\x55\xaa":
        raise GhoError(f"{walker.name}: track-0 data does not start with an MBR (no 55 AA signature)")
    return data
