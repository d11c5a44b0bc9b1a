"""ghost-convert with Ghost's own executable (``ghost64.exe``), run natively, under Wine or on a
Windows worker host.

Ghost restores the image straight into a VMware disk::

    ghost64.exe -clone,mode=restore,src=X.GHO,dst=OUT.vmdk -batch -sure -VMDKTYPE=sparse ...

``-clone,mode=restore,src=…,dst=…`` is ONE argument (Ghost splits it on commas itself), so paths
must not contain commas. Ghost writes its abort log (``Error Number: (10030)`` followed by
``Message: …``) to the ``-afile=`` path; a failure surfaces that number and message.

Outputs are written into a private temporary directory ``out_dir/.ghost.tmp-<pid>-<random>/`` under their
FINAL names (``ghost.vmdk``, and for flat disks Ghost's own ``ghost-s001.vmdk`` extent), so the
descriptor's extent lines already name the final files and a plain rename into ``out_dir`` is
enough. The extents are renamed first and the descriptor last, so ``out_dir/ghost.vmdk`` existing
means the disk is complete. Nothing is renamed unless Ghost exited 0, wrote no abort log with an
error number, the output exists and ``qemu-img info`` (:mod:`pipeline.tools.qemu_img`) reads it as a
VMDK of the requested type. Should Ghost put a path in an extent line, it is reduced to the bare file
name (:func:`pipeline.vmdk.rename_extents`, an atomic rewrite).

``-VMDKTYPE=`` is ``sparse`` or ``flat``: ``ghost.vmdk_type: auto`` is resolved before this module
(:meth:`pipeline.core.config.GhostConfig.for_format`). When the descriptor of a flat VMDK has exactly
one extent, ``RW <n> FLAT "ghost-s001.vmdk" 0`` with ``n`` sectors = the virtual size = the file's
length, that extent IS the disk as a raw image: :attr:`GhostResult.raw_extent` names it and convert
may adopt it as the final raw disk (:mod:`pipeline.steps.adopt`); ``ghost.vmdk`` then names a
missing extent, which nothing reads any more.

The caller passes what this module needs from the settings (:class:`GhostOptions`) and the password
(``-pwd=``), which is redacted from every argv, message, stderr and error-file text handed out.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from pipeline import vmdk
from pipeline.core.atomic import fsync_path
from pipeline.core.choices import Adapter, PathStyle, Step, VmdkType, values
from pipeline.core.errors import InputError, ToolError
from pipeline.core.safeio import regular_file
from pipeline.tools import qemu_img
from pipeline.tools.run import REDACTED, pid_alive, redact, run

STEP = Step.GHOST_CONVERT
FINAL_STEM = "ghost"
FINAL_NAME = f"{FINAL_STEM}.vmdk"
TMP_PREFIX = ".ghost.tmp-"
AFILE_NAME = "ghost-abort.txt"
PATH_STYLES = values(PathStyle)
VMDK_TYPES = tuple(t for t in values(VmdkType) if t != VmdkType.AUTO)  # what Ghost is asked for
ADAPTERS = values(Adapter)

_ERRNO_RE = re.compile(r"Error\s+Number\s*:?\s*\(?\s*(\d+)\s*\)?", re.I)
_MESSAGE_RE = re.compile(r"^\s*Message\s*:\s*(.*\S)\s*$", re.I)
_PROGRESS_RE = re.compile(r"(\d{1,3}(?:\.\d+)?)\s*%")
_OLD_EXTENT_RE = re.compile(rf"^{FINAL_STEM}-s\d{{3,}}\.vmdk$", re.I)
_PWD_RE = re.compile(r"(-pwd=)(?!\*\*\*(?:\s|$))\S+", re.I)
_TYPE_WORDS = {"sparse": ("sparse",), "flat": ("flat", "vmfs")}


@dataclass(frozen=True)
class GhostOptions:
    """What a Ghost run needs from the settings (``ghost:`` in the config; see its validation)."""

    command: tuple[str, ...]
    path_style: str
    vmdk_type: str
    vmdk_size_mb: int | None
    vmdk_split_mb: int | None
    adapter: str
    timeout_s: int

    @classmethod
    def of(cls, settings: Any) -> GhostOptions:
        """The fields of this class taken by name from a settings object (the config's ghost section)."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls)})


@dataclass
class GhostResult:
    """What one Ghost run did; ``to_dict()`` is JSON-serialisable (for receipts)."""

    argv: list[str]  # redacted
    spans: list[dict[str, Any]]  # continuation files: path, size, mtime
    outputs: list[dict[str, Any]]  # final files: path, size (descriptor last)
    exit_code: int
    seconds: float
    vmdk_type: str
    source: dict[str, Any] = field(default_factory=dict)  # the .GHO itself: path, size, mtime
    disk: str = ""  # out_dir/ghost.vmdk (open this one)
    virtual_size: int | None = None
    create_type: str | None = None
    raw_extent: str | None = None  # the one extent that is the whole disk as raw (convert adopts it)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------
# argv


def translate_path(path: str | os.PathLike[str], style: str) -> str:
    """Spell ``path`` the way the Ghost process sees it.

    ``posix``: unchanged. ``wine``: absolute POSIX path on Wine's ``Z:`` drive
    (``/data/x.GHO`` → ``Z:\\data\\x.GHO``). ``windows``: slashes become backslashes (paths given
    for a Windows worker host, e.g. ``D:/images/x.GHO`` or ``\\\\srv\\share\\x.GHO``).
    """
    text = os.fspath(path)
    if style == "posix":
        return text
    if style == "wine":
        return "Z:" + os.path.abspath(text).replace("/", "\\")
    if style == "windows":
        return text.replace("/", "\\")
    raise InputError(f"ghost.path_style: expected one of {', '.join(PATH_STYLES)}, got {style!r}",
                     step=STEP)


def _clone_path(path: Path, style: str, what: str) -> str:
    text = translate_path(path, style)
    if "," in text:
        # Ghost splits -clone,... on commas; there is no quoting.
        raise InputError(f"Ghost cannot take a {what} path containing a comma: {text}", step=STEP)
    return text


def build_argv(cfg: GhostOptions, src: Path, dst: Path, afile: Path, password: str | None) -> list[str]:
    """The argv Ghost is run with (password in clear: redact before showing it)."""
    if not cfg.command:
        raise InputError("ghost.command is empty; set it to e.g. [wine64, /opt/ghost/ghost64.exe]",
                         step=STEP)
    if cfg.vmdk_type not in VMDK_TYPES:  # ``auto`` is resolved before (GhostConfig.for_format)
        raise InputError(f"ghost.vmdk_type: expected one of {', '.join(VMDK_TYPES)}, got {cfg.vmdk_type!r}",
                         step=STEP)
    if cfg.adapter not in ADAPTERS:
        raise InputError(f"ghost.adapter: expected one of {', '.join(ADAPTERS)}, got {cfg.adapter!r}",
                         step=STEP)
    style = cfg.path_style
    clone = f"src={_clone_path(src, style, 'source')},dst={_clone_path(dst, style, 'target')}"
    argv = [
        *cfg.command,
        f"-clone,mode=restore,{clone}",
        "-batch",
        "-sure",
        f"-VMDKTYPE={cfg.vmdk_type}",
    ]
    if cfg.vmdk_size_mb is not None:
        argv.append(f"-VMDKSIZE={int(cfg.vmdk_size_mb)}")
    if cfg.vmdk_split_mb is not None:
        argv.append(f"-VMDKSPLIT={int(cfg.vmdk_split_mb)}")
    argv.append(f"-VMDKADAPTER={cfg.adapter}")
    if password:
        argv.append(f"-pwd={password}")
    argv.append(f"-afile={translate_path(afile, style)}")
    return argv


# ---------------------------------------------------------------------------------------------
# Ghost's abort log


def parse_error_file(text: str) -> tuple[int | None, str | None]:
    """Return (error number, message) from Ghost's abort log; (None, None) if it has none.

    The message is the ``Message:`` line after ``Error Number: (N)``, or else the next non-empty
    line after it.
    """
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = _ERRNO_RE.search(line)
        if not m:
            continue
        number = int(m.group(1))
        rest = [ln for ln in lines[i + 1:] if ln.strip() and not ln.strip().startswith("*")]
        for ln in rest[:6]:
            mm = _MESSAGE_RE.match(ln)
            if mm:
                return number, mm.group(1)
        return number, (rest[0].strip() if rest else None)
    return None, None


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None


def _scrub(text: str, secrets: Sequence[str]) -> str:
    """Remove secrets from text Ghost wrote; case-insensitively (it may upper-case its command
    line), and any ``-pwd=`` value whatever it says."""
    for s in secrets:
        if s:
            text = re.sub(re.escape(s), REDACTED, text, flags=re.I)
    return _PWD_RE.sub(lambda m: m.group(1) + REDACTED, text)


# ---------------------------------------------------------------------------------------------
# temp outputs


CLAIM_NAME = ".in-use"  # flock()ed by the conversion writing into a temp dir


def claim(tmp_dir: Path) -> int:
    """Mark ``tmp_dir`` as being written by a running conversion (a lock held until the returned
    descriptor is closed): :func:`remove_stale_temps`, in this process or another, keeps it."""
    fd = os.open(tmp_dir / CLAIM_NAME, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _claimed(tmp_dir: Path) -> bool:
    try:
        fd = os.open(tmp_dir / CLAIM_NAME, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False




def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Remove temp outputs (``.ghost.tmp-<pid>…``) of earlier runs whose process is gone.

    Temps of other live processes and of conversions still running in this one are kept; those of
    this process that are no longer running (an interrupted earlier call) are stale.
    """
    removed: list[Path] = []
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(TMP_PREFIX) or _claimed(entry):
            continue
        pid_text = entry.name[len(TMP_PREFIX):].split(".")[0].split("-")[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and pid_alive(int(pid_text)):
            continue
        _remove(entry)
        removed.append(entry)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _stat_entry(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime": st.st_mtime}


def _normalize_descriptor(desc: Path) -> list[str]:
    """Make every extent line of a text descriptor name a bare file in the same directory.

    Ghost names extents relative to the descriptor (``ghost-s001.vmdk``); should it ever write a
    path, it is reduced to the file name (matched case-insensitively), rewritten atomically.
    Returns the extent file names; raises ValueError naming a missing extent.
    """
    present = {p.name.lower(): p.name for p in desc.parent.iterdir() if p.is_file()}

    def bare(ref: str) -> str:
        actual = present.get(re.split(r"[\\/]", ref)[-1].lower())
        if actual is None:
            raise ValueError(f"descriptor {desc.name} names extent {ref!r}, which Ghost did not write")
        return actual

    return vmdk.rename_extents(desc, bare)


def _raw_extent(desc: Path, virtual_size: int | None) -> str | None:
    """The name of the one extent of ``desc`` that is the whole disk as a raw image, read from the
    descriptor (:func:`pipeline.vmdk.whole_raw_extent`) and the file's length; else None (also for a
    descriptor :mod:`pipeline.vmdk` refuses: inspect's safety check reports it, as before)."""
    try:
        if not vmdk.is_text_descriptor(desc):
            return None
        name = vmdk.whole_raw_extent(vmdk.parse_descriptor(desc, step=STEP), virtual_size)
        if name is None or (desc.parent / name).stat().st_size != virtual_size:
            return None
    except (OSError, InputError):
        return None
    return name


# ---------------------------------------------------------------------------------------------
# convert


def convert(
    cfg: GhostOptions,
    src: Path,
    out_dir: Path,
    *,
    image_id: str,
    spans_of: Callable[[Path], Sequence[Path]],
    password: str | None = None,
    progress: Callable[[float], None] | None = None,
) -> GhostResult:
    """Restore ``src`` (a .GHO, with its .GHS spans beside it) into ``out_dir/ghost.vmdk``.

    For ``vmdk_type: flat`` the raw extent is ``out_dir/ghost-s001.vmdk`` (more with
    ``vmdk_split_mb``); when the descriptor shows that one extent is the whole disk,
    ``raw_extent`` names it (convert may adopt it as the final raw disk). ``password`` is the
    image's (None: none). ``spans_of`` lists the .GHS spans of ``src``
    (:func:`pipeline.gho.spans.find_spans`: the format rule lives above the
    tools). ``progress`` gets Ghost's percentage (0-100) when it prints one.
    Raises :class:`InputError` for bad input, :class:`ToolError` when Ghost or the check fails.
    """
    src = Path(src)
    out_dir = Path(out_dir)
    secrets = [password] if password else []
    if not src.exists():
        raise InputError(f"Ghost image not found: {src}", image_id=image_id, step=STEP)
    regular_file(src, "Ghost image", image_id=image_id, step=STEP)  # never a FIFO or device
    source = _stat_entry(src)
    spans = [_stat_entry(p) for p in spans_of(src)]
    # Check the configuration and paths before touching the disk (temp names never add commas).
    probe = out_dir / f"{TMP_PREFIX}0" / FINAL_NAME
    build_argv(cfg, src, probe, probe.with_name(AFILE_NAME), password)

    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", dir=out_dir))
    claim_fd = claim(tmp_dir)
    tmp_dst = tmp_dir / FINAL_NAME
    afile = tmp_dir / AFILE_NAME
    argv = build_argv(cfg, src, tmp_dst, afile, password)
    shown = redact(argv, secrets)
    tool = os.path.basename(cfg.command[-1])
    env = {"WINEDEBUG": "-all"} if cfg.path_style == "wine" else None

    def fail(message: str, returncode: int | None, stderr: str = "", stdout: str = "") -> ToolError:
        _remove(tmp_dir)
        return ToolError(_scrub(message, secrets), tool=tool, argv=shown, returncode=returncode,
                         stderr=_scrub(stderr, secrets), stdout=_scrub(stdout, secrets),
                         image_id=image_id, step=STEP)

    def on_stdout(line: str) -> None:
        if progress is None:
            return
        m = _PROGRESS_RE.search(line)
        if m:
            progress(min(100.0, float(m.group(1))))

    try:
        try:
            res = run(argv, step=STEP, image_id=image_id, timeout=cfg.timeout_s, env=env,
                      cwd=str(tmp_dir), secrets=secrets, check=False, on_stdout=on_stdout)
        except ToolError as e:  # not found, timeout: the wrapper's own message, scrubbed once more
            raise fail(e.message, e.returncode, e.stderr, e.stdout) from None

        err_text = _read_text(afile)
        if err_text is None:  # Ghost's default abort log name, in its working directory
            for p in tmp_dir.iterdir():
                if p.name.lower() == "ghosterr.txt":
                    err_text = _read_text(p)
        err_text = _scrub(err_text or "", secrets)
        number, message = parse_error_file(err_text)
        if res.returncode != 0 or number is not None:
            if number is not None:
                what = f"Ghost error {number}: {message or '(no message)'}"
            else:
                tail = " | ".join(ln.strip() for ln in (res.stderr or res.stdout).splitlines()
                                  if ln.strip())[-400:]
                what = f"Ghost failed without an error number: {tail or '(no output)'}"
            raise fail(f"{what} (exit {res.returncode})", res.returncode,
                       err_text or res.stderr, res.stdout)

        if not tmp_dst.is_file():
            raise fail(f"Ghost exited 0 but wrote no output "
                       f"(expected {translate_path(tmp_dst, cfg.path_style)})",
                       res.returncode, res.stderr, res.stdout)

        try:
            extents = _normalize_descriptor(tmp_dst)
        except (OSError, ValueError) as e:
            raise fail(f"Ghost output is unusable: {e}", res.returncode, res.stderr, res.stdout) from None

        try:
            info = qemu_img.info(tmp_dst, image_id=image_id, step=STEP)
        except InputError as e:
            raise fail(f"Ghost output is not a readable VMDK: {e.message}", res.returncode) from None
        except ValueError as e:
            raise fail(f"qemu-img info printed no JSON for the Ghost output: {e}", res.returncode) from None
        fmt = info.get("format")
        create_type = ((info.get("format-specific") or {}).get("data") or {}).get("create-type")
        if fmt != "vmdk":
            raise fail(f"Ghost output is {fmt!r}, not a VMDK", res.returncode)
        if create_type and not any(w in str(create_type).lower() for w in _TYPE_WORDS[cfg.vmdk_type]):
            raise fail(f"asked Ghost for a {cfg.vmdk_type} VMDK but it wrote {create_type}", res.returncode)
        raw_name = _raw_extent(tmp_dst, info.get("virtual-size"))

        # Commit: extents first, descriptor last (its presence marks a complete disk).
        outputs: list[dict[str, Any]] = []
        for name in dict.fromkeys([*extents, FINAL_NAME]):  # each file once (extents may share one)
            final = out_dir / name
            os.replace(tmp_dir / name, final)
            st = final.stat()
            outputs.append({"path": str(final), "size": st.st_size})
        fsync_path(out_dir)
        for p in out_dir.iterdir():  # extents of an earlier flat/split run that this one replaced
            if _OLD_EXTENT_RE.match(p.name) and p.name not in extents:
                _remove(p)
    finally:
        _remove(tmp_dir)
        os.close(claim_fd)

    if progress is not None:
        progress(100.0)
    return GhostResult(
        argv=shown,
        spans=spans,
        outputs=outputs,
        exit_code=res.returncode,
        seconds=round(res.seconds, 3),
        vmdk_type=cfg.vmdk_type,
        source=source,
        disk=str(out_dir / FINAL_NAME),
        virtual_size=info.get("virtual-size"),
        create_type=create_type,
        raw_extent=str(out_dir / raw_name) if raw_name else None,
    )


__all__ = [
    "GhostOptions",
    "GhostResult",
    "build_argv",
    "convert",
    "parse_error_file",
    "remove_stale_temps",
    "translate_path",
]
