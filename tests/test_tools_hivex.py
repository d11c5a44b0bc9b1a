"""pipeline.tools.hivex: the one wrapper of hivexregedit/hivexget (local hive files, no libguestfs)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.core.errors import ToolError
from pipeline.registry.hive import write_empty_hive
from pipeline.tools import hivex

pytestmark = pytest.mark.skipif(shutil.which("hivexregedit") is None, reason="hivexregedit not installed")


def test_merge_export_get(tmp_path: Path) -> None:
    h = write_empty_hive(tmp_path / "SYSTEM")
    reg = '[HKEY_LOCAL_MACHINE\\SYSTEM\\Foo]\n"Start"=dword:00000003\n'
    hivex.merge(h, reg, "HKEY_LOCAL_MACHINE\\SYSTEM", step="t")
    text = hivex.export(h, "\\Foo", step="t")
    assert text is not None and '"Start"=dword:00000003' in text
    values = hivex.get(h, "\\Foo", step="t")
    assert values is not None and '"Start"=dword:00000003' in values
    assert hivex.get(h, "\\Nope", step="t") is None


def test_missing_key_is_none_only_when_asked(tmp_path: Path) -> None:
    h = write_empty_hive(tmp_path / "SYSTEM")
    assert hivex.export(h, "\\Nope", missing_ok=True, step="t") is None
    with pytest.raises(ToolError) as ei:
        hivex.export(h, "\\Nope", step="registry-verify", image_id="xp")
    e = ei.value
    assert (e.tool, e.returncode, e.step, e.image_id) == ("hivexregedit", 255, "registry-verify", "xp")
    assert "path not found" in e.stderr and e.argv[-2:] == [str(h), "\\Nope"]


def test_not_a_hive_is_a_tool_error_even_with_missing_ok(tmp_path: Path) -> None:
    bad = tmp_path / "junk"
    bad.write_bytes(b"not a hive" * 100)
    with pytest.raises(ToolError) as ei:
        hivex.export(bad, "\\", missing_ok=True, step="t")
    assert ei.value.tool == "hivexregedit" and ei.value.returncode not in (None, 0)
    assert "[step t] hivexregedit failed" in str(ei.value)
