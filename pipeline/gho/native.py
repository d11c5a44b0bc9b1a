"""The optional C helpers of the GHO reader: the compiled extension :mod:`pipeline.gho._native`.

Why: the Fast codec (§7.4) is a byte-oriented LZ77 whose match table depends on every output byte,
so a Python decoder pays interpreter cost per token (a few MB/s on real data); the keystream cipher
(§9.2) is byte-serial for the same reason. The same algorithms in C (``pipeline/gho/_native.c``) are
built by setuptools when the package is installed (``pip install -e .``, ``make venv``; setup.py),
never at run time. When the extension is absent (no compiler at install time, another interpreter)
or ``GHO2KVM_GHO_NATIVE=0`` is set, the pure-Python code in :mod:`pipeline.gho.codecs` and
:mod:`pipeline.gho.crypto` is used; both give identical output (tested on the same inputs).
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable
from types import ModuleType


def extension() -> ModuleType | None:
    """The compiled module, or None when it is not installed or switched off."""
    if os.environ.get("GHO2KVM_GHO_NATIVE", "1") == "0":
        return None
    try:
        from pipeline.gho import _native
    except ImportError:
        return None
    return _native


def fast_decoder() -> Callable[[bytes, int], bytes | None] | None:
    """The native decoder ``f(payload, limit) -> bytes | None`` (None = overflow), or None if unavailable."""
    ext = extension()
    return None if ext is None else ext.fast_decode


def decryptor(key_table: list[int]) -> Callable[[bytes, int], bytes] | None:
    """The native ``f(data, seed) -> plaintext`` for one cipher unit, or None if unavailable."""
    ext = extension()
    if ext is None:
        return None
    cfn = ext.decrypt
    keys = array("H", key_table).tobytes()

    def decrypt(data: bytes, seed: int) -> bytes:
        return cfn(data, seed, keys)

    return decrypt
