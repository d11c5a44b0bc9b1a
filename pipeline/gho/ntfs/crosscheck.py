"""What an NTFS file-aware section says twice, checked against itself (docs/safety.md).

docs/gho-format.md §11.5 ("compare them after fixups and report differences"), §11.6.1 (runs placed inside the
volume), §11.7 (geometry from the boot sector). A mismatch is refused with one line naming the image,
the partition, the record and the field: a rebuilt volume whose $MFT says one thing and whose data was
placed by another is wrong in silence otherwise.

- every stored record copy against the same record in the rebuilt ``$MFT`` data: in-use flag, the
  non-resident attributes (type, name, start VCN, data size) and their run lists;
- every placed run inside the volume's clusters, and (where ``$Bitmap`` was stored, not rebuilt) on
  clusters ``$Bitmap`` marks in use;
- the geometry of the metadata-area boot sector (which placed the partition) against the boot sector
  stored at LCN 0 and against ``$Bitmap``'s size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pipeline.gho.errors import GhoError
from pipeline.gho.ntfs.mft import Attribute, FileRecord, Geometry, NtfsFormatError, parse_boot

#: (type, name, start VCN, data size, ((LCN, count), ...)) per non-resident attribute
AttrFacts = tuple[int, str, int, int, tuple[tuple[int | None, int], ...]]


@dataclass(frozen=True)
class RecordFacts:
    in_use: bool
    attrs: tuple[AttrFacts, ...]


def facts_of(fr: FileRecord) -> RecordFacts:
    return RecordFacts(fr.in_use, tuple((a.type, a.name, a.start_vcn, a.data_size,
                                         tuple((r.lcn, r.count) for r in a.runs)) for a in fr.nonresident()))


def difference(copy: RecordFacts, mft: RecordFacts) -> str | None:
    """What differs between a record's stored copy and its ``$MFT`` entry (None: nothing)."""
    if copy.in_use != mft.in_use:
        return (f"in-use flag: the copy says {'in use' if copy.in_use else 'free'}, the $MFT says "
                f"{'in use' if mft.in_use else 'free'}")
    if len(copy.attrs) != len(mft.attrs):
        return f"non-resident attributes: the copy has {len(copy.attrs)}, the $MFT {len(mft.attrs)}"
    for a, b in zip(copy.attrs, mft.attrs, strict=True):
        what = f"attribute 0x{a[0]:x}{f' {a[1]!r}' if a[1] else ''}"
        if a[:3] != b[:3]:
            return f"{what}: the copy has type/name/VCN {a[:3]}, the $MFT {b[:3]}"
        if a[3] != b[3]:
            return f"{what}: data size {a[3]} in the copy, {b[3]} in the $MFT"
        if a[4] != b[4]:
            for i, (ra, rb) in enumerate(zip(a[4], b[4], strict=False)):
                if ra != rb:
                    return (f"{what} run {i}: LCN {ra[0]} × {ra[1]} clusters in the copy, LCN "
                            f"{rb[0]} × {rb[1]} "
                            "in the $MFT")
            return f"{what}: {len(a[4])} runs in the copy, {len(b[4])} in the $MFT"
    return None


def check_copies(where: str, copies: dict[int, RecordFacts],
                 read_mft: Callable[[int], FileRecord | None]) -> None:
    """Every stored record copy equals its entry in the rebuilt ``$MFT`` data; else refused."""
    for n in sorted(copies):
        try:
            fr = read_mft(n)
        except NtfsFormatError as e:
            raise GhoError(f"{where} (NTFS): MFT record {n}: the stored copy is a valid record, the "
                           f"$MFT data "
                           f"holds a malformed one ({e}); refused") from None
        if fr is None:
            if copies[n].in_use:
                raise GhoError(f"{where} (NTFS): MFT record {n}: a stored copy of an in-use record, but the "
                               "$MFT data holds no such record; refused")
            continue
        diff = difference(copies[n], facts_of(fr))
        if diff:
            raise GhoError(f"{where} (NTFS): MFT record {n}: the stored copy and the $MFT data "
                           f"differ ({diff}); "
                           "refused: the data would be placed where the $MFT does not look for it")


def check_run_inside(where: str, n: int, label: str, lcn: int, count: int, geo: Geometry) -> None:
    if lcn < 0 or lcn + count > geo.clusters:
        raise GhoError(f"{where} (NTFS): MFT record {n}, {label}: run at LCN {lcn} × {count} clusters lies "
                       f"outside the volume ({geo.clusters} clusters of {geo.cluster_size} bytes); refused")


def check_boot_copies(where: str, meta: Geometry, stored: bytes | None) -> None:
    """The boot sector that placed the partition (metadata area) against the one stored at LCN 0."""
    if stored is None:
        return
    try:
        geo = parse_boot(stored)
    except NtfsFormatError as e:
        raise GhoError(f"{where} (NTFS): the boot sector stored at LCN 0 is not usable ({e}); "
                       f"refused") from None
    for name in ("bytes_per_sector", "sectors_per_cluster", "total_sectors", "mft_lcn", "mftmirr_lcn",
                 "record_size"):
        a, b = getattr(meta, name), getattr(geo, name)
        if a != b:
            raise GhoError(f"{where} (NTFS): boot sector field {name.replace('_', ' ')} is {a} in "
                           f"the metadata "
                           f"area and {b} at LCN 0; refused: the partition's size and place depend on it")


def check_boot_vs_mft(where: str, geo: Geometry, read_mft: Callable[[int], FileRecord | None]) -> None:
    """The boot sector's $MFT and $MFTMirr LCNs are where records 0 and 1 say their data starts."""
    for n, name, lcn in ((0, "$MFT", geo.mft_lcn), (1, "$MFTMirr", geo.mftmirr_lcn)):
        fr = read_mft(n)
        data = fr.find(0x80) if fr is not None else None
        if data is None or data.resident or not data.runs or data.start_vcn != 0:
            continue
        first = data.runs[0].lcn
        if first != lcn:
            raise GhoError(f"{where} (NTFS): the boot sector puts {name} at LCN {lcn}, MFT record {n} "
                           f"at LCN {first}; refused")


def check_bitmap_size(where: str, geo: Geometry, bitmap: Attribute | None) -> None:
    """``$Bitmap`` must have a bit for every cluster the boot sector counts."""
    if bitmap is None or bitmap.resident:
        return
    need = -(-geo.clusters // 8)
    if bitmap.data_size < need:
        raise GhoError(f"{where} (NTFS): $Bitmap holds {bitmap.data_size} bytes "
                       f"({bitmap.data_size * 8} clusters), "
                       f"the boot sector's total sectors {geo.total_sectors} make {geo.clusters} "
                       f"clusters; refused")


def check_runs_in_use(where: str, placed: list[tuple[int, int, int]], bit_range: Callable[[int, int], bytes]
                      ) -> None:
    """Every placed run (LCN, count, record) lies on clusters the stored ``$Bitmap`` marks in use."""
    for lcn, count, n in placed:
        first, last = lcn // 8, (lcn + count - 1) // 8
        data = bit_range(first, last - first + 1).ljust(last - first + 1, b"\0")
        free = _first_clear(data, lcn - first * 8, lcn - first * 8 + count)
        if free is not None:
            raise GhoError(f"{where} (NTFS): MFT record {n}: its run at LCN {lcn} × {count} clusters covers "
                           f"cluster {first * 8 + free}, which $Bitmap marks free; refused")


def _first_clear(bits: bytes, start: int, end: int) -> int | None:
    """The first bit in [start, end) of ``bits`` (LSB first) that is 0, else None."""
    c = start
    while c < end and c % 8:
        if not bits[c // 8] >> (c % 8) & 1:
            return c
        c += 1
    full_end = end - end % 8
    if c < full_end:
        mid = bits[c // 8:full_end // 8]
        rest = mid.lstrip(b"\xff")
        if rest:
            c += (len(mid) - len(rest)) * 8
            end = min(end, c + 8)
        else:
            c = full_end
    while c < end:
        if not bits[c // 8] >> (c % 8) & 1:
            return c
        c += 1
    return None
