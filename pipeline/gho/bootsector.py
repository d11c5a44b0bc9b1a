"""Volume boot sectors: FAT geometry (docs/gho-format.md §10.8 step 1) and which file system a first sector
belongs to. Pure bytes → facts; shared by the record walker (§8.4 raw-data probe), the sector and
FAT readers and the boot-chain check.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.gho.errors import GhoError


@dataclass(frozen=True)
class Geometry:
    bytes_per_sector: int
    sectors_per_cluster: int
    reserved_sectors: int
    num_fats: int
    root_entries: int
    total_sectors: int
    media: int
    fat_sectors: int
    hidden_sectors: int
    root_cluster: int
    fsinfo_sector: int
    backup_boot_sector: int
    fat_type: int
    root_dir_sectors: int
    first_data_sector: int
    clusters: int

    @property
    def cluster_bytes(self) -> int:
        return self.bytes_per_sector * self.sectors_per_cluster

    @property
    def size(self) -> int:
        return self.total_sectors * self.bytes_per_sector

    @property
    def fs_name(self) -> str:
        return f"FAT{self.fat_type}"

    def cluster_offset(self, n: int) -> int:
        return (self.first_data_sector + (n - 2) * self.sectors_per_cluster) * self.bytes_per_sector


def parse_geometry(boot: bytes, where: str) -> Geometry:
    """Geometry from a FAT boot sector (§10.8 step 1); raises :class:`GhoError` if implausible."""
    if len(boot) < 512:
        raise GhoError(f"{where}: boot sector is {len(boot)} bytes, expected 512")
    bps, spc, rsvd, nfats, root_ent, tot16, media, fatsz16 = struct.unpack_from("<HBHBHHBH", boot, 11)
    hidden, tot32 = struct.unpack_from("<II", boot, 28)
    fatsz32, _flags, _ver, root_clus, fsinfo, backup = struct.unpack_from("<IHHIHH", boot, 36)
    if bps not in (512, 1024, 2048, 4096) or spc == 0 or spc & (spc - 1) or nfats == 0 or rsvd == 0:
        raise GhoError(f"{where}: not a FAT boot sector (bytes/sector {bps}, sectors/cluster {spc}, "
                       f"FATs {nfats}, reserved {rsvd}; expected 512-4096, a power of two, 1-2, at least 1)")
    if spc * bps > 65536:
        raise GhoError(f"{where}: cluster of {spc} × {bps} bytes exceeds 64 KiB")
    if nfats > 2:
        raise GhoError(f"{where}: {nfats} FATs (byte 16), expected 1 or 2")
    if media != 0xF0 and media < 0xF8:
        raise GhoError(f"{where}: media byte 0x{media:02x} (byte 21), expected 0xF0 or 0xF8-0xFF")
    if tot16 and tot32 and tot16 != tot32:
        raise GhoError(f"{where}: total sectors {tot16} (byte 19) and {tot32} (byte 32) disagree")
    fatsz = fatsz16 or fatsz32
    totsec = tot16 or tot32
    root_dir_sectors = (root_ent * 32 + bps - 1) // bps
    first_data = rsvd + nfats * fatsz + root_dir_sectors
    if fatsz == 0 or totsec <= first_data:
        raise GhoError(f"{where}: inconsistent FAT geometry (FAT size {fatsz}, total sectors {totsec}, "
                       f"first data sector {first_data})")
    clusters = (totsec - first_data) // spc
    fat_type = 12 if clusters < 4085 else 16 if clusters < 65525 else 32
    if fat_type == 32 and fatsz16 != 0:
        raise GhoError(f"{where}: {clusters} clusters need FAT32 but the boot sector is FAT12/16")
    if fat_type != 32 and fatsz16 == 0:
        raise GhoError(f"{where}: boot sector is FAT32-style (FAT size 16 = 0) but {clusters} clusters "
                       "make a FAT12/16 volume")
    if fat_type == 32:
        if root_ent != 0 or tot16 != 0:
            raise GhoError(f"{where}: FAT32 boot sector with root entries {root_ent} (byte 17) or total "
                           f"sectors 16 {tot16} (byte 19); both must be 0")
        if not 2 <= root_clus < clusters + 2:
            raise GhoError(f"{where}: root cluster {root_clus} (byte 44) outside the volume's clusters "
                           f"2-{clusters + 1}")
        for value, name, off in ((fsinfo, "FSInfo sector", 48), (backup, "backup boot sector", 50)):
            if value not in (0, 0xFFFF) and value >= rsvd:
                raise GhoError(f"{where}: {name} {value} (byte {off}) is not inside the {rsvd} reserved "
                               "sectors")
    else:
        if root_ent == 0 or root_ent * 32 % bps:
            raise GhoError(f"{where}: {root_ent} root entries (byte 17), expected a non-zero multiple of "
                           f"{bps // 32} (whole sectors)")
        root_clus, fsinfo, backup = 0, 0, 0
    need = (clusters + 2) * fat_type // 8
    if fatsz * bps < need:
        raise GhoError(f"{where}: FAT of {fatsz} sectors cannot hold {clusters} clusters")
    return Geometry(bps, spc, rsvd, nfats, root_ent, totsec, media, fatsz, hidden, root_clus, fsinfo, backup,
                    fat_type, root_dir_sectors, first_data, clusters)



def detect_fs(boot: bytes) -> tuple[str | None, int | None, str | None]:
    """(file system, size in bytes, label) from a volume's first sector, as far as recognisable."""
    if len(boot) < 512 or boot[510:512] != b"\x55\xaa":
        return None, None, None
    if boot[3:11] == b"NTFS    ":
        bps = struct.unpack_from("<H", boot, 11)[0]
        total = struct.unpack_from("<Q", boot, 0x28)[0]
        return "NTFS", (total + 1) * bps, None
    try:
        g = parse_geometry(boot, "")
    except GhoError:
        return None, None, None
    off = 71 if g.fat_type == 32 else 43
    label = boot[off:off + 11].decode("cp437", "replace").rstrip()
    return g.fs_name, g.size, label
