"""The docs say what the code does.

- Every fenced block marked ```` ```sh runnable ```` in README.md and docs/*.md runs as written (bash with
  ``-euo pipefail``, from the repo root, the blocks of one page in order): the README's walk-through
  migrates a Ghost image, so it is an appliance test; the docs pages' blocks are fast.
- The config-key tables of docs/configuration.md list exactly the keys the loader accepts, with the
  dataclass defaults and every choice; the boot-check verdict table lists the classifier's verdicts with
  the failing ones marked.
- Every relative link resolves; every ``docs/gho-format.md §N`` the code cites is a heading there, and
  no code cites a file outside the repo; benchmarks.md has no dated history; the README stays short.
"""

from __future__ import annotations

import os
import re
import subprocess
import typing
from dataclasses import MISSING, fields
from enum import Enum
from pathlib import Path
from types import UnionType
from typing import Any

import pytest

from pipeline.core import config
from pipeline.core.choices import Choice
from pipeline.core.settings import Settings
from pipeline.tools import screen

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))
#: pages the other branches of this session write (docs/README.md links them already)
PENDING = {"registry.md", "windows-changes.md", "scaling.md", "safety.md"}
BLOCK_RE = re.compile(r"^```sh runnable\n(.*?)^```$", re.S | re.M)


def blocks(page: Path) -> list[str]:
    return BLOCK_RE.findall(page.read_text())


def run_blocks(page: Path) -> None:
    env = dict(os.environ, GHO2KVM_FORCE_TCG="1", PATH=f"{REPO / '.venv' / 'bin'}:{os.environ['PATH']}")
    for k, block in enumerate(blocks(page)):
        r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, (f"{page.name} block {k + 1} failed:\n{block}\n{r.stdout[-3000:]}\n"
                                   f"{r.stderr[-3000:]}")


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: p.name)
def test_docs_runnable_blocks(page: Path) -> None:
    run_blocks(page)


@pytest.mark.guestfs
@pytest.mark.usefixtures("force_tcg_env")
def test_readme_walk_through(tmp_path: Path) -> None:
    readme = REPO / "README.md"
    text = " ".join(blocks(readme))
    for command in ("gho2kvm scan", "gho2kvm validate", "gho2kvm plan", "gho2kvm migrate", "gho2kvm report"):
        assert command in text, f"the walk-through runs {command}"
    run_blocks(readme)
    work = REPO / "var" / "work" / "75_none"
    assert (work / "define.json").is_file(), "the walk-through defined the domain"
    page = (REPO / "var" / "work" / "report.html").read_text()
    assert "class='tl-row' data-image='75_none'" in page


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200


# -- tables generated from the code's own tables ----------------------------------------------------
def table(page: Path, heading: str) -> dict[str, list[str]]:
    """The rows of the first table after ``heading``: first cell (backticks stripped) → cells."""
    text = page.read_text()
    start = text.index(heading)
    rows: dict[str, list[str]] = {}
    for line in text[start:].splitlines()[1:]:
        if rows and not line.startswith("|"):
            break
        if not line.startswith("|") or line.startswith("|---"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows[cells[0].strip("`")] = cells
    rows.pop("key", None)
    rows.pop("verdict", None)
    return rows


def shown_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, tuple):
        return "[" + ", ".join(map(str, value)) + "]"
    if isinstance(value, config.BootCheck):
        return str(value.seconds)
    return str(value)


def choices_of(cls: type, name: str) -> list[str]:
    hint = typing.get_type_hints(cls)[name]
    parts = typing.get_args(hint) if isinstance(hint, UnionType) or typing.get_origin(hint) else (hint,)
    for t in parts:
        if isinstance(t, type) and issubclass(t, Choice):
            return [str(c.value) for c in t]
    return []


@pytest.mark.parametrize(("cls", "heading", "keys"), [
    (config.ImageConfig, "## Image keys", set(config.IMAGE_RULES) | {"id", "source", "virtio", "ghost"}),
    (config.GhostConfig, "## `ghost:` keys", set(config.GHOST_RULES)),
    (Settings, "## `settings:` keys", set(config.SETTINGS_RULES)),
], ids=["image", "ghost", "settings"])
def test_config_tables_match_the_loader(cls: type, heading: str, keys: set[str]) -> None:
    rows = table(DOCS / "configuration.md", heading)
    extra, missing = sorted(set(rows) - keys), sorted(keys - set(rows))
    assert set(rows) == keys, f"{heading}: documented {extra}, undocumented {missing}"
    for f in fields(cls):
        if f.name not in rows or f.name == "ghost":
            continue
        if f.default is not MISSING:
            default = f.default
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            assert rows[f.name][1] == "(required)", f.name
            continue
        cell = rows[f.name][1].strip("`")
        want = shown_default(default)
        assert cell == want, f"{f.name}: the docs say {cell}, the code {want}"
        for choice in choices_of(cls, f.name):
            assert f"`{choice}`" in rows[f.name][2], f"{f.name}: choice {choice} not documented"


def test_boot_verdict_table_matches_the_classifier() -> None:
    rows = table(DOCS / "boot-check.md", "| verdict |")
    assert list(rows) == list(screen.VERDICTS)
    assert {v for v, cells in rows.items() if cells[2] == "yes"} == set(screen.FAILURES)


# -- links and citations ------------------------------------------------------------------------------
def test_relative_links_resolve() -> None:
    for page in [REPO / "README.md", *PAGES]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            path = (page.parent / target).resolve()
            if path.name in PENDING and not path.exists():
                continue  # written on another branch of this session
            assert path.exists(), f"{page.relative_to(REPO)}: link to {target} does not resolve"


def test_code_cites_gho_format_sections_that_exist() -> None:
    headings = set(re.findall(r"^#+ (\d+(?:\.\d+)*)\.? ", (DOCS / "gho-format.md").read_text(), re.M))
    cited: set[str] = set()
    for folder in ("pipeline", "tests", "bench"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix not in (".py", ".c", ".md") or not path.is_file() or path == Path(__file__):
                continue
            text = path.read_text(errors="replace")
            outside = "FORMAT.md" in text or "../shared" in text
            assert not outside, f"{path} cites a file outside the repo"
            for m in re.finditer(r"gho-format\.md((?:[ ,]*(?:and )?§\d+(?:\.\d+)*)+)", text):
                cited.update(re.findall(r"§(\d+(?:\.\d+)*)", m.group(1)))
            if "pipeline/gho" in str(path) or "gho" in path.name:
                cited.update(s.rstrip(".") for s in re.findall(r"§(\d+(?:\.\d+)*)", text))
    assert cited, "the reader cites the format notes"
    assert cited <= headings, f"cited but not in docs/gho-format.md: {sorted(cited - headings)}"


def test_benchmarks_show_current_figures_only() -> None:
    text = (DOCS / "benchmarks.md").read_text()
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "no dated columns: history belongs in git"
    assert not re.search(r"\|\s*before\b", text, re.I)
    for section in text.split("\n## ")[1:]:
        assert "python -m bench." in section, f"section {section.splitlines()[0]!r} names its command"
