"""A ``.gho`` source through ghost-convert (Ghost's executable, here its test stand-in) → inspect → …"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

from tests.support.fx_pipeline import make_config, receipt, run_cli

STANDIN = Path(__file__).parent / "support" / "fakes" / "ghost64_standin.py"


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture(scope="module")
def ghost_run(tmp_path_factory: pytest.TempPathFactory, xp_raw: Path) -> dict:
    tmp = tmp_path_factory.mktemp("ghostpipe")
    src = tmp / "src" / "WINXP.GHO"
    src.parent.mkdir()
    src.write_bytes(b"\xfe\xef\x01\x00 stand-in input: the stand-in does not read it\n")
    (tmp / "src" / "WINXP001.GHS").write_bytes(b"\xfe\xef\x09\x00 span\n")
    log = tmp / "ghost-calls.jsonl"
    cfg = make_config(tmp, [{"id": "xp-gho", "source": src}], defaults={
        "ghost": {"backend": "exe", "command": [sys.executable, str(STANDIN)], "path_style": "posix",
                  "vmdk_type": "sparse", "vmdk_size_mb": 64}})
    env = {"GHOST_STANDIN_PAYLOAD": str(xp_raw), "GHOST_STANDIN_LOG": str(log)}
    first = run_cli("migrate", "--config", str(cfg), env=env)
    calls_after_first = _calls(log)
    second = run_cli("migrate", "--config", str(cfg), env=env)
    return {"tmp": tmp, "src": src, "log": log, "first": first, "second": second,
            "calls_after_first": calls_after_first, "env": env, "cfg": cfg}


def test_gho_source_goes_through_every_step(ghost_run: dict) -> None:
    first = ghost_run["first"]
    assert first.returncode == 0, first.stdout + first.stderr[-3000:]
    tmp = ghost_run["tmp"]
    gc = receipt(tmp, "xp-gho", "ghost-convert")
    assert gc["result"]["disk"].endswith("ghost.vmdk")
    # Ghost's argv as it parses it, and the span recorded
    argv = gc["result"]["argv"]
    assert any(a.startswith("-clone,mode=restore,src=") and ",dst=" in a for a in argv)
    assert "-batch" in argv and "-sure" in argv and "-VMDKSIZE=64" in argv
    assert [Path(s["path"]).name for s in gc["result"]["spans"]] == ["WINXP001.GHS"]
    facts = receipt(tmp, "xp-gho", "inspect")["result"]
    assert facts["os"] == "windows" and facts["format"] == "vmdk"
    assert facts["create_type"] == "monolithicSparse"
    assert (tmp / "images" / "xp-gho.raw").is_file()
    assert receipt(tmp, "xp-gho", "define")["result"]["action"] in ("created", "updated", "unchanged")
    # the final disk has the payload's content plus the registry changes: same size as the payload
    assert (tmp / "images" / "xp-gho.raw").stat().st_size == 64 * 1024 * 1024


def test_rerun_after_success_does_not_call_ghost_again(ghost_run: dict) -> None:
    assert ghost_run["calls_after_first"] == 1
    assert ghost_run["second"].returncode == 0, ghost_run["second"].stderr[-2000:]
    assert _calls(ghost_run["log"]) == 1


def test_ghost_failure_surfaces_its_error_number(tmp_path: Path, xp_raw: Path) -> None:
    src = tmp_path / "BAD.GHO"
    src.write_bytes(b"x")
    cfg = make_config(tmp_path, [{"id": "bad", "source": src}], defaults={
        "ghost": {"backend": "exe", "command": [sys.executable, str(STANDIN)], "path_style": "posix"}})
    env = {"GHOST_STANDIN_PAYLOAD": str(xp_raw), "GHOST_STANDIN_FAIL": "10030",
           "GHOST_STANDIN_MESSAGE": "Image file is corrupt"}
    proc = run_cli("migrate", "--config", str(cfg), env=env)
    assert proc.returncode != 0
    assert "10030" in proc.stdout and "ghost-convert" in proc.stdout
    assert not (tmp_path / "work" / "bad" / "ghost.vmdk").exists()
    assert not (tmp_path / "work" / "bad" / "ghost-convert.json").exists()
    err = json.loads((tmp_path / "work" / "bad" / "ghost-convert.error.json").read_text())
    assert "Image file is corrupt" in err["error"]


def test_flat_ghost_output_is_inspected(tmp_path: Path, xp_raw: Path) -> None:
    src = tmp_path / "FLAT.GHO"
    src.write_bytes(b"x")
    secret = "s3cr3t-pw"
    cfg = make_config(tmp_path, [{"id": "flat", "source": src}], defaults={
        "ghost": {"backend": "exe", "command": [sys.executable, str(STANDIN)], "path_style": "posix",
                  "vmdk_type": "flat", "password_env": "GHO_PW"}})
    env = {"GHOST_STANDIN_PAYLOAD": str(xp_raw), "GHOST_STANDIN_PASSWORD": secret, "GHO_PW": secret}
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    proc = run_cli("inspect", "--config", str(cfg), "--image", "flat", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = json.loads(proc.stdout)
    assert facts["create_type"] == "monolithicFlat"
    assert [Path(e["path"]).name for e in facts["extents"]] == ["ghost-s001.vmdk"]
    assert facts["os"] == "windows"
    # the password never appears in receipts or logs
    for f in (tmp_path / "work").rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl"):
            assert secret not in f.read_text(errors="replace"), f
    assert secret not in proc.stderr
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
