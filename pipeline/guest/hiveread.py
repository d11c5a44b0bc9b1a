"""Reading a subtree of a LOCAL hive file into a case-insensitive view (keys and typed values).

One ``hivexregedit --export`` per subtree (through :mod:`pipeline.tools.hivex`, the one door to
hivex's programs); what the values mean is decided by the callers (:mod:`pipeline.guest.network`,
:mod:`pipeline.guest.hypervisor_tools`, :mod:`pipeline.guest.fixes`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from pipeline.registry import regfile
from pipeline.tools import hivex


@dataclass
class Tree:
    """The keys below one exported key, by path relative to it (``""`` = the key itself, parts
    joined with ``\\``, compared case-insensitively as Windows does)."""

    _keys: dict[str, str] = field(default_factory=dict)  # lower rel path → rel path as stored
    _values: dict[str, dict[str, regfile.Op]] = field(default_factory=dict)  # lower rel → lower name → op

    def add_key(self, rel: str) -> None:
        self._keys.setdefault(rel.lower(), rel)
        self._values.setdefault(rel.lower(), {})

    def add_value(self, rel: str, op: regfile.Op) -> None:
        self.add_key(rel)
        self._values[rel.lower()][(op.name or "").lower()] = op

    def has(self, rel: str) -> bool:
        return rel.lower() in self._keys

    def children(self, rel: str = "") -> list[str]:
        """Names of the direct subkeys of ``rel``, in the hive's (sorted) order."""
        prefix = f"{rel.lower()}\\" if rel else ""
        out = []
        for low, stored in self._keys.items():
            if low.startswith(prefix) and low != rel.lower():
                rest = stored[len(prefix):]
                if rest and "\\" not in rest:
                    out.append(rest)
        return out

    def value(self, rel: str, name: str) -> str | int | list[str] | bytes | None:
        """The typed value (str, int, list of str, bytes), None when absent."""
        op = self._values.get(rel.lower(), {}).get(name.lower())
        return op.value if op is not None else None

    def string(self, rel: str, name: str) -> str | None:
        v = self.value(rel, name)
        if isinstance(v, list):
            return " ".join(v)
        return v if isinstance(v, str) else None

    def strings(self, rel: str, name: str) -> tuple[str, ...]:
        """A MULTI_SZ (or a comma/space-separated SZ, as ``NameServer`` is) as a tuple."""
        v = self.value(rel, name)
        items = v if isinstance(v, list) else str(v).replace(",", " ").split() if isinstance(v, str) else []
        return tuple(s.strip() for s in items if s.strip())

    def dword(self, rel: str, name: str) -> int | None:
        v = self.value(rel, name)
        return v if isinstance(v, int) else None

    def walk(self) -> Iterator[str]:
        yield from self._keys.values()


_CACHE: dict[tuple[str, int, int, str, int | None], Tree | None] = {}
_CACHE_MAX = 8


def read_tree(hive_path: str | os.PathLike[str], key: str, *, max_depth: int | None = None,
              image_id: str | None = None, step: str = "inspect") -> Tree | None:
    """The subtree ``key`` (a hive path such as ``\\ControlSet001\\Services\\Tcpip``) of the local
    hive file, None when the key does not exist. The last few reads are kept, keyed by the file's
    size and mtime (the Services key is read by more than one fact)."""
    key = "\\" + key.strip("\\")
    st = os.stat(hive_path)
    ident = (os.fspath(hive_path), st.st_size, st.st_mtime_ns, key.lower(), max_depth)
    if ident in _CACHE:
        return _CACHE[ident]
    tree = _read_tree(hive_path, key, max_depth, image_id, step)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[ident] = tree
    return tree


def _read_tree(hive_path: str | os.PathLike[str], key: str, max_depth: int | None, image_id: str | None,
               step: str) -> Tree | None:
    text = hivex.export(hive_path, key, max_depth=max_depth, missing_ok=True, image_id=image_id, step=step)
    if text is None:
        return None
    tree = Tree()
    base = key.lower()
    for op in regfile.parse_text(text, source=f"export of {key}"):
        k = op.key if op.key.startswith("\\") else "\\" + op.key
        if not k.lower().startswith(base):
            continue
        rel = k[len(base):].strip("\\")
        if op.is_key:
            tree.add_key(rel)
        elif not op.delete:
            tree.add_value(rel, op)
    tree.add_key("")
    return tree
