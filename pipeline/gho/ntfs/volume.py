"""One NTFS file-aware section: the packet grammar walk, LCN mapping and the volume rebuild.

docs/gho-format.md §11.4 (grammar), §11.5 (records), §11.6.1 (deterministic mapping: every run is labelled by
its record, attribute and index), §11.6.3 (the $MFT as fallback where a record copy is unusable; each
such placement is counted as a heuristic one and reported), §11.7 (rebuild: $Boot, backup boot sector,
hidden sectors, $MFTMirr, $Bitmap, $LogFile). Memory: one block, one 32 KiB piece, one 1 MiB bitmap
window and per-run bookkeeping; nothing volume-sized.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pipeline.gho.codecs import BlockDecoder
from pipeline.gho.ntfs import crosscheck
from pipeline.gho.ntfs.chain import (
    CHK_LEN,
    ID_DATA,
    ID_LEN,
    ID_RUN,
    ID_SKIPPED,
    LEN_LEN,
    REC_IDS,
    UNIT,
    Chain,
    NtfsLayout,
    is_chk,
    parse_id,
    parse_len,
)
from pipeline.gho.ntfs.mft import (
    AT_DATA,
    FIRST_USER_RECORD,
    REC_BADCLUS,
    REC_BITMAP,
    REC_EXTEND,
    REC_LOGFILE,
    REC_MFT,
    REC_MFTMIRR,
    REC_VOLUME,
    Attribute,
    FileRecord,
    NtfsFormatError,
    Run,
    apply_fixups,
    parse_record,
    volume_facts,
)
from pipeline.gho.records import Section, Walker
from pipeline.gho.sparse import Disk, SparseWriter

BITMAP_WINDOW = 1 << 20  # bitmap bytes built at once (8 Mi clusters)
ATTR_NAMES = {0x20: "$ATTRIBUTE_LIST", 0x80: "$DATA", 0xA0: "$INDEX_ALLOCATION", 0xB0: "$BITMAP",
              0x50: "$SECURITY_DESCRIPTOR"}


@dataclass
class Summary:
    """What the walk found; filled by :meth:`NtfsSection.walk`."""

    records: int = 0
    files: int = 0
    directories: int = 0
    file_bytes: int = 0
    runs_deterministic: int = 0
    runs_heuristic: int = 0
    sparse_runs: int = 0
    stored_bytes: int = 0
    label: str | None = None
    dirty: bool = False
    overlaps: int = 0
    #: (record, attribute type, name) of every attribute announced with 0x8040 (data not stored)
    skipped: list[tuple[int, int, str]] = field(default_factory=list)
    skipped_names: dict[int, str] = field(default_factory=dict)
    #: the $MFT's data runs as (start VCN, runs), from record 0 and its extension records
    mft_runs: list[tuple[int, list[Run]]] = field(default_factory=list)
    mft_size: int = 0
    special: dict[int, Attribute] = field(default_factory=dict)  # unnamed $DATA of records 1, 2, 6
    boot_stored: bytes | None = None  # first sector of the data stored at LCN 0
    warnings: list[str] = field(default_factory=list)
    #: what each usable stored record copy says, checked against the rebuilt $MFT (crosscheck)
    copies: dict[int, crosscheck.RecordFacts] = field(default_factory=dict)
    #: every placed run (LCN, count, record), checked against a stored $Bitmap (crosscheck)
    placed: list[tuple[int, int, int]] = field(default_factory=list)


class Intervals:
    """Disjoint, merged cluster ranges already written (overlap detection, §11.6.1 step 4)."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def add(self, s: int, e: int) -> bool:
        """Add [s, e); True when it overlaps what is there."""
        i = bisect.bisect_right(self.starts, s) - 1
        overlap = False
        if i >= 0 and self.ends[i] >= s:
            overlap = self.ends[i] > s
            s = self.starts[i]
            e = max(e, self.ends[i])
            del self.starts[i], self.ends[i]
        else:
            i += 1
        while i < len(self.starts) and self.starts[i] <= e:
            overlap = overlap or self.starts[i] < e
            e = max(e, self.ends[i])
            del self.starts[i], self.ends[i]
        self.starts.insert(i, s)
        self.ends.insert(i, e)
        return overlap


class NtfsSection:
    """Reader of one subtype-4 section; :meth:`walk` without output only counts (``gho info``)."""

    def __init__(self, walker: Walker, section: Section, layout: NtfsLayout, decoder: BlockDecoder,
                 seed: int | None) -> None:
        self.walker = walker
        self.section = section
        self.layout = layout
        self.geometry = layout.geometry
        self.decoder = decoder
        self.seed = seed
        self.where = f"{walker.name}: partition {section.index + 1}"
        self.summary: Summary | None = None
        self.warnings: list[str] = []
        self._chk_pieces: bool | None = None

    # -- facts -----------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.geometry.volume_size

    @property
    def hidden_sectors(self) -> int:
        return self.geometry.hidden_sectors

    # -- the walk -----------------------------------------------------------------------------------
    def walk(self, out: SparseWriter | None = None, base: int = 0,
             progress: Callable[[int], None] | None = None) -> Summary:
        """Walk the whole packet stream; with ``out``, write every stored run at ``base`` + LCN × K."""
        chain = Chain(self.walker, self.layout, self.decoder, self.seed, self.where)
        try:
            return self._walk(chain, out, base, progress)
        finally:
            chain.close()

    def _walk(self, chain: Chain, out: SparseWriter | None, base: int,
              progress: Callable[[int], None] | None) -> Summary:
        sm = Summary()
        self._chk_pieces = None
        written = Intervals()
        last_record = -1
        while True:
            head = chain.peek(ID_LEN)
            if len(head) < ID_LEN:
                if head:
                    raise chain.fail(f"bad packet: {len(head)} bytes after the last packet, expected an ID "
                                     "packet or the end of the chain")
                break
            pid = parse_id(head)
            if pid is None:
                if not self.layout.framed and self.walker.part_header_at(chain.offset()) is not None:
                    break  # the end of an unframed chain: the next partition header
                raise chain.fail("bad packet: expected an ID packet (0E id 00000000 value 0F)")
            rid, n = pid
            if rid not in REC_IDS:
                if rid in (ID_DATA, ID_SKIPPED, ID_RUN):
                    raise chain.fail(f"bad packet: ID 0x{rid:04x} outside an attribute group of a record")
                raise chain.fail(f"unknown record id 0x{rid:04x} (value {n}): the format notes know "
                                 "0x8004, 0x8008 and 0x8010")
            chain.read(ID_LEN, "an ID packet")
            size = self._read_len(chain, "the record size")
            if size < 0x30 or size > 65536:
                raise chain.fail(f"bad packet: record size {size}, expected 48…65536")
            raw = chain.read(size, f"MFT record {n}")
            sm.records += 1
            if n <= last_record:
                sm.warnings.append(f"MFT record {n} announced again after record {last_record}")
            last_record = max(last_record, n)
            if rid == 0x8004 and raw[:4] == b"FILE":
                self._record(chain, sm, n, raw, out, base, written)
            self._skip_chk(chain)
            if progress:
                progress(chain.offset())
        if self.layout.framed is False:
            self.layout.end = chain.offset()
        if sm.records == 0:
            raise chain.fail("no MFT record in the packet stream")
        if sm.overlaps:
            sm.warnings.append(f"{sm.overlaps} stored runs overlap earlier ones; the later copy was kept")
        crosscheck.check_boot_copies(self.where, self.geometry, sm.boot_stored)
        self.summary = sm
        return sm

    def _read_len(self, chain: Chain, what: str) -> int:
        v = parse_len(chain.peek(LEN_LEN))
        if v is None:
            raise chain.fail(f"bad packet: expected a length packet (0F value 00000000 0E) for {what}")
        chain.read(LEN_LEN, "a length packet")
        return v

    def _skip_chk(self, chain: Chain) -> None:
        if is_chk(chain.peek(CHK_LEN)):
            chain.read(CHK_LEN, "a checksum packet")

    def _record(self, chain: Chain, sm: Summary, n: int, raw: bytes, out: SparseWriter | None, base: int,
                written: Intervals) -> None:
        fr: FileRecord | None
        try:
            fr = parse_record(apply_fixups(raw), n)
        except NtfsFormatError as e:
            fr = None
            sm.warnings.append(f"MFT record {n}: the stored copy is unusable ({e}); its runs are placed "
                               "from the $MFT (heuristic)")
        if fr is not None and len(raw) >= 0x30 and struct.unpack_from("<H", raw, 4)[0] >= 0x30:
            own = struct.unpack_from("<I", raw, 0x2C)[0]
            if own != n:
                sm.warnings.append(f"the copy announced as MFT record {n} says it is record {own}")
        if fr is not None:
            self._count(sm, fr)
            sm.copies[n] = crosscheck.facts_of(fr)
            expected: list[Attribute] | None = fr.nonresident()
        else:
            expected = self._from_mft(sm, n, out, base)
        heuristic = fr is None
        g = 0
        while True:
            pid = parse_id(chain.peek(ID_LEN))
            if pid is None or pid[0] not in (ID_DATA, ID_SKIPPED):
                break
            if expected is not None and g >= len(expected):
                if heuristic:
                    break
                raise chain.fail(f"run count mismatch: MFT record {n} has {len(expected)} non-resident "
                                 f"attributes, the stream holds more attribute groups")
            attr = expected[g] if expected is not None else None
            chain.read(ID_LEN, "an attribute group")
            if pid[0] == ID_SKIPPED:
                if attr is not None:
                    sm.skipped.append((n, attr.type, attr.name))
                    if attr.type == AT_DATA and not attr.name and attr.start_vcn == 0:
                        if n in (REC_MFTMIRR, REC_LOGFILE, REC_BITMAP):
                            sm.special[n] = attr
                        elif n != REC_BADCLUS:
                            nm = fr.file_name() if fr is not None else None
                            sm.skipped_names[n] = nm[0] if nm else f"record {n}"
                self._skip_chk(chain)
            else:
                self._runs(chain, sm, n, g, attr, heuristic, out, base, written)
            g += 1
        if expected is not None and g < len(expected) and not heuristic:
            raise chain.fail(f"run count mismatch: MFT record {n} has {len(expected)} non-resident "
                             f"attributes, the stream holds {g} attribute groups")

    def _runs(self, chain: Chain, sm: Summary, n: int, g: int, attr: Attribute | None, heuristic: bool,
              out: SparseWriter | None, base: int, written: Intervals) -> None:
        k = self.geometry.cluster_size
        runs = attr.runs if attr is not None else None
        label = f"MFT record {n}, {ATTR_NAMES.get(attr.type, f'attribute 0x{attr.type:x}') if attr else ''}"
        idx = 0
        while True:
            pid = parse_id(chain.peek(ID_LEN))
            if pid is None or pid[0] != ID_RUN:
                break
            if pid[1] != idx:
                raise chain.fail(f"bad packet: run index {pid[1]} in {label}, expected {idx}")
            if runs is not None and idx >= len(runs):
                raise chain.fail(f"run count mismatch: {label} has {len(runs)} mapping-pairs entries, the "
                                 f"stream holds more runs")
            chain.read(ID_LEN, "a run packet")
            run = runs[idx] if runs is not None else None
            has_len = parse_len(chain.peek(LEN_LEN)) is not None
            if not has_len:
                if run is not None and run.lcn is not None and not heuristic:
                    raise chain.fail(f"run count mismatch: run {idx} of {label} ({run.count} clusters) "
                                     "has no length packet")
                sm.sparse_runs += 1
                idx += 1
                continue
            c = self._read_len(chain, f"run {idx} of {label}")
            if heuristic and out is None and runs is None:  # counting only: the $MFT is not at hand
                sm.runs_heuristic += 1
                self._data(chain, sm, -1, c * k, None, base)  # -1: not LCN 0
                idx += 1
                continue
            if run is None or run.lcn is None or run.count != c:
                if heuristic:
                    raise chain.fail(f"unplaced run: run {idx} ({c} clusters) of {label} matches no run of "
                                     "that record in the $MFT")
                want = "a sparse entry" if run is not None and run.lcn is None else \
                    f"{run.count} clusters" if run is not None else "none"
                raise chain.fail(f"run count mismatch: run {idx} of {label} holds {c} clusters, the mapping "
                                 f"pairs say {want}")
            if heuristic:
                sm.runs_heuristic += 1
            else:
                sm.runs_deterministic += 1
            crosscheck.check_run_inside(self.where, n, f"{label} run {idx}", run.lcn, c, self.geometry)
            sm.placed.append((run.lcn, c, n))
            if written.add(run.lcn, run.lcn + c):
                sm.overlaps += 1
            self._data(chain, sm, run.lcn * k, c * k, out, base)
            idx += 1
        if runs is not None and idx != len(runs):
            raise chain.fail(f"run count mismatch: {label} has {len(runs)} mapping-pairs entries, the stream "
                             f"holds {idx} runs")

    def _data(self, chain: Chain, sm: Summary, disk: int, length: int, out: SparseWriter | None,
              base: int) -> None:
        rel = 0
        while rel < length:
            piece = min(UNIT, length - rel)
            if out is None and not (rel == 0 and disk == 0):
                chain.skip(piece, "run data")
            else:
                data = chain.read(piece, "run data")
                if disk == 0 and rel == 0 and sm.boot_stored is None:
                    sm.boot_stored = data[:512]
                if out is not None:
                    out.write_at(base + disk + rel, data)
            rel += piece
            sm.stored_bytes += piece
            if rel < length:
                self._piece_chk(chain)
            else:
                self._skip_chk(chain)  # after the run's data a packet follows: a CHK is unambiguous

    def _piece_chk(self, chain: Chain) -> None:
        """Optional CHK between two data pieces; the mode is decided once per image (§11.4)."""
        if self._chk_pieces is None:
            self._chk_pieces = is_chk(chain.peek(CHK_LEN))
        if self._chk_pieces and is_chk(chain.peek(CHK_LEN)):
            chain.read(CHK_LEN, "a checksum packet")

    def _count(self, sm: Summary, fr: FileRecord) -> None:
        n = fr.number
        if n == REC_VOLUME:
            sm.label, sm.dirty = volume_facts(fr)
        data = fr.find(AT_DATA)
        if (n == REC_MFT or (fr.extension and fr.base == REC_MFT)) and data is not None and not data.resident:
            sm.mft_runs.append((data.start_vcn, data.runs))
            if data.start_vcn == 0:
                sm.mft_size = data.data_size
        if not fr.in_use:
            return
        owner = fr.base if fr.extension else n
        if owner < FIRST_USER_RECORD:
            return
        if not fr.extension:
            nm = fr.file_name()
            if nm is not None and nm[1] == REC_EXTEND:
                return
            if fr.is_dir:
                sm.directories += 1
            else:
                sm.files += 1
        if data is not None and data.start_vcn == 0:
            sm.file_bytes += data.data_size

    # -- the $MFT as read back from the output ------------------------------------------------------
    def _from_mft(self, sm: Summary, n: int, out: SparseWriter | None, base: int) -> list[Attribute] | None:
        if out is None:
            return None
        try:
            raw = self._mft_read(sm, out.disk, base, n)
            return parse_record(apply_fixups(raw), n).nonresident() if raw else None
        except NtfsFormatError:
            return None

    def _mft_read(self, sm: Summary, disk: Disk, base: int, n: int) -> bytes | None:
        rs = self.geometry.record_size
        k = self.geometry.cluster_size
        off = n * rs
        if off + rs > sm.mft_size:
            return None
        out = bytearray()
        want = rs
        for vcn0, runs in sorted(sm.mft_runs, key=lambda t: t[0]):
            vcn = vcn0
            for r in runs:
                lo, hi = vcn * k, (vcn + r.count) * k
                vcn += r.count
                if hi <= off or lo >= off + want or r.lcn is None:
                    continue
                s = max(lo, off)
                e = min(hi, off + want)
                out += disk.pread(e - s, base + r.lcn * k + (s - lo))
        return bytes(out) if len(out) == rs else None

    def mft_records(self, disk: Disk, base: int) -> Iterator[FileRecord]:
        sm = self.summary
        assert sm is not None
        rs = self.geometry.record_size
        for n in range(sm.mft_size // rs):
            raw = self._mft_read(sm, disk, base, n)
            if not raw or raw[:4] != b"FILE":
                continue
            try:
                yield parse_record(apply_fixups(raw), n)
            except NtfsFormatError:
                self.warnings.append(f"MFT record {n} in the rebuilt $MFT is malformed; its clusters are not "
                                     "marked in $Bitmap")

    # -- writing the volume ---------------------------------------------------------------------
    def write(self, out: SparseWriter, base: int, progress: Callable[[int], None] | None = None) -> Summary:
        """The whole volume at byte ``base`` of ``out`` (§11.7); ``out.disk`` must be readable."""
        sm = self.walk(out, base, progress)
        geo = self.geometry
        disk = out.disk
        self._crosscheck(sm, disk, base)
        self.warnings = list(sm.warnings)
        boot = bytearray(self.layout.boot)
        if sm.boot_stored is None:
            self.warnings.append("no data stored at LCN 0: sector 0 is the metadata-area copy and the rest "
                                 "of $Boot is zero (the volume mounts but may not boot)")
            out.write_at(base, bytes(boot))
        else:
            stored = disk.pread(geo.bytes_per_sector, base)
            if stored[:512] != bytes(boot[:512]):
                self.warnings.append("the boot sector stored at LCN 0 differs from the metadata-area copy; "
                                     "the stored one is used")
            boot = bytearray(stored)
        start = base // geo.bytes_per_sector
        if struct.unpack_from("<I", boot, 0x1C)[0] != start:
            self.warnings.append(f"hidden sectors {struct.unpack_from('<I', boot, 0x1C)[0]} set to the "
                                 f"partition start {start}")
            struct.pack_into("<I", boot, 0x1C, start)
            disk.pwrite(bytes(boot), base)
        disk.pwrite(bytes(boot), base + geo.total_sectors * geo.bytes_per_sector)  # backup boot sector
        if sm.dirty:
            self.warnings.append("the volume is marked dirty (as it was when imaged); Windows will check it")
        if REC_MFTMIRR in sm.special:
            self._mirror(sm, disk, base)
        if REC_LOGFILE in sm.special:
            self._fill_attr(disk, base, sm.special[REC_LOGFILE], lambda rel, n: b"\xff" * n)
            self.warnings.append("$LogFile was not stored: written as an empty journal (0xFF)")
        if REC_BITMAP in sm.special:
            self._bitmap(sm, disk, base)
        for n, name in sorted(sm.skipped_names.items()):
            self.warnings.append(f"{name} (MFT record {n}): data not stored in the image, reads as zeros")
        return sm

    def _crosscheck(self, sm: Summary, disk: Disk, base: int) -> None:
        """What the section says twice must agree (:mod:`pipeline.gho.ntfs.crosscheck`)."""

        def read_mft(n: int) -> FileRecord | None:
            raw = self._mft_read(sm, disk, base, n)
            if not raw or raw[:4] != b"FILE":
                return None
            return parse_record(apply_fixups(raw), n)

        crosscheck.check_copies(self.where, sm.copies, read_mft)
        crosscheck.check_boot_vs_mft(self.where, self.geometry, read_mft)
        if REC_BITMAP in sm.special:  # rebuilt from the $MFT: consistent with it by construction
            crosscheck.check_bitmap_size(self.where, self.geometry, sm.special[REC_BITMAP])
            return
        rec = read_mft(REC_BITMAP)
        bitmap = rec.find(AT_DATA) if rec is not None else None
        if bitmap is None or bitmap.resident:
            return
        crosscheck.check_bitmap_size(self.where, self.geometry, bitmap)
        # every run of every in-use record of the rebuilt $MFT (those placed from the stream and those
        # whose data was not stored, such as $MFTMirr's) must lie on clusters the stored $Bitmap uses
        claimed = [(r.lcn, r.count, fr.number) for fr in self.mft_records(disk, base) if fr.in_use
                   for a in fr.nonresident() for r in a.runs if r.lcn is not None]
        crosscheck.check_runs_in_use(self.where, sorted(set(claimed) | set(sm.placed)),
                                     lambda first, n: self._attr_read(disk, base, bitmap, first, n))

    def _attr_read(self, disk: Disk, base: int, attr: Attribute, rel: int, n: int) -> bytes:
        """Bytes [rel, rel + n) of a non-resident attribute's data, read back from the output."""
        k = self.geometry.cluster_size
        out = bytearray()
        vrel = 0
        for r in attr.runs:
            span = r.count * k
            lo, hi = max(vrel, rel), min(vrel + span, rel + n)
            if lo < hi:
                at = base + r.lcn * k + (lo - vrel) if r.lcn is not None else None
                out += disk.pread(hi - lo, at) if at is not None else bytes(hi - lo)
            vrel += span
            if vrel >= rel + n:
                break
        return bytes(out)

    def _fill_attr(self, disk: Disk, base: int, attr: Attribute, data: Callable[[int, int], bytes],
                   start: int = 0, stop: int | None = None) -> None:
        """Write ``data(rel, n)`` over bytes [start, stop) (default: to the data size) of ``attr``."""
        k = self.geometry.cluster_size
        stop = attr.data_size if stop is None else min(stop, attr.data_size)
        rel = 0
        for r in attr.runs:
            span = r.count * k
            lo, hi = max(rel, start), min(rel + span, stop)
            if r.lcn is not None:
                pos = lo
                while pos < hi:
                    n = min(UNIT, hi - pos)
                    disk.pwrite(data(pos, n), base + r.lcn * k + (pos - rel))
                    pos += n
            rel += span
            if rel >= stop:
                break

    def _mirror(self, sm: Summary, disk: Disk, base: int) -> None:
        """§11.7 step 5: the first D bytes of the $MFT data into $MFTMirr's clusters."""
        attr = sm.special[REC_MFTMIRR]
        rs = self.geometry.record_size

        def mft_bytes(rel: int, n: int) -> bytes:
            out = bytearray()
            for r in range(rel // rs, -(-(rel + n) // rs)):
                out += self._mft_read(sm, disk, base, r) or bytes(rs)
            skip = rel - (rel // rs) * rs
            return bytes(out[skip:skip + n])

        self._fill_attr(disk, base, attr, mft_bytes)

    def _bitmap(self, sm: Summary, disk: Disk, base: int) -> None:
        """§11.7 step 6: $Bitmap from every run of every in-use record, in 1 MiB windows."""
        attr = sm.special[REC_BITMAP]
        n_clusters = self.geometry.clusters
        nbytes = -(-n_clusters // 8)
        w0 = 0
        while w0 < nbytes:
            wlen = min(BITMAP_WINDOW, nbytes - w0)
            bm = bytearray(wlen)
            lo, hi = w0 * 8, (w0 + wlen) * 8
            for fr in self.mft_records(disk, base):
                if not fr.in_use:
                    continue
                for a in fr.nonresident():
                    for r in a.runs:
                        if r.lcn is None:
                            continue
                        s, e = max(r.lcn, lo), min(r.lcn + r.count, hi, n_clusters)
                        if s < e:
                            _set_bits(bm, s - lo, e - s)
            if w0 + wlen == nbytes and n_clusters % 8:
                bm[-1] |= (0xFF << (n_clusters % 8)) & 0xFF
            chunk, first = bytes(bm), w0

            def window(rel: int, n: int, chunk: bytes = chunk, first: int = first) -> bytes:
                return chunk[rel - first:rel - first + n]

            self._fill_attr(disk, base, attr, window, w0, w0 + wlen)
            w0 += wlen

    # -- public helpers for info/extract --------------------------------------------------------
    def facts(self) -> dict[str, int]:
        g = self.geometry
        return {"bytes_per_sector": g.bytes_per_sector, "sectors_per_cluster": g.sectors_per_cluster,
                "cluster_size": g.cluster_size, "total_sectors": g.total_sectors, "clusters": g.clusters,
                "mft_lcn": g.mft_lcn, "mftmirr_lcn": g.mftmirr_lcn, "record_size": g.record_size}


def _set_bits(bm: bytearray, start: int, count: int) -> None:
    end = start + count
    while start < end and start % 8:
        bm[start // 8] |= 1 << (start % 8)
        start += 1
    full = (end - start) // 8
    if full > 0:
        bm[start // 8:start // 8 + full] = b"\xff" * full
        start += full * 8
    while start < end:
        bm[start // 8] |= 1 << (start % 8)
        start += 1
