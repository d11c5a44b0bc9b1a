"""Parser and writer for regedit's ``.reg`` format.

Accepted input: ``Windows Registry Editor Version 5.00`` or ``REGEDIT4`` header; UTF-16LE/BE with
BOM, UTF-8 with or without BOM, or (REGEDIT4) ANSI cp1252; CRLF or LF; ``\\`` continuation
lines; ``;`` comments; ``[KEY]``, ``[-KEY]``; ``"name"="string"`` with ``\\\\`` and ``\\"``
escapes; ``@=`` default value; ``dword:``; ``hex:``; ``hex(N):``; ``"name"=-``.

The result is a flat list of :class:`Op` in file order. The writer (:func:`to_reg_text`) produces
text for ``hivexregedit --merge`` in which every value is spelled as raw bytes (``hex(N):`` or
``dword:``), so hivexregedit's ``--encoding`` default never changes what ends up in the hive.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from pathlib import Path

from pipeline.core.errors import InputError
from pipeline.core.safeio import MiB, read_capped

HEADER_V5 = "Windows Registry Editor Version 5.00"
HEADER_V4 = "REGEDIT4"
MAX_REG_BYTES = 16 * MiB  # a .reg file larger than this is refused before it is read


class RegType(IntEnum):
    NONE = 0
    SZ = 1
    EXPAND_SZ = 2
    BINARY = 3
    DWORD = 4
    DWORD_BIG_ENDIAN = 5
    LINK = 6
    MULTI_SZ = 7
    RESOURCE_LIST = 8
    FULL_RESOURCE_DESCRIPTOR = 9
    RESOURCE_REQUIREMENTS_LIST = 10
    QWORD = 11


def type_name(t: int | None) -> str:
    if t is None:
        return "-"
    try:
        return f"REG_{RegType(t).name}"
    except ValueError:
        return f"type 0x{t:x}"


class RegSyntaxError(InputError):
    """A ``.reg`` file (or a key in it) is not acceptable; names the file and line."""

    def __init__(self, file: str, line: int, message: str, *, image_id: str | None = None,
                 step: str | None = None) -> None:
        self.file = file
        self.line = line
        self.reason = message
        super().__init__(f"{file}:{line}: {message}", image_id=image_id, step=step)


class Policy(StrEnum):
    """How an op meets what the hive already has (:mod:`pipeline.registry.edits` does the accounting).

    ``exact``: a user's ``.reg``: do what it says. ``fill``: add when absent, keep the guest's own
    value. ``fill_spelled``: ``fill``, a string spelled (case) like the same-named value of the
    key's siblings in the hive. ``force``: add when absent, change when different. ``existing``:
    ``force`` (a value) or create nothing (a key) where the key is absent in the guest. ``cdd``: a
    CriticalDeviceDatabase entry: kept whole when its ``Service`` names a service the guest has.
    """

    EXACT = "exact"
    FILL = "fill"
    FILL_SPELLED = "fill_spelled"
    FORCE = "force"
    EXISTING = "existing"
    CDD = "cdd"


@dataclass(frozen=True)
class Op:
    """One registry change.

    * ``name is None``: key operation: create ``key`` (``delete=False``) or delete it with its
      whole subtree (``delete=True``).
    * ``name`` is a str (``""`` = the default value ``@``): set the value to ``type``/``data``
      or delete it (``delete=True``, ``type``/``data`` None).

    ``data`` is the exact byte string stored in the hive; :attr:`value` decodes it.
    """

    key: str
    name: str | None = None
    type: int | None = None
    data: bytes | None = None
    delete: bool = False
    file: str = "<text>"
    line: int = 0
    policy: Policy = Policy.EXACT
    ancestor: bool = False  # a parent key plan() inserted (hivexregedit needs parents first)

    @property
    def is_key(self) -> bool:
        return self.name is None

    @property
    def value(self) -> str | int | list[str] | bytes | None:
        """Typed view of ``data``: str for SZ/EXPAND_SZ/LINK, list[str] for MULTI_SZ, int for
        DWORD/QWORD, bytes otherwise (or if the data does not fit the type)."""
        if self.data is None or self.type is None:
            return None
        return decode_value(self.type, self.data)

    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def describe(self) -> str:
        if self.is_key:
            return f"{'delete ' if self.delete else ''}key [{self.key}]"
        shown = "@" if self.name == "" else f'"{self.name}"'
        if self.delete:
            return f"delete value [{self.key}] {shown}"
        return f"[{self.key}] {shown} = {type_name(self.type)} {self.value!r}"


# ----------------------------------------------------------------------------- values

def encode_sz(s: str) -> bytes:
    return (s + "\0").encode("utf-16-le")


def encode_multi_sz(items: Iterable[str]) -> bytes:
    return "".join(i + "\0" for i in items).encode("utf-16-le") + b"\0\0"


def encode_dword(n: int) -> bytes:
    return n.to_bytes(4, "little")


def decode_value(t: int, data: bytes) -> str | int | list[str] | bytes:
    try:
        if t in (RegType.SZ, RegType.EXPAND_SZ, RegType.LINK) and len(data) % 2 == 0:
            s = data.decode("utf-16-le")
            return s[:-1] if s.endswith("\0") else s
        if t == RegType.MULTI_SZ and len(data) % 2 == 0:
            s = data.decode("utf-16-le")
            while s.endswith("\0"):
                s = s[:-1]
            return s.split("\0") if s else []
        if t == RegType.DWORD and len(data) == 4:
            return int.from_bytes(data, "little")
        if t == RegType.DWORD_BIG_ENDIAN and len(data) == 4:
            return int.from_bytes(data, "big")
        if t == RegType.QWORD and len(data) == 8:
            return int.from_bytes(data, "little")
    except UnicodeDecodeError:
        pass
    return data


# ----------------------------------------------------------------------------- decoding

def decode_file_bytes(raw: bytes) -> str:
    """Text of a ``.reg`` file: BOM-detected UTF-16LE/BE or UTF-8, else BOM-less UTF-16LE (NUL
    in every odd byte of the header), else UTF-8, else cp1252 (old REGEDIT4 files)."""
    if raw.startswith(b"\xff\xfe"):
        return raw[2:].decode("utf-16-le", errors="strict")
    if raw.startswith(b"\xfe\xff"):
        return raw[2:].decode("utf-16-be", errors="strict")
    if raw.startswith(b"\xef\xbb\xbf"):
        return raw[3:].decode("utf-8")
    head = raw[:16]
    if len(head) >= 4 and head[1::2].count(0) == len(head[1::2]) and head[0::2].count(0) == 0:
        return raw.decode("utf-16-le")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


# ----------------------------------------------------------------------------- parsing

_HEX_TYPE = re.compile(r"hex\(([0-9A-Fa-f]{1,8})\):", re.ASCII | re.IGNORECASE)
_HEXBYTE = re.compile(r"[0-9A-Fa-f]{1,2}", re.ASCII)
_DWORD = re.compile(r"dword:([0-9A-Fa-f]{1,8})", re.ASCII | re.IGNORECASE)


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Split into (first physical line number, joined line); handles ``\\`` continuations.

    Linear in the file size: the pieces of a continued line are collected and joined once."""
    out: list[tuple[int, str]] = []
    physical = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    i = 0
    n = len(physical)
    while i < n:
        start = i + 1
        line = physical[i].rstrip()
        i += 1
        head = line.lstrip()
        if not head.startswith(";") and not head.startswith("[") and line.endswith("\\"):
            parts = [line[:-1]]
            while i < n:
                piece = physical[i].strip()
                i += 1
                if piece.endswith("\\"):
                    parts.append(piece[:-1])
                    continue
                parts.append(piece)
                break
            line = "".join(parts).rstrip()
        out.append((start, line))
    return out


def _parse_quoted(s: str, pos: int, file: str, lineno: int, what: str) -> tuple[str, int]:
    """Parse a double-quoted string starting at ``s[pos] == '"'``; return (text, index after)."""
    assert s[pos] == '"'
    buf: list[str] = []
    i = pos + 1
    while i < len(s):
        c = s[i]
        if c == '"':
            return "".join(buf), i + 1
        if c == "\\":
            if i + 1 >= len(s):
                break
            nxt = s[i + 1]
            if nxt not in '\\"':
                raise RegSyntaxError(
                    file, lineno, f'unknown escape "\\{nxt}" in {what}: expected \\\\ or \\"'
                )
            buf.append(nxt)
            i += 2
            continue
        buf.append(c)
        i += 1
    raise RegSyntaxError(file, lineno, f"unterminated {what}: expected a closing double quote")


def _rest_ok(rest: str) -> bool:
    rest = rest.strip()
    return not rest or rest.startswith(";")


def normalize_key(key: str) -> str:
    """Strip surrounding blanks and trailing backslashes; reject empty path components."""
    k = key.strip().rstrip("\\")
    return k


def _check_key(key: str, file: str, lineno: int) -> str:
    k = normalize_key(key)
    if key.strip().startswith("\\"):
        # hive-relative path as exported by hivexregedit without --prefix ("\\" is the root)
        if not k:
            return "\\"
        if any(part == "" for part in k[1:].split("\\")):
            raise RegSyntaxError(file, lineno, f"empty path component in key [{key}]")
        return k
    if not k:
        raise RegSyntaxError(file, lineno, "empty key name: expected [HKEY_...\\path]")
    if any(part == "" for part in k.split("\\")):
        raise RegSyntaxError(file, lineno, f"empty path component in key [{key}]")
    if k.startswith("-"):
        raise RegSyntaxError(file, lineno, f"invalid key name [{key}]")
    return k


def _parse_hex_bytes(body: str, file: str, lineno: int) -> bytes:
    body = body.strip()
    if ";" in body:
        body = body.split(";", 1)[0].strip()
    if not body:
        return b""
    out = bytearray()
    tokens = [t.strip() for t in body.split(",")]
    if len(tokens) > 1 and not tokens[-1]:
        tokens.pop()  # a trailing comma (e.g. a continuation artefact) is tolerated
    for tok in tokens:
        if not _HEXBYTE.fullmatch(tok):
            raise RegSyntaxError(file, lineno, f"bad hex byte {tok!r}: expected two hex digits")
        out.append(int(tok, 16))
    return bytes(out)


def _ansi_to_utf16(data: bytes) -> bytes:
    """REGEDIT4 string data (hex(2)/hex(7)) is ANSI; regedit converts it to UTF-16LE."""
    return data.decode("cp1252", errors="replace").encode("utf-16-le")


def _parse_value(rhs: str, file: str, lineno: int, regedit4: bool) -> tuple[int | None, bytes | None]:
    """Parse what follows ``=``; (None, None) means delete."""
    s = rhs.strip()
    if s.startswith("-") and _rest_ok(s[1:]):
        return None, None
    if s.startswith('"'):
        text, end = _parse_quoted(s, 0, file, lineno, "string value")
        if not _rest_ok(s[end:]):
            raise RegSyntaxError(file, lineno, f"unexpected text after string value: {s[end:].strip()!r}")
        return RegType.SZ, encode_sz(text)
    low = s.lower()
    m = _DWORD.match(s)
    if m and low.startswith("dword:"):
        if not _rest_ok(s[m.end():]):
            raise RegSyntaxError(file, lineno, "bad dword: expected dword: and at most 8 hex digits")
        return RegType.DWORD, encode_dword(int(m.group(1), 16))
    if low.startswith("dword:"):
        raise RegSyntaxError(file, lineno, "bad dword: expected dword: and at most 8 hex digits")
    if low.startswith("hex:"):
        return RegType.BINARY, _parse_hex_bytes(s[4:], file, lineno)
    m = _HEX_TYPE.match(s)
    if m:
        t = int(m.group(1), 16)
        data = _parse_hex_bytes(s[m.end():], file, lineno)
        if regedit4 and t in (RegType.SZ, RegType.EXPAND_SZ, RegType.MULTI_SZ):
            data = _ansi_to_utf16(data)
        return t, data
    raise RegSyntaxError(
        file, lineno,
        f"bad value {s[:40]!r}: expected \"string\", dword:, hex:, hex(N): or - (delete)",
    )


def parse_text(text: str, source: str = "<text>", *, require_header: bool = True) -> list[Op]:
    """Parse regedit text into a list of :class:`Op` (file order). Raises RegSyntaxError."""
    if text.startswith("\ufeff"):
        text = text[1:]
    lines = _logical_lines(text)
    ops: list[Op] = []
    key: str | None = None
    regedit4 = False
    seen_header = not require_header
    for lineno, line in lines:
        stripped = line.strip()
        if not stripped or stripped.startswith(";"):
            continue
        if not seen_header:
            if stripped == HEADER_V5 or stripped.startswith("Windows Registry Editor Version"):
                seen_header = True
                continue
            if stripped == HEADER_V4:
                seen_header = True
                regedit4 = True
                continue
            raise RegSyntaxError(
                source, lineno, f'expected header "{HEADER_V5}" or "{HEADER_V4}", found {stripped[:40]!r}'
            )
        if stripped.startswith("["):
            end = stripped.rfind("]")
            if end < 0 or not _rest_ok(stripped[end + 1:]):
                raise RegSyntaxError(source, lineno, "bad key line: expected [KEY] or [-KEY]")
            inner = stripped[1:end]
            if inner.startswith("-"):
                k = _check_key(inner[1:], source, lineno)
                ops.append(Op(k, delete=True, file=source, line=lineno))
                key = None
            else:
                key = _check_key(inner, source, lineno)
                ops.append(Op(key, file=source, line=lineno))
            continue
        if stripped.startswith('"') or stripped.startswith("@"):
            if key is None:
                raise RegSyntaxError(source, lineno, "value outside a key section: expected [KEY] first")
            if stripped.startswith("@"):
                name, end = "", 1
            else:
                name, end = _parse_quoted(stripped, 0, source, lineno, "value name")
            rest = stripped[end:].lstrip()
            if not rest.startswith("="):
                raise RegSyntaxError(source, lineno, "expected = after the value name")
            t, data = _parse_value(rest[1:], source, lineno, regedit4)
            if t is None:
                ops.append(Op(key, name, delete=True, file=source, line=lineno))
            else:
                ops.append(Op(key, name, int(t), data, file=source, line=lineno))
            continue
        raise RegSyntaxError(
            source, lineno, f'unexpected text {stripped[:40]!r}: expected [KEY], "name"=value or @=value'
        )
    if not seen_header:
        raise RegSyntaxError(source, 1, f'empty file: expected header "{HEADER_V5}"')
    return ops


def parse_bytes(raw: bytes, source: str = "<bytes>") -> list[Op]:
    try:
        text = decode_file_bytes(raw)
    except UnicodeDecodeError as e:
        raise RegSyntaxError(source, 1, f"cannot decode file: {e.reason}") from None
    return parse_text(text, source)


def parse_file(path: str | Path) -> list[Op]:
    """Parse a ``.reg`` file from disk; errors name the file and line. Only a regular file of at
    most MAX_REG_BYTES is read (stat first: a FIFO or device is never opened)."""
    p = Path(path)
    raw = read_capped(p, MAX_REG_BYTES, ".reg file")
    return parse_bytes(raw, str(p))


# ----------------------------------------------------------------------------- writing

def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _value_line(op: Op) -> str:
    assert op.name is not None
    lhs = "@" if op.name == "" else _quote(op.name)
    if op.delete:
        return f"{lhs}=-"
    assert op.type is not None and op.data is not None
    if op.type == RegType.DWORD and len(op.data) == 4:
        return f"{lhs}=dword:{int.from_bytes(op.data, 'little'):08x}"
    hexdata = ",".join(f"{b:02x}" for b in op.data)
    return f"{lhs}=hex({op.type:x}):{hexdata}"


def to_reg_text(ops: Iterable[Op]) -> str:
    """Regedit 5 text (LF line ends, UTF-8-safe) for ``ops``, in order.

    Consecutive ops on the same key share one ``[KEY]`` section unless a value name repeats
    (hivexregedit applies deletions before sets within a section). Values are always written as
    ``hex(N):`` bytes (``dword:`` for 4-byte DWORDs), so the result is byte-exact with
    ``hivexregedit --merge`` whatever its ``--encoding``. No line ends in a backslash.
    """
    out = [HEADER_V5, ""]
    current: str | None = None
    names: set[str] = set()  # value names already in the current section
    for op in ops:
        if "\n" in op.key or "\r" in op.key:
            raise RegSyntaxError(op.file, op.line, f"key name cannot be written: {op.key!r}")
        if op.is_key and op.delete:
            if current is not None:
                out.append("")
            out.append(f"[-{op.key}]")
            out.append("")
            current = None
            continue
        # hivexregedit applies a section's deletions before its sets and does not de-duplicate,
        # so a value named twice needs a new section to keep file order.
        repeated = op.name is not None and op.name.lower() in names
        if current is None or current.lower() != op.key.lower() or repeated:
            if current is not None:
                out.append("")
            out.append(f"[{op.key}]")
            current = op.key
            names = set()
        if not op.is_key:
            assert op.name is not None
            names.add(op.name.lower())
            if op.name is not None and ("\n" in op.name or "\r" in op.name):
                raise RegSyntaxError(op.file, op.line, f"value name cannot be written: {op.name!r}")
            out.append(_value_line(op))
    out.append("")
    return "\n".join(out) + "\n"
