"""The one rule for every path gho2kvm writes or deletes (docs/safety.md).

gho2kvm writes only
- inside ``<workdir>/<id>/``, a folder it made (it carries :data:`MARKER`, written when the folder is
  created; an existing folder without it is refused),
- ``<workdir>/logs/`` and ``<workdir>/report.{md,html}``,
- the final disk ``<output_dir>/<id>.<format>`` (and its temp next to it): a file that exists there
  must be one gho2kvm made for this image (its inode is recorded in the image's marker) unless
  ``overwrite: true`` (config) or ``--force`` (CLI) is given,
- the output of ``gho extract`` (an existing one only with ``--force``).

No place written may be, contain, or lie inside (by realpath and by inode: symlinks and hard links
included) anything read: a source, its spans or extents, a ``.reg`` file, an ISO, a driver folder, the
config, another image's source; and two images never share a place written. A temp is removed only
when it is gho2kvm's: it carries an owner record (:func:`claim_temp`) or lies in a folder with the
marker. Every refusal is one line naming the image, the field, both paths and why (exit 2).

This module holds the rule; what an image reads is listed by :mod:`pipeline.steps.sources` (it knows
the formats) and handed in as :class:`Place` lists.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.core.errors import InputError, escape

MARKER = ".gho2kvm-image"  # in <workdir>/<id>/: this folder is gho2kvm's
OWNER_SUFFIX = ".owner"  # next to a temp: the temp is gho2kvm's (a name pattern alone proves nothing)
MADE_BY = "gho2kvm"
MAX_SCAN = 4096  # entries of a folder looked at for hard links of an input
_KEEP_INODES = 4  # inodes remembered per output (a kill between record and rename leaves the old one)

#: ``--force``: an existing final disk gho2kvm did not make may be replaced (set by the CLI)
_force = [False]


def allow_overwrite(on: bool = True) -> None:
    _force[0] = on


def overwrite_allowed(configured: bool) -> bool:
    return configured or _force[0]


class PathRefused(InputError):
    """One or more refusals of this rule; ``lines`` holds one line each."""

    def __init__(self, lines: list[str], *, image_id: str | None = None, step: str | None = None) -> None:
        self.lines = lines
        super().__init__("; ".join(lines), image_id=image_id, step=step)

    def one_line(self) -> str:
        return escape(self.lines[0], 4000) if len(self.lines) == 1 else super().one_line()


@dataclass(frozen=True)
class Place:
    """A path of one image: written (``folder``: everything inside it is written) or read."""

    image: str
    field: str  # the config field it comes from: workdir, output_dir, source, registry, ...
    what: str  # how a person calls it: "the work folder", "the final disk", "the source", "a span" ...
    path: Path
    folder: bool = False


# ----------------------------------------------------------------------------------------- ownership


def _marker_data(folder: Path) -> dict[str, Any] | None:
    try:
        st = os.lstat(folder / MARKER)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 1 << 20:
            return None
        data = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("made_by") == MADE_BY else None


def owns_folder(folder: Path) -> bool:
    return _marker_data(folder) is not None


def _write_marker(folder: Path, data: dict[str, Any]) -> None:
    tmp = folder / f"{MARKER}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MARKER)


def claim_image_dir(folder: Path, image_id: str) -> None:
    """Create ``folder`` with its marker (atomically: a new folder under a temp name renamed into
    place), or check that an existing one carries this image's marker."""
    if owns_folder(folder):
        return
    parent = folder.parent
    problem = _not_folder_chain(parent)
    if problem:
        raise PathRefused([f"image '{image_id}': field 'workdir': {problem}"], image_id=image_id)
    if os.path.lexists(folder):  # (a rename would even replace an empty folder of the user's)
        raise PathRefused([_foreign_folder(image_id, folder)], image_id=image_id)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{folder.name}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        _remove_own_dir(tmp)
    tmp.mkdir()
    _write_marker(tmp, {"made_by": MADE_BY, "image_id": image_id, "outputs": {}})
    try:
        os.rename(tmp, folder)
    except OSError:
        _remove_own_dir(tmp)
        if not owns_folder(folder):  # another worker may have just made it
            raise PathRefused([_foreign_folder(image_id, folder)], image_id=image_id) from None


def _remove_own_dir(tmp: Path) -> None:
    (tmp / MARKER).unlink(missing_ok=True)
    tmp.rmdir()


def _foreign_folder(image_id: str, folder: Path) -> str:
    return (f"image '{image_id}': field 'workdir': the work folder {folder} exists and was not made by "
            f"gho2kvm (it has no {MARKER}); refused: gho2kvm would replace and delete files in it; "
            "choose another workdir or move that folder away")


def record_output(image_dir: Path, final: Path, written: Path) -> None:
    """Remember in the image's marker that ``final`` is (about to be) the file now at ``written``
    (its inode survives the rename): the proof that an existing final disk is gho2kvm's."""
    data = _marker_data(image_dir)
    if data is None:
        return
    st = os.stat(written)
    outputs = data.setdefault("outputs", {})
    known = [i for i in outputs.get(str(final), []) if i != [st.st_dev, st.st_ino]]
    outputs[str(final)] = ([[st.st_dev, st.st_ino]] + known)[:_KEEP_INODES]
    _write_marker(image_dir, data)


def made_output(image_dir: Path, final: Path) -> bool:
    data = _marker_data(image_dir)
    try:
        st = os.lstat(final)
    except OSError:
        return False
    known = (data or {}).get("outputs", {}).get(str(final), [])
    return stat.S_ISREG(st.st_mode) and [st.st_dev, st.st_ino] in known


def owner_record(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + OWNER_SUFFIX)


def claim_temp(tmp: Path) -> None:
    """Write the owner record of the temp ``tmp`` (before the temp is made)."""
    with open(owner_record(tmp), "w", encoding="utf-8") as fh:
        json.dump({"made_by": MADE_BY, "pid": os.getpid(), "temp": tmp.name}, fh)


def release_temp(tmp: Path) -> None:
    owner_record(tmp).unlink(missing_ok=True)


def temp_is_ours(tmp: Path) -> bool:
    """True when ``tmp`` is a temp gho2kvm made: an owner record naming it, or a folder with the marker."""
    if owns_folder(tmp.parent):
        return True
    rec = owner_record(tmp)
    try:
        if not stat.S_ISREG(os.lstat(rec).st_mode):
            return False
        data = json.loads(rec.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("made_by") == MADE_BY and data.get("temp") == tmp.name


def temp_pid(tmp: Path) -> int | None:
    """The pid of the process that wrote the temp (from its owner record), None when unknown."""
    try:
        data = json.loads(owner_record(tmp).read_text(encoding="utf-8"))
        return int(data["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ----------------------------------------------------------------------------------------- the rule


def _ident(p: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(p)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino)


def _real(p: Path) -> Path:
    return Path(os.path.realpath(p))


def _inside(inner: Path, outer: Path) -> bool:
    return inner != outer and outer in inner.parents


def _links_inside(folder: Path, wanted: dict[tuple[int, int], Place]) -> Iterator[tuple[Path, Place]]:
    """Files under ``folder`` (bounded walk) that are one of ``wanted`` by inode."""
    if not wanted or not os.path.isdir(folder):
        return
    seen = 0
    for root, dirs, files in os.walk(folder):
        for name in files + dirs:
            seen += 1
            if seen > MAX_SCAN:
                return
            p = Path(root) / name
            try:
                st = os.lstat(p)
            except OSError:
                continue
            place = wanted.get((st.st_dev, st.st_ino))
            if place is not None:
                yield p, place


def _relation(w: Place, r: Place) -> tuple[str, str] | None:
    """How the written place ``w`` meets the read place ``r``: (verb, note), None when it does not."""
    rw, rr = _real(w.path), _real(r.path)
    iw, ir = _ident(w.path), _ident(r.path)
    if rw == rr:
        return "is", "" if Path(os.path.abspath(w.path)) == Path(os.path.abspath(r.path)) else \
            " (through a symbolic link)"
    if iw is not None and iw == ir:
        return "is", " (the same file through a hard link)"
    if w.folder and _inside(rr, rw):
        return "holds", ""
    if r.folder and _inside(rw, rr):
        return "lies inside", ""
    return None


def _not_folder_chain(folder: Path) -> str | None:
    """Why ``folder`` cannot be (made) a folder: it, or the first existing folder above it, is a file."""
    p = Path(os.path.abspath(folder))
    while True:
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):  # look further up for the one in the way
            if p.parent == p:
                return None
            p = p.parent
            continue
        except OSError as e:
            return f"{p}: {e.strerror}"
        if stat.S_ISDIR(st.st_mode):
            return None
        return f"{p} is {'a file' if stat.S_ISREG(st.st_mode) else 'not a folder'}, expected a folder"


def refusals(writes: list[Place], reads: list[Place], *, image_dirs: dict[str, Path],
             overwrite: Callable[[str], bool], only: str | None = None) -> list[str]:
    """Every refusal of the rule for these places, one line each (empty: all is well).

    ``writes``/``reads`` of every image of the config; ``image_dirs`` id → ``<workdir>/<id>``;
    ``overwrite(id)``: whether an existing final disk gho2kvm did not make may be replaced; ``only``:
    the refusals of that image's places only (a step's check before it writes)."""
    out: list[str] = []
    by_inode = {ino: r for r in reads if (ino := _ident(r.path)) is not None}
    refused: set[int] = set()  # writes already refused: one line per problem

    def line(w: Place, msg: str) -> None:
        text = f"image '{w.image}': field '{w.field}': {msg}"
        refused.add(id(w))
        if text not in out:
            out.append(text)

    chain_seen: set[tuple[str, str]] = set()
    for w in writes:
        if only is not None and w.image != only:
            continue
        problem = _not_folder_chain(w.path if w.folder else w.path.parent)
        if problem:
            if (w.image, problem) not in chain_seen:  # one line per problem, not per file under it
                chain_seen.add((w.image, problem))
                line(w, f"{w.what} {w.path} cannot be written: {problem}")
            refused.add(id(w))
            continue
        for r in reads:
            rel = _relation(w, r)
            if rel is not None:
                of = "" if r.image in (w.image, "") else f" of image '{r.image}'"
                line(w, f"{w.what} {w.path} {rel[0]} {r.what}{of} {r.path}{rel[1]}; refused: gho2kvm never "
                        "writes or deletes what it reads")
                break  # one line per place written
        else:
            if w.folder:  # a hard link of an input inside a folder gho2kvm writes in (one bounded walk)
                for found, r in _links_inside(_real(w.path), by_inode):
                    of = "" if r.image in (w.image, "") else f" of image '{r.image}'"
                    line(w, f"{w.what} {w.path} holds {r.what}{of} {r.path} (a hard link of it: {found}); "
                            "refused: gho2kvm never writes or deletes what it reads")
                    break
    # two images never share a place written (one line per pair of images)
    pairs: set[tuple[str, str]] = set()
    for i, a in enumerate(writes):
        for b in writes[i + 1:]:
            if a.image == b.image or id(a) in refused or only is not None and only not in (a.image, b.image):
                continue
            ra, rb = _real(a.path), _real(b.path)
            shared = ra == rb and not (a.folder and b.folder and a.field == b.field == "workdir"
                                       and a.what == b.what == "the logs folder")
            if a.what in ("the logs folder", "the report") or b.what in ("the logs folder", "the report"):
                shared = False
            if (shared or (a.folder and _inside(rb, ra)) or (b.folder and _inside(ra, rb))) and \
                    (a.image, b.image) not in pairs:
                pairs.add((a.image, b.image))
                line(a, f"{a.what} {a.path} and {b.what} {b.path} of image '{b.image}' overlap; refused: "
                        "two images never share an output")
    # ownership of what exists already
    for w in writes:
        if id(w) in refused or only is not None and w.image != only:
            continue
        if w.what == "the work folder":
            p = w.path
            if os.path.lexists(p) and not os.path.isdir(p):
                line(w, f"the work folder {p} exists and is not a folder; refused")
            elif os.path.isdir(p):
                data = _marker_data(p)
                if data is None:
                    line(w, _foreign_folder(w.image, p).split(": ", 2)[2])
                elif data.get("image_id") != w.image:
                    line(w, f"the work folder {p} belongs to image '{escape(data.get('image_id'), 64)}'; "
                            "refused")
        elif w.what == "the final disk":
            p = w.path
            try:
                st = os.lstat(p)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                kind = "a symlink" if stat.S_ISLNK(st.st_mode) else \
                       "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                if not (stat.S_ISLNK(st.st_mode) and overwrite(w.image)):
                    line(w, f"the final disk {p} exists and is {kind}; refused: gho2kvm writes only "
                            "a regular file it made")
                continue
            if not made_output(image_dirs[w.image], p) and not overwrite(w.image):
                line(w, f"the final disk {p} exists and was not made by gho2kvm for this image; refused: "
                        "set overwrite: true for the image (or give --force) to replace it")
    return out


def check_output(out: str, reads: Iterable[Path], *, force: bool, what: str = "output") -> Path:
    """The rule for a single output file given on a command line (``gho extract``): not a folder
    (nor a name ending in ``/``), not an existing file unless ``force``, never anything read, never a
    device or other special file. Returns the output path; raises :class:`PathRefused`."""
    p = Path(out)
    reads = list(reads)
    shown_ = escape(out, 300)
    if out.endswith(os.sep) or os.path.isdir(p):
        raise PathRefused([f"{shown_}: the {what} is a directory (or names one); give the path of the disk "
                           "file to write"])
    problem = _not_folder_chain(p.parent)
    if problem:
        raise PathRefused([f"{shown_}: {what} cannot be written: {problem}"])
    for r in reads:
        rel = _relation(Place("", what, f"the {what}", p), Place("", "input", "the input", r))
        if rel is not None:
            raise PathRefused([f"{shown_}: the {what} {rel[0]} the image file {escape(r, 300)}{rel[1]}; "
                               "refused: gho2kvm never writes what it reads; choose another output path"])
    try:
        st = os.lstat(p)
    except OSError:
        return p
    if not stat.S_ISREG(st.st_mode):
        raise PathRefused([f"{shown_}: the {what} exists and is not a regular file; refused"])
    if not force:
        raise PathRefused([f"{shown_}: the {what} exists; refused (give --force to replace it)"])
    return p
