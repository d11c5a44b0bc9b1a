"""hivex's command-line tools on a local hive file: the one module that runs them.

``hivexregedit`` (Debian ``libwin-hivex-perl``) merges regedit-format text into a hive and exports a
subtree as regedit text; ``hivexget`` (``libhivex-bin``) prints one key's values. Every run goes
through :func:`pipeline.tools.run.run`; what the text means is decided by :mod:`pipeline.registry`.
Nothing here needs libguestfs.
"""

from __future__ import annotations

import contextlib
import os
import tempfile

from pipeline.core.errors import ToolError
from pipeline.tools.run import run

HIVEXREGEDIT = "hivexregedit"
HIVEXGET = "hivexget"

#: Perl's STDOUT layer for ``--export``: without it, names whose characters all fit in Latin-1 are
#: printed as Latin-1 bytes and others as UTF-8. ``--merge`` reads the file as UTF-8 bytes, which
#: hivex stores correctly, so it runs with Perl's Unicode features off.
EXPORT_ENV = {"PERL_UNICODE": "O"}
MERGE_ENV = {"PERL_UNICODE": "0"}

#: what hivexregedit --export dies with when the key does not exist; its exit status is Perl's
#: ``die`` status (errno or 255), the same as for other failures, so its words are the only signal.
_PATH_NOT_FOUND = "path not found"


def merge(hive_path: str | os.PathLike[str], reg_text: str, prefix: str, *, image_id: str | None = None,
          step: str) -> None:
    """``hivexregedit --merge --prefix PREFIX HIVE FILE`` with ``reg_text`` written to a temporary
    UTF-8 file as given (the caller spells it the way hivexregedit expects). Raises ToolError."""
    fd, name = tempfile.mkstemp(prefix="gho2kvm-", suffix=".reg")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(reg_text)
        run([HIVEXREGEDIT, "--merge", "--prefix", prefix, os.fspath(hive_path), name],
            step=step, image_id=image_id, env=MERGE_ENV)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def export(hive_path: str | os.PathLike[str], key: str, *, prefix: str | None = None,
           max_depth: int | None = None, missing_ok: bool = False, image_id: str | None = None,
           step: str) -> str | None:
    """``hivexregedit --export`` of ``key`` (a hive path, ``\\`` = the root): regedit text.

    With ``missing_ok`` a key that does not exist gives None; otherwise, and for every other
    failure, a :class:`ToolError` (its ``returncode`` and ``stderr`` as the tool left them)."""
    argv = [HIVEXREGEDIT, "--export"]
    if prefix:
        argv += ["--prefix", prefix]
    if max_depth is not None:
        argv += ["--max-depth", str(max_depth)]
    argv += [os.fspath(hive_path), key]
    try:
        return run(argv, step=step, image_id=image_id, env=EXPORT_ENV).stdout
    except ToolError as e:
        if missing_ok and e.returncode is not None and _PATH_NOT_FOUND in e.stderr:
            return None
        raise


def get(hive_path: str | os.PathLike[str], key: str, *, image_id: str | None = None,
        step: str) -> str | None:
    """``hivexget HIVE KEY``: the key's values as regedit lines, None when hivexget fails (no such key)."""
    res = run([HIVEXGET, os.fspath(hive_path), key], step=step, image_id=image_id, check=False, timeout=60)
    return res.stdout if res.returncode == 0 else None


HIVEXML = "hivexml"


def walk(hive_path: str | os.PathLike[str], *, image_id: str | None = None, step: str) -> str | None:
    """hivex opens the hive and visits every key and value (``hivexml``, output discarded): None
    when it can, else the reason in hivex's words without paths (the file is ours, a temp copy)."""
    res = run([HIVEXML, os.fspath(hive_path)], step=step, image_id=image_id, check=False, timeout=300)
    if res.returncode == 0:
        return None
    words = (res.stderr or "").strip().splitlines()
    last = words[-1] if words else f"hivexml exit {res.returncode}"
    return "hivex cannot read it (" + last.replace(os.fspath(hive_path), "the hive").split(": ")[-1] + ")"
