"""Hostile configs, .reg files and VMDK sources: a seeded fuzz run over every class plus one test per
class. No appliance is launched; `gho2kvm inspect` is run only on sources refused before it.

``GHO2KVM_FUZZ_CASES`` sets the cases per class of the long run (marked ``fuzz``; default 25: 275
cases; ``make fuzz`` runs more); the fast tier runs a sample of 3 per class, same seed.
"""

from __future__ import annotations

import os
import resource
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import vmdk
from pipeline.core.config import ConfigError, load_config
from pipeline.core.errors import InputError, ToolError
from pipeline.registry.regfile import parse_file
from pipeline.steps.inspect import disk_facts
from pipeline.tools.run import run
from tests.support.fuzz_inputs import CLASSES, DESC, VALID_REG, run_all, sparse_header
from tests.support.fx_pipeline import REPO, run_cli

CASES = int(os.environ.get("GHO2KVM_FUZZ_CASES", "25"))
SEED = int(os.environ.get("GHO2KVM_FUZZ_SEED", "11"))
SAMPLE = 3  # cases per class in the fast tier, every class in one process
MAX_RSS_MIB = 300


def check(cases: int, one_process: bool) -> None:
    results = run_all(cases, SEED, one_process=one_process)
    assert [r["class"] for r in results] == list(CLASSES)
    bad = {r["class"]: r["failures"][:5] for r in results if r["failures"]}
    assert not bad, bad
    for r in results:
        assert r["cases"] == cases
        assert int(r["max_rss_kib"]) < MAX_RSS_MIB * 1024, r


def test_fuzz_sample_of_every_class_holds_its_promises() -> None:
    check(SAMPLE, one_process=True)


@pytest.mark.fuzz
def test_fuzz_every_class_holds_its_promises() -> None:
    check(CASES, one_process=False)


# ----------------------------------------------------------------------------------------- config


def config(folder: Path, images: str, name: str = "c.yaml") -> Path:
    (folder / "disk.raw").write_bytes(bytes(4096))
    path = folder / name
    path.write_text(f"defaults:\n  workdir: {folder}/work\nimages:\n{images}")
    return path


def refusal(path: Path | str) -> str:
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert len(ei.value.errors) == 1, ei.value.errors
    line = ei.value.errors[0]
    assert "\n" not in line and len(line) < 1000
    return line


def cli_refusal(*args: str, timeout: float = 30) -> str:
    t0 = time.monotonic()
    r = run_cli(*args, timeout=timeout)
    assert time.monotonic() - t0 < timeout
    lines = r.stderr.splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    return lines[0]


def test_fifo_config_is_refused_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "c.yaml"
    os.mkfifo(fifo)
    line = cli_refusal("validate", "--config", str(fifo), timeout=20)
    assert str(fifo) in line and "FIFO" in line


def test_dev_zero_and_oversized_configs_are_refused_before_reading(tmp_path: Path) -> None:
    assert "character device" in refusal("/dev/zero")
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.write(b"images: []\n")
        fh.truncate(4 << 30)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert "too large" in refusal(big)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 20 * 1024


def test_yaml_alias_bomb_is_refused_small_and_fast(tmp_path: Path) -> None:
    lines = ["  a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"  a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("defaults:\n  x:\n" + "\n".join("  " + ln for ln in lines) +
                    "\nimages:\n  - id: a\n    source: d.raw\n    description: *a8\n")
    t0 = time.monotonic()
    line = refusal(path)
    assert time.monotonic() - t0 < 2 and "aliases expand to more than" in line


@pytest.mark.parametrize("text, expect", [
    ("? [a, b]\n: 1\nimages: []\n", "a key must be a plain value, found a sequence"),
    ("images:\n  - {id: a, source: d.raw, {x: 1}: 2}\n", "a key must be a plain value, found a mapping"),
    ("images: " + "[" * 50000 + "]" * 50000 + "\n", "nested deeper than"),
    ("images:\n  - id: a\n    memory_mib: " + "7" * 6000 + "\n", "not valid YAML"),
    ("images:\n  - id: !!python/object/apply:os.system [true]\n", "not valid YAML"),
    ("images:\n  - id: a\n    source: d.raw\n    vcpus: !!binary " + "QUFB" * 50000 + "\n",
     "expected an integer"),
])
def test_odd_yaml_is_one_line_not_a_traceback(tmp_path: Path, text: str, expect: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    (tmp_path / "d.raw").write_bytes(bytes(512))
    line = refusal(path)
    assert expect in line and line.startswith(str(path))


def test_non_utf8_config_names_line_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"images:\n  - id: caf\xe9\n")
    assert refusal(path) == f"{path}:2: not UTF-8 (byte 0xe9 at offset 19); save the config as UTF-8"


@pytest.mark.parametrize("ident", ["'..'", "'.'", "'...'"])
def test_dot_ids_are_refused(tmp_path: Path, ident: str) -> None:
    line = refusal(config(tmp_path, f"  - id: {ident}\n    source: disk.raw\n"))
    assert "field 'id'" in line and "not a usable id" in line


@pytest.mark.parametrize("ident", ['"a\\nb"', '"a\\rb"', '"\\x1b[2J"', '"a\\u2028b"', '"a\\u0085b"'])
def test_control_characters_in_ids_never_break_the_line(tmp_path: Path, ident: str) -> None:
    path = config(tmp_path, f"  - id: {ident}\n    source: disk.raw\n")
    line = cli_refusal("validate", "--config", str(path))
    assert "field 'id'" in line and "\x1b" not in line


# ----------------------------------------------------------------------------------------- .reg files


def test_50_mb_reg_file_is_refused_fast(tmp_path: Path) -> None:
    reg = tmp_path / "big.reg"
    with open(reg, "wb") as fh:
        fh.write(VALID_REG.encode())
        fh.truncate(50 << 20)
    t0 = time.monotonic()
    with pytest.raises(InputError, match="too large"):
        parse_file(reg)
    assert time.monotonic() - t0 < 1


def test_fifo_reg_file_is_refused_without_opening(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "extra.reg")
    path = config(tmp_path, "  - id: a\n    source: disk.raw\n    registry: [extra.reg]\n")
    line = refusal(path)
    assert "field 'registry'" in line and "FIFO" in line


def test_80k_continuation_lines_parse_in_linear_time(tmp_path: Path) -> None:
    reg = tmp_path / "long.reg"
    reg.write_text(VALID_REG + '"Big"=hex:' + ",\\\r\n  ".join(["01,02,03"] * 80000) + "\r\n")
    t0 = time.monotonic()
    ops = parse_file(reg)
    assert time.monotonic() - t0 < 3
    assert ops[-1].data == bytes([1, 2, 3]) * 80000


# ----------------------------------------------------------------------------------------- VMDK sources


def refused(disk: Path, *expect: str) -> str:
    with pytest.raises(InputError) as ei:
        disk_facts(disk, "fz")
    msg = ei.value.one_line()
    assert disk.name in msg and "\n" not in msg
    for e in expect:
        assert e in msg, msg
    return msg


def test_4_byte_kdmv_file_names_file(tmp_path: Path) -> None:
    disk = tmp_path / "d.vmdk"
    disk.write_bytes(b"KDMV")
    refused(disk, "sparse header truncated", "4 bytes")


@pytest.mark.parametrize("off, size, field", [(1 << 60, 20, "descriptorOffset"),
                                              (1, 1 << 60, "descriptorSize"),
                                              (1, (1 << 64) - 1, "descriptorSize")])
def test_absurd_descriptor_offset_or_size_names_the_field(tmp_path: Path, off: int, size: int,
                                                          field: str) -> None:
    disk = tmp_path / "d.vmdk"
    disk.write_bytes(sparse_header(off, size))
    refused(disk, field)


def flat(folder: Path, extents: str = 'RW 2048 FLAT "d-flat.vmdk" 0', ddb: str = "") -> Path:
    (folder / "d-flat.vmdk").write_bytes(b"")
    os.truncate(folder / "d-flat.vmdk", 2048 * 512)
    disk = folder / "d.vmdk"
    disk.write_text(DESC.format(ctype="monolithicFlat", extents=extents, ddb=ddb))
    return disk


def test_fifo_extent_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe-flat.vmdk")
    disk = flat(tmp_path, 'RW 2048 FLAT "pipe-flat.vmdk" 0')
    t0 = time.monotonic()
    refused(disk, "pipe-flat.vmdk", "FIFO")
    assert time.monotonic() - t0 < 2


def _chardev(p: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers


@pytest.mark.parametrize("make, kind", [(_chardev, "character device"), (lambda p: p.mkdir(), "directory"),
                                        (os.mkfifo, "FIFO")])
def test_device_or_directory_extent_or_source_is_refused(tmp_path: Path, make, kind: str) -> None:
    make(tmp_path / "odd-flat.vmdk")
    refused(flat(tmp_path, 'RW 2048 FLAT "odd-flat.vmdk" 0'), kind)
    src = tmp_path / "s" / "x.raw"
    src.parent.mkdir()
    make(src)
    refused(src, kind)


@pytest.mark.parametrize("ddb", ['ddb.comment = "see parentFileNameHint=\\"/etc/shadow\\""\n',
                                 'ddb.x = "PARENTFILENAMEHINT=a.vmdk"\n', 'parentFileNameHint="base.vmdk"\n'])
def test_parent_hint_anywhere_is_refused(tmp_path: Path, ddb: str) -> None:
    refused(flat(tmp_path, ddb=ddb), "parentFileNameHint")


def test_parent_cid_is_refused(tmp_path: Path) -> None:
    disk = flat(tmp_path)
    disk.write_text(disk.read_text().replace("parentCID=ffffffff", "parentCID=0badcafe"))
    refused(disk, "parentCID is 0badcafe", "delta disk")


def test_20000_extents_are_refused_before_qemu_img(tmp_path: Path) -> None:
    disk = flat(tmp_path, "\n".join('RW 1 FLAT "d-flat.vmdk" 0' for _ in range(20000)))
    t0 = time.monotonic()
    refused(disk, f"more than {vmdk.MAX_EXTENTS} extents")
    assert time.monotonic() - t0 < 2


def test_inspect_refusal_is_one_line_on_stderr(tmp_path: Path) -> None:
    (tmp_path / "x.vmdk").write_bytes(b"KDMV")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"defaults: {{workdir: {tmp_path}/work, output_dir: {tmp_path}/out}}\n"
                   "images:\n  - {id: x, source: x.vmdk, registry: []}\n")
    line = cli_refusal("inspect", "--config", str(cfg), "--image", "x", timeout=60)
    assert line.startswith("[image x, step inspect] ") and "x.vmdk" in line and "truncated" in line
    logs = list((tmp_path / "work" / "logs").glob("*.jsonl"))
    assert logs and "sparse header truncated" in logs[0].read_text()  # the details go to the JSON log


# ----------------------------------------------------------------------------------------- tools


def test_timed_out_tool_says_so() -> None:
    with pytest.raises(ToolError) as ei:
        run(["sleep", "30"], step="t", timeout=0.5)
    assert "sleep timed out after 0.5 s without any output" in ei.value.one_line()
    assert "(no output)" not in ei.value.one_line()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_tools_die_with_gho2kvm(tmp_path: Path, sig: signal.Signals) -> None:
    pidfile = tmp_path / "child.pid"
    code = ("import sys\nfrom pipeline.tools.run import install_signal_handlers, run\n"
            "install_signal_handlers()\n"
            f"run(['sh', '-c', 'echo $$ > {pidfile}; exec sleep 300'], step='t', timeout=600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pidfile.read_text())
    assert _alive(child)
    parent.send_signal(sig)
    parent.wait(20)
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), f"the tool survived {sig.name} of gho2kvm"


def test_a_daemon_left_by_a_tool_dies_with_gho2kvm_killed(tmp_path: Path) -> None:
    """guestfish --listen detaches its server (no PR_SET_PDEATHSIG reaches it): the watchdog does."""
    pidfile = tmp_path / "daemon.pid"
    code = ("import subprocess, time\nfrom pipeline.tools.run import watch_daemon\n"
            "out = subprocess.run(['sh', '-c', 'sleep 300 >/dev/null 2>&1 & echo $!'], capture_output=True, "
            "text=True).stdout\n"
            f"watch_daemon(int(out))\nopen('{pidfile}', 'w').write(out)\ntime.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=str(REPO), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.05)
    daemon = int(pidfile.read_text())
    assert _alive(daemon)
    parent.kill()
    parent.wait(20)
    deadline = time.monotonic() + 10
    while _alive(daemon) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(daemon), "the daemon survived SIGKILL of gho2kvm"
