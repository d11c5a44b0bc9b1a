"""The ``gho`` sub-command as a user runs it."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest

from pipeline.app.gho_cli import register
from tests.support.gho_checks import FIXTURES


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="gho2kvm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_info_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["gho", "info", str(FIXTURES / "75_none.gho")]) == 0
    out = capsys.readouterr().out
    assert "Ghost 7.5-style image, compression none, file-aware, no password" in out
    assert "partition 3: fat FAT32 'FAT32EX'" in out


def test_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(["gho", "info", str(FIXTURES / "11_high.gho"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["generation"] == "11.x" and d["compression"] == "high"
    assert [p["label"] for p in d["partitions"]] == ["BOOT", "FAT16", "FAT32EX"]


def test_extract_with_password_env(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GHO_PW", "password")
    out = tmp_path / "d.raw"
    src = str(FIXTURES / "11_high_pw.gho")
    assert run(["gho", "extract", src, str(out), "--password-env", "GHO_PW"]) == 0
    assert "3 partitions, 7 files" in capsys.readouterr().out
    assert out.stat().st_size == 16771860 * 512


@pytest.mark.parametrize(("name", "flag", "fmt"), [
    ("d.qcow2", [], "qcow2"),  # by its suffix
    ("d.img", ["--format", "qcow2"], "qcow2"),
    ("d.qcow2", ["--format", "raw"], "raw"),  # the flag wins
])
def test_extract_format(tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, flag: list[str],
                        fmt: str) -> None:
    out, ref = tmp_path / name, tmp_path / "ref.raw"
    src = str(FIXTURES / "75_none.gho")
    assert run(["gho", "extract", src, str(ref), "--quiet"]) == 0
    assert run(["gho", "extract", src, str(out), "--quiet", *flag]) == 0
    capsys.readouterr()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(out)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == fmt and info["virtual-size"] == ref.stat().st_size
    cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", fmt, str(ref), str(out)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({name, "ref.raw"})  # no temp left


@pytest.mark.parametrize(("argv", "expect"), [
    (["extract", "11_high_pw.gho", "OUT"],
     "11_high_pw.gho: image is password-protected; a password is required"),
    (["extract", "11_high_pw.gho", "OUT", "--password-env", "GHO_BAD"], "11_high_pw.gho: wrong password"),
    (["extract", "11_high_pw.gho", "OUT", "--password-env", "GHO_UNSET"], "environment variable GHO_UNSET"),
    (["info", "README.md"], "README.md: not a Ghost image: bad magic"),
    (["info", "nothere.gho"], "nothere.gho: no such file"),
])
def test_bad_input_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch, argv: list[str], expect: str) -> None:
    monkeypatch.setenv("GHO_BAD", "nope")
    monkeypatch.delenv("GHO_UNSET", raising=False)
    argv = [str(FIXTURES / a) if a.endswith((".gho", ".md")) else str(tmp_path / a) if a == "OUT" else a
            for a in argv]
    assert run(["gho", *argv]) == 2
    err = capsys.readouterr().err
    assert expect in err and err.count("\n") == 1 and err.startswith("error: ")
    assert list(tmp_path.iterdir()) == []
