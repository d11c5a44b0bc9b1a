"""Ghost password protection (docs/gho-format.md §9): key derivation, the keystream cipher, the verifier."""

from __future__ import annotations

import binascii
from collections.abc import Callable

VERIFIER_PLAIN = b"BinaryResearch\x00"
VERIFIER_OFF, VERIFIER_LEN = 0x0C, 15
STORED_PW_OFF, STORED_PW_LEN = 0x1B, 10
MAX_PASSWORD = 11


def _crc32_msb_table() -> list[int]:
    table = []
    for i in range(256):
        c = i << 24
        for _ in range(8):
            c = ((c << 1) ^ 0x04C11DB7) if c & 0x80000000 else (c << 1)
        table.append(c & 0xFFFFFFFF)
    return table


CRC32_MSB_TABLE = _crc32_msb_table()
_REVERSE_BITS = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def crc32_msb(data: bytes) -> int:
    """CRC-32, polynomial 0x04C11DB7, MSB first, initial value 0, no final XOR (§9.1).

    Computed at C speed through :func:`binascii.crc32` (the reflected variant): reversing the bits of every
    input byte and of the result turns one into the other; the init/xor-out of binascii are cancelled by
    passing ``0xFFFFFFFF`` as the start value and XOR-ing the result.
    """
    r = binascii.crc32(bytes(data).translate(_REVERSE_BITS), 0xFFFFFFFF) ^ 0xFFFFFFFF
    return int(f"{r:032b}"[::-1], 2)


def _key_table() -> list[int]:
    table = []
    for i in range(256):
        c = 0x07A2 ^ (i << 8)
        for _ in range(8):
            c = ((c << 1) ^ 0x1021) if c & 0x8000 else (c << 1)
        table.append(c & 0xFFFF)
    return table


KEY_TABLE = _key_table()


def seed_from_password(password: str) -> int:
    """The 16-bit cipher seed of ``password`` (case-insensitive, first 11 characters)."""
    pw = password.upper().encode("latin-1", "replace")[:MAX_PASSWORD]
    crc = 0
    for b in pw:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ CRC32_MSB_TABLE[(crc >> 24) ^ b]
    return (crc ^ (crc >> 16)) & 0xFFFF


_KEY_HI = bytes(t >> 8 for t in KEY_TABLE)
_KEY_LO = bytes(t & 0xFF for t in KEY_TABLE)


_native: list[Callable[[bytes, int], bytes] | None] = []


def decrypt(data: bytes | bytearray | memoryview, seed: int) -> bytes:
    """Decrypt one cipher unit (native helper when available, else :func:`decrypt_py`)."""
    if not _native:
        from pipeline.gho.native import decryptor

        _native.append(decryptor(KEY_TABLE))
    fn = _native[0]
    if fn is not None and len(data) >= 64:
        return fn(bytes(data), seed)
    return decrypt_py(data, seed)


def decrypt_py(data: bytes | bytearray | memoryview, seed: int) -> bytes:
    """Decrypt one cipher unit; the state starts at ``seed`` and is fed with the ciphertext (§9.2).

    state' = ((state & 0xFF) << 8) ^ K[(state >> 8) ^ c], split into its high and low bytes; the
    keystream (the low bytes) is collected and XOR-ed with the data in one big-integer operation.
    """
    n = len(data)
    if n == 0:
        return b""
    kh, kl = _KEY_HI, _KEY_LO
    ks = bytearray(n)
    hi, lo = seed >> 8, seed & 0xFF
    for i, c in enumerate(bytes(data)):
        ks[i] = lo
        x = hi ^ c
        hi = lo ^ kh[x]
        lo = kl[x]
    return (int.from_bytes(data, "little") ^ int.from_bytes(ks, "little")).to_bytes(n, "little")


def verifier_ok(header: bytes, seed: int) -> bool:
    return decrypt(header[VERIFIER_OFF:VERIFIER_OFF + VERIFIER_LEN], seed) == VERIFIER_PLAIN
