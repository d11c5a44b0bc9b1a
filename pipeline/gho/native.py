"""Optional native helpers (Fast-LZ decoder, cipher): small C functions built once with ``cc``.

Why: the Fast codec (§7.4) is a byte-oriented LZ77 whose match table depends on every output byte,
so a Python decoder pays interpreter cost per token (a few MB/s on real data). When a C compiler is
available the same algorithm is compiled (``cc -O2 -shared``) into the user's cache folder on first
use and called through :mod:`ctypes`; otherwise, or with ``GHO2KVM_GHO_NATIVE=0``, the pure-Python
decoder in :mod:`pipeline.gho.codecs` is used. Both give identical output (tested differentially).
The keystream cipher (§9.2) is byte-serial for the same reason and uses the same library.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from pipeline.core.errors import Gho2KvmError

C_SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static const unsigned char DIGITS[] = "123456789012345678";

static inline unsigned h3(unsigned x, unsigned y, unsigned z) {
    uint32_t v = (uint32_t)(z ^ (y << 4) ^ (x << 8));
    return (uint32_t)(v * 0xFFFF9E5Fu) >> 4 & 0xFFFu;
}

/* Decode the token stream s[4..n) into out (capacity cap). Returns the output length or -1. */
long gho_fast_decode(const unsigned char *s, size_t n, unsigned char *out, size_t cap) {
    int64_t table[4096];
    size_t i = 4, o = 0, run_start = 0, p, j;
    unsigned bits = 0;
    int nbits = 0;
    for (j = 0; j < 4096; j++) table[j] = -1;
    while (i < n) {
        if (nbits == 0) {
            if (n - i < 2) break;
            bits = s[i] | ((unsigned)s[i + 1] << 8);
            nbits = 16;
            i += 2;
            continue;
        }
        if (!(bits & 1)) {
            bits >>= 1; nbits--;
            if (o >= cap) return -1;
            out[o++] = s[i++];
            continue;
        }
        bits >>= 1; nbits--;
        if (n - i < 2) break;
        {
            unsigned b0 = s[i], b1 = s[i + 1];
            unsigned slot = ((b0 & 0xF0u) << 4) | b1;
            size_t ln = 3 + (b0 & 0x0Fu), start = o;
            int64_t src;
            i += 2;
            if (o + ln > cap) return -1;
            for (p = run_start; p + 2 < start; p++) table[h3(out[p], out[p + 1], out[p + 2])] = (int64_t)p;
            src = table[slot];
            if (src < 0) memcpy(out + o, DIGITS, ln);
            else for (j = 0; j < ln; j++) out[o + j] = out[(size_t)src + j];
            o += ln;
            for (; p < start; p++) table[h3(out[p], out[p + 1], out[p + 2])] = (int64_t)p;
            table[slot] = (int64_t)start;
            run_start = o;
        }
    }
    return (long)o;
}

/* Ghost keystream cipher (FORMAT.md 9.2): one unit, state fed with the ciphertext. */
void gho_decrypt(const unsigned char *in, size_t n, unsigned seed, const uint16_t *k, unsigned char *out) {
    unsigned st = seed & 0xFFFFu;
    size_t i;
    for (i = 0; i < n; i++) {
        unsigned c = in[i];
        out[i] = (unsigned char)(c ^ (st & 0xFFu));
        st = (((st & 0xFFu) << 8) ^ k[(st >> 8) ^ c]) & 0xFFFFu;
    }
}
"""

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gho2kvm"


def _build(lib: Path) -> None:
    from pipeline.tools.run import run  # every external program goes through the wrapper

    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        src = Path(tmp) / "fastlz.c"
        src.write_text(C_SOURCE)
        out = Path(tmp) / lib.name
        run([os.environ.get("CC", "cc"), "-O2", "-shared", "-fPIC", "-o", str(out), str(src)],
            step="gho-native-build", timeout=120)
        os.replace(out, lib)


def _library() -> ctypes.CDLL | None:
    if os.environ.get("GHO2KVM_GHO_NATIVE", "1") == "0":
        return None
    with _lock:
        if "lib" in _loaded:
            return _loaded["lib"]
        dll = None
        with contextlib.suppress(OSError, Gho2KvmError, AttributeError):
            tag = hashlib.sha256(C_SOURCE.encode()).hexdigest()[:16]
            lib = _cache_dir() / f"gho_native_{tag}.so"
            if not lib.exists():
                _build(lib)
            dll = ctypes.CDLL(str(lib))
            dll.gho_fast_decode.restype = ctypes.c_long
            dll.gho_fast_decode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p,
                                             ctypes.c_size_t]
            dll.gho_decrypt.restype = None
            dll.gho_decrypt.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_void_p,
                                        ctypes.c_void_p]
        _loaded["lib"] = dll
        return dll


def fast_decoder() -> Callable[[bytes, int], bytes | None] | None:
    """The native decoder ``f(payload, limit) -> bytes | None`` (None = overflow), or None if unavailable."""
    dll = _library()
    if dll is None:
        return None
    cfn = dll.gho_fast_decode
    local = threading.local()

    def decode(payload: bytes, limit: int) -> bytes | None:
        buf = getattr(local, "buf", None)
        if buf is None or len(buf) < limit + 32:
            buf = local.buf = ctypes.create_string_buffer(limit + 32)
        n = cfn(payload, len(payload), buf, limit)
        return None if n < 0 else ctypes.string_at(buf, n)

    return decode


def decryptor(key_table: list[int]) -> Callable[[bytes, int], bytes] | None:
    """The native ``f(data, seed) -> plaintext`` for one cipher unit, or None if unavailable."""
    dll = _library()
    if dll is None:
        return None
    cfn = dll.gho_decrypt
    keys = (ctypes.c_uint16 * 256)(*key_table)

    def decrypt(data: bytes, seed: int) -> bytes:
        out = ctypes.create_string_buffer(len(data))
        cfn(data, len(data), seed, keys, out)
        return out.raw

    return decrypt
