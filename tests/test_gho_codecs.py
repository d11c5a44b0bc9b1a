"""Codecs and cipher: spec test vectors, differential tests against the spec's pseudo-code."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from pipeline.gho import native
from pipeline.gho.codecs import BlockDecoder, CodecError, fast_decode, fast_hash, zlib_decode
from pipeline.gho.crypto import KEY_TABLE, crc32_msb, decrypt, decrypt_py, seed_from_password
from tests.support import gho_writer as gw
from tests.support.gho_checks import FIXTURES


def spec_fast_decode(payload: bytes) -> bytes:
    """docs/gho-format.md §7.4 pseudo-code, literally (the oracle)."""
    if payload[0] == 1:
        return payload[4:]
    s = payload[4:]
    i, out, table, lit, bits, nbits = 0, bytearray(), [None] * 4096, 0, 0, 0
    while i < len(s):
        if nbits == 0:
            if len(s) - i < 2:
                break
            bits, nbits, i = s[i] | s[i + 1] << 8, 16, i + 2
            continue
        is_match, bits, nbits = bits & 1, bits >> 1, nbits - 1
        if not is_match:
            out.append(s[i])
            i += 1
            lit += 1
            if lit == 3:
                p = len(out) - 3
                table[fast_hash(out[p], out[p + 1], out[p + 2])] = p
                lit = 2
        else:
            if len(s) - i < 2:
                break
            b0, b1 = s[i], s[i + 1]
            i += 2
            slot, n = ((b0 & 0xF0) << 4) | b1, 3 + (b0 & 0x0F)
            src, start = table[slot], len(out)
            for j in range(n):
                out.append(b"123456789012345678"[j] if src is None else out[src + j])
            if lit > 0:
                p = start - lit
                table[fast_hash(out[p], out[p + 1], out[p + 2])] = p
                if lit == 2:
                    table[fast_hash(out[p + 1], out[p + 2], out[p + 3])] = p + 1
                lit = 0
            table[slot] = start
    return bytes(out)


def _native():  # type: ignore[no-untyped-def]
    """The C decoder; the supported set-up (make venv after scripts/setup-system.sh) always builds it."""
    f = native.fast_decoder()
    assert f is not None, ("the C extension pipeline.gho._native is not built: run `make venv` (needs gcc "
                           "and python3-dev, scripts/setup-system.sh)")
    return f


def test_hash_vectors() -> None:
    args = [(0, 0, 0), (1, 0, 0), (1, 2, 3), (0x61, 0x62, 0x63), (0x20, 0x20, 0x20)]
    assert [fast_hash(*t) for t in args] == [0x000, 0x5F0, 0x05F, 0xABD, 0x69E]


@pytest.mark.parametrize("impl", ["python", "native"])
def test_fast_vectors(impl: str) -> None:
    dec = fast_decode if impl == "python" else (lambda p, lim=65536: _native()(p, lim))
    assert dec(bytes.fromhex("000000001800616263a3bdf2ff")) == b"abcabcabc12345"
    assert BlockDecoder(2).decode(bytes.fromhex("0100000068656c6c6f")) == b"hello"


def _random_payloads(count: int) -> list[bytes]:
    rnd = random.Random(1234)
    out = []
    for k in range(count):
        n = rnd.randint(0, 400)
        alpha = [bytes(range(256)), b"\x00\x01", b"ab\xff"][k % 3]
        out.append(b"\0\0\0\0" + bytes(rnd.choice(alpha) for _ in range(n)))
    return out


def test_python_fast_decoder_matches_spec_pseudocode() -> None:
    for p in _random_payloads(600):
        assert fast_decode(p) == spec_fast_decode(p)


def test_native_fast_decoder_matches_spec_pseudocode() -> None:
    f = _native()
    for p in _random_payloads(600):
        assert f(p, 65536) == spec_fast_decode(p)


def test_fast_round_trip_with_writer_encoder() -> None:
    rnd = random.Random(5)
    pieces = [b"the quick brown fox ", bytes(50)]
    data = b"".join(rnd.choice([*pieces, bytes([rnd.randrange(256)])]) for _ in range(3000))
    for k in range(0, len(data), 32768):
        block = data[k:k + 32768]
        p = gw.fast_encode(block)
        assert p[0] == 0 and len(p) < len(block) // 2
        assert fast_decode(p) == block == BlockDecoder(2).decode(p)


def test_fast_overflow_rejected() -> None:
    bomb = b"\0\0\0\0" + (b"\xff\xff" + b"\x0f\x00" * 16) * 300  # 16 matches of 18 bytes per word
    with pytest.raises(CodecError, match="decodes to more than 32768 bytes"):
        fast_decode(bomb, 32768)
    with pytest.raises(CodecError, match="decodes to more than 32768 bytes"):
        BlockDecoder(2).decode(bomb, 32768)


def test_native_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GHO2KVM_GHO_NATIVE", "0")
    assert native.extension() is None and native.fast_decoder() is None
    assert not BlockDecoder(2).uses_native
    assert BlockDecoder(2).decode(bytes.fromhex("000000001800616263a3bdf2ff")) == b"abcabcabc12345"


def _fixture_blocks() -> list[bytes]:
    """Real record data: the uncompressed Ghost-made fixture (its records hold the files' bytes as stored:
    IO.SYS, COMMAND.COM, directory entries, FATs...) cut into 32 KiB blocks, and a few edge cases."""
    data = (FIXTURES / "75_none.gho").read_bytes()
    blocks = [data[k:k + 32768] for k in range(0, len(data), 32768)]
    return blocks + [b"", b"a", bytes(32768), b"ab" * 16384, bytes(range(256)) * 128]


def _fixture_payloads() -> list[bytes]:
    return [gw.fast_encode(b, store_if_larger=False) for b in _fixture_blocks()]


def test_extension_and_fallback_agree_on_fixture_records() -> None:
    """The C extension and the pure-Python decoder give the same bytes for the same payloads."""
    payloads = _fixture_payloads()
    c_dec = _native()
    py = BlockDecoder(2, native=False)
    assert BlockDecoder(2).uses_native and not py.uses_native
    for block, p in zip(_fixture_blocks(), payloads, strict=True):
        assert c_dec(p, 65536) == fast_decode(p) == py.decode(p) == BlockDecoder(2).decode(p) == block
    for p in _random_payloads(300):  # arbitrary token streams, not only what an encoder makes
        assert c_dec(p, 65536) == fast_decode(p)
    for p in payloads[:4]:  # the same overflow verdict
        for limit in (0, 100, 4095):
            want = None if len(fast_decode(p)) > limit else fast_decode(p)
            assert c_dec(p, limit) == want


def test_cipher_extension_and_fallback_agree_on_fixture_bytes() -> None:
    c_dec = native.decryptor(KEY_TABLE)
    assert c_dec is not None
    data = (FIXTURES / "11_high_pw.gho").read_bytes()  # the password fixture: real ciphertext
    for k, seed in enumerate((seed_from_password("password"), 0, 0xFFFF)):
        unit = data[k * 32768:(k + 1) * 32768]
        assert c_dec(unit, seed) == decrypt_py(unit, seed) == decrypt(unit, seed)


_WITHOUT_EXTENSION = """
import hashlib, sys
from importlib.abc import MetaPathFinder

class NoExtension(MetaPathFinder):  # as if setup.py had not built it (no compiler at install time)
    def find_spec(self, name, path=None, target=None):
        if name == "pipeline.gho._native":
            raise ImportError("blocked by the test")
        return None

sys.meta_path.insert(0, NoExtension())
from pipeline.gho import native
from pipeline.gho.codecs import BlockDecoder
from pipeline.gho.crypto import decrypt
dec = BlockDecoder(2)
print(native.extension() is None, dec.uses_native)
h = hashlib.sha256()
for line in sys.stdin.read().split():
    p = bytes.fromhex(line)
    h.update(dec.decode(p))
    h.update(decrypt(p, 0x9BE1))
print(h.hexdigest())
"""


def test_fallback_is_used_when_the_extension_is_absent() -> None:
    payloads = _fixture_payloads()[:6]
    env = {k: v for k, v in os.environ.items() if k != "GHO2KVM_GHO_NATIVE"}
    text = "\n".join(p.hex() for p in payloads)
    out = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], input=text, capture_output=True,
                         text=True, check=True, cwd=Path(__file__).parents[1], env=env).stdout.split()
    assert out[:2] == ["True", "False"]  # no extension, the pure-Python decoder in charge
    h = hashlib.sha256()  # ... and the bytes the extension gives here
    for p in payloads:
        h.update(BlockDecoder(2).decode(p))
        h.update(decrypt(p, 0x9BE1))
    assert out[2] == h.hexdigest()


def test_zlib_blocks() -> None:
    data = bytes(range(256)) * 128
    good = zlib.compress(data)
    assert zlib_decode(good) == data == BlockDecoder(3).decode(good)
    assert BlockDecoder(3).decode(b"\x01\x00\x00\x00raw") == b"raw"  # stored escape
    with pytest.raises(CodecError) as ei:
        zlib_decode(good[:-30])
    assert ei.value.what == "corrupt zlib block"
    with pytest.raises(CodecError, match="bytes after the end of the stream"):
        zlib_decode(good + b"xx")
    with pytest.raises(CodecError, match="decodes to more than 1000 bytes"):
        zlib_decode(good, 1000)


def test_cipher_tables_and_seed() -> None:
    assert KEY_TABLE[:8] == [0xD2E7, 0xC2C6, 0xF2A5, 0xE284, 0x9263, 0x8242, 0xB221, 0xA200]
    assert KEY_TABLE[255] == 0xCC17
    assert seed_from_password("password") == 0x9BE1 == gw.password_seed("password")
    assert seed_from_password("x" * 11) == seed_from_password("X" * 11 + "ignored")


def test_crc32_msb_matches_bitwise_definition() -> None:
    rnd = random.Random(9)
    for n in (0, 1, 5, 31, 32, 1000):
        d = bytes(rnd.randrange(256) for _ in range(n))
        assert crc32_msb(d) == gw.crc32_msb_bytes(d)
    assert crc32_msb(b"THIS IS A TEST\r\n") == 0x4D176E6E


def test_decrypt_inverts_encrypt() -> None:
    rnd = random.Random(3)
    d = bytes(rnd.randrange(256) for _ in range(5000))
    for seed in (0, 0x9BE1, 0xFFFF):
        enc = gw.encrypt(d, seed)
        assert enc != d and decrypt(enc, seed) == d == decrypt_py(enc, seed)
        assert decrypt(enc[:10], seed) == d[:10]  # short units take the Python path
