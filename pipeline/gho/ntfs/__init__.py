"""NTFS file-aware sections (docs/gho-format.md §11): layout, packet grammar, LCN mapping, volume rebuild."""

from __future__ import annotations

from pipeline.gho.codecs import BlockDecoder
from pipeline.gho.ntfs.chain import NtfsLayout, locate
from pipeline.gho.ntfs.volume import NtfsSection, Summary
from pipeline.gho.records import Section, Walker

__all__ = ["NtfsLayout", "NtfsSection", "Summary", "scan_section", "section_reader"]


def scan_section(walker: Walker, sec: Section, limit: int) -> int:
    """Locate the parts of an NTFS section during the layout scan; returns the stream offset after it."""
    locked = walker.header.password and walker.seed is None
    decoder = BlockDecoder(walker.header.compression)
    lay = locate(walker, sec, limit, decoder, walker.seed, locked)
    sec.ntfs = lay
    if lay.framed:
        return lay.end
    NtfsSection(walker, sec, lay, decoder, walker.seed).walk()  # sets lay.end (the grammar's end)
    return lay.end


def section_reader(walker: Walker, sec: Section, decoder: BlockDecoder, seed: int | None) -> NtfsSection:
    lay = sec.ntfs
    assert isinstance(lay, NtfsLayout)
    return NtfsSection(walker, sec, lay, decoder, seed)
