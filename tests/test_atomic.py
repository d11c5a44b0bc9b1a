"""Atomic outputs (pipeline/core/atomic.py): a half-written artifact never looks complete.

The crash cases run the writer in a child process and kill it while the temp file is open and
half-written: SIGKILL leaves only a temp (cleaned by the next run), SIGTERM through the CLI's signal
handlers removes the temp on the way out. Either way the final name holds nothing or the previous
complete content. No appliance, no tools.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import atomic, paths

# The child writes half of its output through atomic.temporary_path, says where, and waits to be
# killed. With "handlers" it first installs the signal handlers `gho2kvm migrate` runs under.
WRITER = """
import sys, time
from pathlib import Path
from pipeline.core import atomic
final = Path(sys.argv[1])
if sys.argv[2] == "handlers":
    from pipeline.tools.run import install_signal_handlers
    install_signal_handlers()
with atomic.temporary_path(final) as tmp:
    with open(tmp, "w") as f:
        f.write('{"half": ')
        f.flush()
        print(tmp, flush=True)
        time.sleep(60)
        f.write('"written"}')
"""


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if atomic.TMP_MARK in p.name)


def start_writer(final: Path, mode: str) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(final), mode], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read() if proc.stderr else ""
    tmp = Path(line)
    assert tmp.parent == final.parent and tmp.exists()
    return proc, tmp


def test_write_json_round_trip_leaves_no_temp(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "step.json"
    atomic.write_json(final, {"a": 1, "b": [1, 2]})
    assert atomic.read_json(final) == {"a": 1, "b": [1, 2]}
    assert temps(final.parent) == []


def test_error_while_writing_keeps_the_previous_output_and_removes_the_temp(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    final.write_text("previous complete output")
    with pytest.raises(RuntimeError, match="disk full"), atomic.temporary_path(final) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert final.read_text() == "previous complete output"
    assert temps(tmp_path) == []


def test_interrupt_while_writing_removes_the_temp(tmp_path: Path) -> None:
    final = tmp_path / "out.txt"
    with pytest.raises(KeyboardInterrupt), atomic.temporary_path(final) as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert not final.exists() and temps(tmp_path) == []


def test_temp_is_hidden_in_the_same_folder(tmp_path: Path) -> None:
    final = tmp_path / "disk.qcow2"
    with atomic.temporary_path(final) as tmp:
        assert tmp.parent == final.parent
        assert tmp.name.startswith(".") and atomic.TMP_MARK in tmp.name
        assert not final.exists()
        tmp.write_bytes(b"x")
    assert final.read_bytes() == b"x"


@pytest.mark.parametrize("previous", [None, '{"complete": "old"}'])
def test_sigkill_mid_write_leaves_no_complete_looking_output(tmp_path: Path, previous: str | None) -> None:
    final = tmp_path / "receipt.json"
    if previous is not None:
        final.write_text(previous)
    proc, tmp = start_writer(final, "plain")
    proc.kill()
    assert proc.wait(timeout=30) == -signal.SIGKILL
    # the final name holds nothing, or the previous complete content; never the half-written one
    if previous is None:
        assert not final.exists()
        assert atomic.read_json(final) is None
    else:
        assert final.read_text() == previous
    # the killed writer could not clean up: its temp and the temp's owner record are left
    assert temps(tmp_path) == sorted([tmp.name, tmp.name + ".owner"])
    # the next run cleans the temp of the killed one
    assert atomic.remove_stale_temps(tmp_path, final.name) == [tmp]
    assert temps(tmp_path) == []
    atomic.write_json(final, {"complete": "new"})
    assert atomic.read_json(final) == {"complete": "new"} and temps(tmp_path) == []


def test_sigterm_mid_write_removes_the_temp(tmp_path: Path) -> None:
    final = tmp_path / "overlay.qcow2"
    proc, tmp = start_writer(final, "handlers")
    proc.send_signal(signal.SIGTERM)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert "Terminated" in err  # raised by the handler, unwound through temporary_path
    assert not final.exists() and temps(tmp_path) == []


def test_remove_dead_temps_keeps_a_live_writer_and_removes_a_dead_one(tmp_path: Path) -> None:
    final = tmp_path / "disk.raw"
    live, live_tmp = start_writer(final, "plain")
    try:
        dead, dead_tmp = start_writer(tmp_path / "other" / "disk.raw", "plain")
        dead.kill()
        dead.wait(timeout=30)
        # a killed writer's temp moved next to `final`, as a second run of the same output would find it
        moved = tmp_path / dead_tmp.name
        dead_tmp.rename(moved)
        paths.owner_record(dead_tmp).rename(paths.owner_record(moved))
        assert atomic.remove_dead_temps(final) == [moved]
        assert live_tmp.exists()  # its writer is still running
    finally:
        live.kill()
        live.wait(timeout=30)
    assert atomic.remove_dead_temps(final) == [live_tmp]
    assert temps(tmp_path) == []


def test_remove_stale_temps_only_touches_temps_of_the_named_output(tmp_path: Path) -> None:
    for name in (".a.json.tmp-1", ".b.json.tmp-2", "a.json", ".hidden", "x.tmp-3"):
        (tmp_path / name).write_text("x")
    for name in (".a.json.tmp-1", ".b.json.tmp-2"):  # temps gho2kvm made carry an owner record
        paths.claim_temp(tmp_path / name)
    assert atomic.remove_stale_temps(tmp_path, "a.json") == [tmp_path / ".a.json.tmp-1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.json.tmp-2", ".b.json.tmp-2.owner", ".hidden",
                                                          "a.json", "x.tmp-3"]
    assert atomic.remove_stale_temps(tmp_path / "missing") == []


@pytest.mark.parametrize("content", [b"", b'{"half": ', b"\xff\xfe not utf-8", b"[1, 2"])
def test_read_json_of_a_partial_or_corrupt_file_is_none(tmp_path: Path, content: bytes) -> None:
    p = tmp_path / "r.json"
    p.write_bytes(content)
    assert atomic.read_json(p) is None
    assert atomic.read_json(tmp_path / "absent.json") is None
    assert atomic.read_json(tmp_path) is None  # a directory


def test_temp_names_differ_per_process(tmp_path: Path) -> None:
    final = tmp_path / "x"
    code = "import sys; from pathlib import Path; from pipeline.core import atomic; " \
           "print(atomic.temp_name(Path(sys.argv[1])))"
    other = subprocess.run([sys.executable, "-c", code, str(final)], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert other != str(atomic.temp_name(final))
    assert str(os.getpid()) in atomic.temp_name(final).name
