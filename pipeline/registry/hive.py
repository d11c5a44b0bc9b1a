"""Local hive files: create an empty one, merge regedit text into one, export a subtree.

The hive writer is pure Python; merging, exporting and reading values run hivex's tools through
:mod:`pipeline.tools.hivex` (the one wrapper of ``hivexregedit``/``hivexget``); nothing here needs
libguestfs.

Binary layout written by :func:`write_empty_hive` (all integers little-endian)::

    0x0000  base block (4096 bytes): "regf", sequence 1 == sequence 2, timestamp, version,
            type 0 (primary), format 1, root cell offset, hive bins size, checksum at 0x1FC
    0x1000  hbin (4096 bytes): 32-byte header, then cells:
            0x20  nk  root key (flags HIVE_ENTRY|NO_DELETE|COMP_NAME), no subkeys, no values
            ...   sk  security cell (self-linked, refcount 1) the root points to
            ...   free cell filling the rest of the bin
"""

from __future__ import annotations

import os
import struct
import time
from pathlib import Path

from pipeline.core import atomic
from pipeline.core.choices import Step
from pipeline.tools import hivex

BLOCK = 4096
HBIN_HEADER = 0x20
_NONE = 0xFFFFFFFF

# nk flags
KEY_HIVE_EXIT = 0x0002
KEY_HIVE_ENTRY = 0x0004
KEY_NO_DELETE = 0x0008
KEY_COMP_NAME = 0x0020

_EPOCH_DIFF = 11644473600  # seconds between 1601-01-01 and 1970-01-01


def filetime(unix_seconds: float | None = None) -> int:
    """Windows FILETIME (100 ns ticks since 1601) for ``unix_seconds`` (default: now)."""
    t = time.time() if unix_seconds is None else unix_seconds
    return int((t + _EPOCH_DIFF) * 10_000_000)


def _sid(authority: int, *subs: int) -> bytes:
    return struct.pack("<BB", 1, len(subs)) + authority.to_bytes(6, "big") + struct.pack(
        f"<{len(subs)}I", *subs
    )


def _ace(mask: int, sid: bytes, flags: int = 0x02) -> bytes:
    # ACCESS_ALLOWED_ACE_TYPE (0), CONTAINER_INHERIT_ACE (0x02) by default.
    size = 8 + len(sid)
    return struct.pack("<BBHI", 0, flags, size, mask) + sid


def security_descriptor() -> bytes:
    """A self-relative security descriptor: owner Administrators, group SYSTEM, DACL granting
    full control to Administrators and SYSTEM and read access to Everyone (inherited by subkeys)."""
    admins = _sid(5, 32, 544)
    system = _sid(5, 18)
    everyone = _sid(1, 0)
    key_all_access, key_read = 0x000F003F, 0x00020019
    aces = _ace(key_all_access, admins) + _ace(key_all_access, system) + _ace(key_read, everyone)
    acl = struct.pack("<BBHHH", 2, 0, 8 + len(aces), 3, 0) + aces
    # SE_SELF_RELATIVE | SE_DACL_PRESENT
    control = 0x8000 | 0x0004
    header_len = 20
    owner_off = header_len
    group_off = owner_off + len(admins)
    dacl_off = group_off + len(system)
    header = struct.pack("<BBHIIII", 1, 0, control, owner_off, group_off, 0, dacl_off)
    return header + admins + system + acl


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _checksum(base: bytes | bytearray) -> int:
    x = 0
    for (d,) in struct.iter_unpack("<I", bytes(base[:0x1FC])):
        x ^= d
    if x == 0xFFFFFFFF:
        return 0xFFFFFFFE
    if x == 0:
        return 1
    return x


def empty_hive_bytes(root_name: str = "ROOT", *, minor_version: int = 3,
                     timestamp: int | None = None) -> bytes:
    """Bytes of an empty, writable hive (see module docstring for the layout)."""
    if minor_version not in (3, 5):
        raise ValueError(f"hive minor version must be 3 or 5, not {minor_version}")
    name = root_name.encode("latin-1")
    if not name or len(name) > 255 or b"\\" in name:
        raise ValueError(f"invalid hive root name {root_name!r}")
    ts = filetime() if timestamp is None else timestamp

    # --- cells, offsets relative to the start of the first hbin ---
    nk_off = HBIN_HEADER
    nk_size = _align8(0x50 + len(name))
    sk_off = nk_off + nk_size
    sd = security_descriptor()
    sk_size = _align8(0x18 + len(sd))
    free_off = sk_off + sk_size
    free_size = BLOCK - free_off
    assert free_size >= 8

    nk = struct.pack(
        "<i2sHQIIIIIIIIIIHHIIIIHH",
        -nk_size, b"nk", KEY_HIVE_ENTRY | KEY_NO_DELETE | KEY_COMP_NAME, ts,
        0,            # access bits / spare
        _NONE,        # parent (the root has none)
        0, 0,         # subkeys, volatile subkeys
        _NONE, _NONE,  # subkey list, volatile subkey list
        0, _NONE,     # values, value list
        sk_off,       # security cell
        _NONE,        # class name
        0, 0,         # largest subkey name length (+ flags/spare)
        0,            # largest subkey class name length
        0, 0,         # largest value name length, largest value data size
        0,            # workvar
        len(name), 0,  # key name length, class name length
    ) + name
    nk = nk.ljust(nk_size, b"\0")

    sk = struct.pack("<i2sHIIII", -sk_size, b"sk", 0, sk_off, sk_off, 1, len(sd)) + sd
    sk = sk.ljust(sk_size, b"\0")

    free = struct.pack("<i", free_size).ljust(free_size, b"\0")

    hbin_header = struct.pack("<4sIIIIQI", b"hbin", 0, BLOCK, 0, 0, ts, 0)
    hbin = hbin_header + nk + sk + free
    assert len(hbin) == BLOCK

    base = bytearray(BLOCK)
    struct.pack_into(
        "<4sIIQIIIIIII", base, 0,
        b"regf", 1, 1, ts,
        1, minor_version,  # version 1.x
        0,                 # file type: primary
        1,                 # file format: direct memory load
        nk_off,            # root cell offset
        BLOCK,             # hive bins data size
        1,                 # clustering factor
    )
    file_name = root_name.encode("utf-16-le")[:64]
    base[0x30:0x30 + len(file_name)] = file_name
    struct.pack_into("<I", base, 0x1FC, _checksum(base))
    return bytes(base) + hbin


def write_empty_hive(path: str | os.PathLike[str], root_name: str = "ROOT", *,
                     minor_version: int = 3) -> Path:
    """Write an empty hive (root key ``root_name``, nothing else) to ``path``; return the path.

    The file is accepted by hivexsh/hivexregedit and can be edited with ``hivexregedit --merge``.
    """
    p = Path(path)
    data = empty_hive_bytes(root_name, minor_version=minor_version)
    with atomic.temporary_path(p) as tmp:
        tmp.write_bytes(data)
    return p


def apply_reg(hive_path: str | os.PathLike[str], reg_text: str, prefix: str, *,
              image_id: str | None = None, step: str = "registry-merge") -> None:
    """Merge regedit-format ``reg_text`` into the local hive file ``hive_path``.

    Runs ``hivexregedit --merge --prefix PREFIX HIVE FILE``; ``reg_text`` is written to a UTF-8
    temporary file with LF line ends (what hivexregedit expects). Strings without a type prefix
    are stored as UTF-16LE (hivexregedit's default); :func:`pipeline.registry.regfile.to_reg_text`
    writes every value as hex so nothing depends on that. Raises ToolError on failure.
    """
    text = reg_text.lstrip("\ufeff").replace("\r\n", "\n")
    if not text.endswith("\n"):
        text += "\n"
    hivex.merge(hive_path, text, prefix, image_id=image_id, step=step)


def export_text(hive_path: str | os.PathLike[str], key_path: str, *, prefix: str | None = None,
                image_id: str | None = None, step: str = Step.REGISTRY_MERGE) -> str:
    """Raw ``hivexregedit --export`` output for ``key_path`` (a path inside the hive, ``\\`` = root).

    Raises ToolError if the key does not exist.
    """
    text = hivex.export(hive_path, _hive_key(key_path), prefix=prefix, image_id=image_id, step=step)
    assert text is not None  # only missing_ok gives None
    return text


def export(hive_path: str | os.PathLike[str], key_path: str, *, prefix: str | None = None,
           image_id: str | None = None, step: str = Step.REGISTRY_MERGE) -> list:
    """Export the subtree ``key_path`` (recursively) and parse it into regfile operations.

    Returns a list of :class:`pipeline.registry.regfile.Op`: one key op per key, one value op per
    value. Key paths are ``prefix`` + hive path (hive path alone, starting with ``\\``, if no
    prefix).
    """
    from pipeline.registry.regfile import parse_text

    text = export_text(hive_path, key_path, prefix=prefix, image_id=image_id, step=step)
    return parse_text(text, source=f"export of {key_path} from {os.fspath(hive_path)}")


def _hive_key(key_path: str) -> str:
    k = key_path.replace("/", "\\")
    if not k.startswith("\\"):
        k = "\\" + k
    if len(k) > 1:
        k = k.rstrip("\\")
    return k
