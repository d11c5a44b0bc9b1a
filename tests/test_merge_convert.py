"""End to end: registry-merge and convert through the real CLI, real qemu-img and real libguestfs.

Appliance launches cost 25-60 s each under TCG, so everything runs once per module in :func:`runs`
(6 launches in all, three image chains side by side) and the tests only look at the results:

* ``xp``: the XP disk as a monolithicFlat VMDK with 256 MiB of random data in unpartitioned space
  (so that convert takes long enough to be killed), ``format: raw``, ``registry: [mergeide,
  extra.reg]``. Run 1: ``extra.reg`` malformed → config error, nothing runs. Run 2: file fixed, SIGKILL
  while qemu-img convert runs. Run 3: ``run_cli(..., inject="convert:kill")`` (killed after the work,
  before the receipt). Run 4: finishes.
* ``win7``: Windows 7, current control set 2, as a streamOptimized VMDK, ``format: qcow2``, with
  the same (good) ``extra.reg``.
* ``linux``: no operating system: registry-merge skipped, convert reads the source.

Finally ONE read-only guestfish session downloads the hives from the final disks (and from the
untouched Windows 7 source) for the registry tests.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.tools.guestfs import force_tcg_env
from tests.support.fx_pipeline import REPO, log_events, make_config, run_cli

pytestmark = pytest.mark.usefixtures("force_tcg_env")

RANDOM_MIB = 256
UNICODE_VALUE = "yes \u00fcn\u00efc\u00f6d\u00e9"
EXTRA_REG = "\r\n".join([
    "Windows Registry Editor Version 5.00",
    "",
    "; added by the test: parents Gho2kvmTest and Parameters do not exist in the hive",
    r"[HKEY_LOCAL_MACHINE\SYSTEM\CurrentControlSet\Services\Gho2kvmTest\Parameters\Deep]",
    '"Marker"="gho2kvm-extra"',
    '"Level"=dword:0000002a',
    "",
    r"[HKLM\SOFTWARE\Gho2kvm\Test]",
    f'"Installed"="{UNICODE_VALUE}"',
    "",
]) + "\r\n"
BAD_LINE = 6  # the "Level" line, 1-based
EXTRA_REG_BAD = EXTRA_REG.replace("dword:0000002a", "dword:not-hex")
DEEP = r"Services\Gho2kvmTest\Parameters\Deep"


def utf16_bom(text: str) -> bytes:
    return b"\xff\xfe" + text.encode("utf-16-le")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def stamp(files: list[Path]) -> dict[str, tuple[str, int]]:
    return {str(f): (sha256(f), f.stat().st_mtime_ns) for f in files}


def tmp_leftovers(*folders: Path) -> list[str]:
    return [str(p) for d in folders if d.exists() for p in d.rglob("*") if ".tmp-" in p.name]


def qemu_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out)


def qemu_compare(a: Path, a_fmt: str, b: Path, b_fmt: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", a_fmt, "-F", b_fmt, str(a), str(b)],
                          capture_output=True, text=True)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def hivexget(hive: Path, key: str, value: str | None = None) -> str | None:
    """A value as hivexget prints it; None if the key or value does not exist."""
    argv = ["hivexget", str(hive), key] + ([value] if value is not None else [])
    r = subprocess.run(argv, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def export(hive: Path, key: str) -> str:
    return subprocess.run(["hivexregedit", "--export", str(hive), key], check=True, capture_output=True,
                          text=True).stdout


@dataclass
class Runs:
    root: Path
    xp_source: list[Path]
    xp_before: dict[str, tuple[str, int]]
    xp_after: dict[str, tuple[str, int]] = field(default_factory=dict)
    bad: subprocess.CompletedProcess[str] | None = None
    bad_files: list[str] = field(default_factory=list)
    bad_leftovers: list[str] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)
    killed_rc: int | None = None
    killed_tmp_seen: list[str] = field(default_factory=list)
    killed_convert_receipt: bool = True
    killed_merge_receipt: bool = False
    injected: subprocess.CompletedProcess[str] | None = None
    injected_convert_receipt: bool = True
    final: subprocess.CompletedProcess[str] | None = None
    win7: subprocess.CompletedProcess[str] | None = None
    linux: subprocess.CompletedProcess[str] | None = None
    xp_events: list[dict[str, Any]] = field(default_factory=list)
    hives: dict[str, Path] = field(default_factory=dict)

    def dir(self, name: str) -> Path:
        return self.root / name

    def receipt(self, name: str, step: str) -> dict[str, Any]:
        return json.loads((self.root / name / "work" / name / f"{step}.json").read_text())


def _cli_popen(config: Path, log: Path, **kw: Any) -> subprocess.Popen[bytes]:
    env = dict(os.environ, GHO2KVM_FORCE_TCG="1")
    with open(log.with_suffix(".out"), "wb") as out, open(log, "wb") as err:
        return subprocess.Popen([sys.executable, "-m", "pipeline", "migrate", "--config", str(config)],
                                stdout=out, stderr=err, env=env, cwd=str(REPO), **kw)


def _completed(proc: subprocess.Popen[bytes], log: Path) -> subprocess.CompletedProcess[str]:
    rc = proc.wait(timeout=900)
    return subprocess.CompletedProcess(proc.args, rc, log.with_suffix(".out").read_text(), log.read_text())


def _make_xp_flat(xp_raw: Path, dest: Path) -> Path:
    """XP disk + RANDOM_MIB of random data after its last partition, as a monolithicFlat VMDK."""
    dest.mkdir(parents=True)
    raw = dest / "big.raw"
    shutil.copyfile(xp_raw, raw)
    with open(raw, "r+b") as fh:
        fh.seek(xp_raw.stat().st_size)
        for _ in range(RANDOM_MIB):
            fh.write(os.urandom(1 << 20))
    vmdk = dest / "xp.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=monolithicFlat",
                    str(raw), str(vmdk)], check=True)
    raw.unlink()
    return vmdk


def _kill_during_convert(config: Path, log: Path, images: Path) -> tuple[int, list[str]]:
    """Run the CLI and SIGKILL it (and the qemu-img it started) as soon as convert's temp file shows."""
    proc = _cli_popen(config, log)
    deadline = time.monotonic() + 900
    seen: list[str] = []
    while proc.poll() is None and time.monotonic() < deadline:
        seen = [p.name for p in images.glob(".xp.raw.tmp-*")] if images.exists() else []
        if seen:
            kids = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            for k in kids:  # qemu-img runs in its own session: a real crash takes it down too
                with contextlib.suppress(ProcessLookupError):
                    os.kill(k, signal.SIGKILL)
            break
        time.sleep(0.01)
    return proc.wait(timeout=60), seen


def _read_back(runs: Runs, win7_source: Path) -> None:
    """One read-only appliance: hives of the final XP and Windows 7 disks and of the Windows 7 source."""
    out = runs.root / "readback"
    out.mkdir()
    drives = [("raw", runs.root / "xp" / "images" / "xp.raw"),          # /dev/sda, NTFS on sda1
              ("qcow2", runs.root / "win7" / "images" / "win7.qcow2"),  # /dev/sdb, ESP sdb1, NTFS sdb2
              ("raw", win7_source)]                                     # /dev/sdc
    argv = ["guestfish", "--ro"]
    for fmt, path in drives:
        argv += [f"--format={fmt}", "-a", str(path)]
    script = ["run"]
    for name, part in (("xp", "/dev/sda1"), ("win7", "/dev/sdb2"), ("win7-source", "/dev/sdc2")):
        script += [f"mount-ro {part} /"]
        for hive in ("system", "software"):
            script += [f"download /WINDOWS/system32/config/{hive} {out}/{name}-{hive}"]
            runs.hives[f"{name}-{hive}"] = out / f"{name}-{hive}"
        script += ["umount-all"]
    env = dict(os.environ, **force_tcg_env(True))
    r = subprocess.run(argv, input="\n".join(script) + "\n", capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr


def _xp_chain(root: Path, vmdk: Path, defaults: dict[str, Any]) -> Runs:
    """Malformed .reg run, SIGKILL during convert, kill before the receipt, then the finishing run."""
    xp_dir = root / "xp"
    xp_source = [vmdk, vmdk.with_name("xp-flat.vmdk")]
    runs = Runs(root=root, xp_source=xp_source, xp_before=stamp(xp_source))
    reg = xp_dir / "extra.reg"
    reg.write_bytes(utf16_bom(EXTRA_REG_BAD))
    xp_cfg = make_config(xp_dir, [{"id": "xp", "source": vmdk, "format": "raw",
                                   "registry": ["mergeide", "extra.reg"]}], defaults=defaults)
    work, images = xp_dir / "work" / "xp", xp_dir / "images"

    runs.bad = run_cli("migrate", "--config", str(xp_cfg))
    runs.bad_files = sorted(p.name for p in work.iterdir()) if work.exists() else []
    runs.bad_leftovers = tmp_leftovers(xp_dir / "work", images)
    runs.bad_images = sorted(p.name for p in images.iterdir()) if images.exists() else []
    events = log_events(runs.bad)

    reg.write_bytes(utf16_bom(EXTRA_REG))  # the user fixes the file and runs again
    runs.killed_rc, runs.killed_tmp_seen = _kill_during_convert(xp_cfg, xp_dir / "killed.log", images)
    runs.killed_merge_receipt = (work / "registry-merge.json").exists()
    runs.killed_convert_receipt = (work / "convert.json").exists()
    events += log_events(subprocess.CompletedProcess([], 0, "", (xp_dir / "killed.log").read_text()))

    runs.injected = run_cli("migrate", "--config", str(xp_cfg), inject="convert:kill")
    runs.injected_convert_receipt = (work / "convert.json").exists()
    events += log_events(runs.injected)

    runs.final = run_cli("migrate", "--config", str(xp_cfg))
    events += log_events(runs.final)
    runs.xp_events = events
    runs.xp_after = stamp(xp_source)
    return runs


@pytest.fixture(scope="module")
def runs(xp_raw: Path, win7_uefi_raw: Path, linux_raw: Path) -> Iterator[Runs]:
    # not tmp_path_factory: concurrent pytest sessions on this machine rotate its base folder away
    root = Path(tempfile.mkdtemp(prefix="gho2kvm-merge-convert-"))
    try:
        yield _run_all(root, xp_raw, win7_uefi_raw, linux_raw)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _run_all(root: Path, xp_raw: Path, win7_uefi_raw: Path, linux_raw: Path) -> Runs:
    defaults = {"libvirt_uri": "test:///default"}

    # the Windows 7 and Linux chains run in the background while the XP chain goes through its runs
    win7_dir = root / "win7"
    win7_dir.mkdir()
    win7_src = win7_dir / "win7.vmdk"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized",
                    str(win7_uefi_raw), str(win7_src)], check=True)
    (win7_dir / "extra.reg").write_bytes(utf16_bom(EXTRA_REG))
    win7_cfg = make_config(win7_dir, [{"id": "win7", "source": win7_src, "format": "qcow2",
                                       "registry": ["mergeide", "extra.reg"]}], defaults=defaults)
    linux_dir = root / "linux"
    linux_dir.mkdir()
    linux_src = linux_dir / "linux.raw"
    shutil.copyfile(linux_raw, linux_src)
    linux_cfg = make_config(linux_dir, [{"id": "linux", "source": linux_src}], defaults=defaults)
    xp_vmdk = _make_xp_flat(xp_raw, root / "xp" / "src")
    # staggered: guestfish --listen prints its PID before the server binds its socket (a race
    # libguestfs documents), which pipeline/tools/guestfs.py does not wait for yet
    bg = []
    for cfg, d in ((win7_cfg, win7_dir), (linux_cfg, linux_dir)):
        bg.append((_cli_popen(cfg, d / "run.log"), d / "run.log"))
        time.sleep(3)

    try:
        runs = _xp_chain(root, xp_vmdk, defaults)
    except BaseException:
        for proc, _ in bg:  # Ctrl-C, so that their guestfish sessions are closed too
            proc.send_signal(signal.SIGINT)
        for proc, _ in bg:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise

    (runs.win7, runs.linux) = (_completed(p, log) for p, log in bg)
    for name, proc in (("xp", runs.final), ("win7", runs.win7)):
        final = root / name / "images" / f"{name}.{'qcow2' if name == 'win7' else 'raw'}"
        assert final.exists(), f"{name}: no final disk\n{proc.stdout}"
    _read_back(runs, win7_uefi_raw)
    return runs


# ------------------------------------------------------------------------------------------ XP


def test_xp_source_never_written(runs: Runs) -> None:
    assert runs.final is not None and runs.final.returncode == 0, runs.final.stdout
    assert runs.xp_after == runs.xp_before


def test_xp_final_disk_has_mergeide(runs: Runs) -> None:
    system = runs.hives["xp-system"]
    assert hivexget(system, r"\Select", "Current") == "1"
    assert hivexget(system, r"\ControlSet001\Services\atapi", "Start") == "0"
    assert hivexget(system, r"\ControlSet001\Services\IntelIde", "Start") == "0"
    cdd = r"\ControlSet001\Control\CriticalDeviceDatabase\pci#ven_8086&dev_7010"
    assert hivexget(system, cdd, "Service") == "intelide"
    assert hivexget(system, cdd, "ClassGUID") == "{4D36E96A-E325-11CE-BFC1-08002BE10318}"
    # the NT 6 set was not applied to XP
    assert hivexget(system, r"\ControlSet001\Services\msahci") is None


def test_xp_extra_reg_lands_in_live_control_set_and_software(runs: Runs) -> None:
    system, software = runs.hives["xp-system"], runs.hives["xp-software"]
    assert hivexget(system, rf"\ControlSet001\{DEEP}", "Marker") == "gho2kvm-extra"
    assert hivexget(system, rf"\ControlSet001\{DEEP}", "Level") == "42"
    assert hivexget(system, r"\CurrentControlSet") is None  # never created literally
    assert hivexget(software, r"\Gho2kvm\Test", "Installed") == UNICODE_VALUE
    assert hivexget(system, r"\Gho2kvm") is None  # not in the wrong hive


def test_xp_receipts(runs: Runs) -> None:
    merge = runs.receipt("xp", "registry-merge")
    res = merge["result"]
    assert res["skipped"] is False
    assert res["current_control_set"] == "ControlSet001" and res["registry_variant"] == "nt5"
    assert res["backing_file"] == str(runs.xp_source[0].absolute()) and res["backing_format"] == "vmdk"
    assert res["hives"]["SYSTEM"]["verified"] is True and res["hives"]["SOFTWARE"]["verified"] is True
    assert res["hives"]["SYSTEM"]["values"] > 20 and res["hives"]["SOFTWARE"]["values"] == 1
    # inspect's appliance, taken over (one launch per image)
    assert res["appliance_shared"] is True and res["appliance_launches"] == 0
    assert res["qemu_img_version"] and res["libguestfs_version"]
    assert merge["duration_s"] >= res["appliance_seconds"]
    overlay = runs.dir("xp") / "work" / "xp" / "overlay.qcow2"
    assert merge["outputs"]["overlay"]["path"] == str(overlay)
    assert merge["outputs"]["overlay"]["size"] == overlay.stat().st_size
    assert 0 < merge["outputs"]["overlay"]["allocated"] < 8 << 20

    conv = runs.receipt("xp", "convert")
    res = conv["result"]
    final = runs.dir("xp") / "images" / "xp.raw"
    assert res["input"] == str(overlay) and res["input_format"] == "qcow2"
    assert res["output"] == str(final) and res["format"] == "raw"
    assert res["verified"] is True and res["verify_seconds"] >= 0 and res["convert_seconds"] > 0
    assert res["qemu_img_version"]
    assert conv["outputs"]["disk"]["size"] == final.stat().st_size == (64 + RANDOM_MIB) << 20
    assert conv["duration_s"] >= res["convert_seconds"]
    assert conv["fingerprint"]["upstream_run_id"] == merge["run_id"]


def test_xp_raw_output_is_sparse_raw(runs: Runs) -> None:
    final = runs.dir("xp") / "images" / "xp.raw"
    info = qemu_info(final)
    assert info["format"] == "raw"
    assert info["virtual-size"] == (64 + RANDOM_MIB) << 20
    allocated = final.stat().st_blocks * 512
    # random data + a few MiB of file system; the empty rest of the 64 MiB partition is a hole
    assert allocated < (RANDOM_MIB + 16) << 20, allocated


def test_malformed_reg_fails_before_overlay(runs: Runs) -> None:
    """A malformed .reg is a config error: one line naming config, image, field, .reg file and line;
    nothing runs (not even inspect's appliance), nothing is written."""
    bad = runs.bad
    assert bad is not None and bad.returncode == 2
    where = f"extra.reg:{BAD_LINE}"
    lines = [ln for ln in bad.stderr.splitlines() if where in ln]
    assert lines and "image 'xp'" in lines[0] and "field 'registry'" in lines[0], bad.stderr
    assert not [e for e in log_events(bad) if e.get("event") == "step started"]
    assert runs.bad_files == []
    assert runs.bad_leftovers == []
    assert runs.bad_images == []  # no final disk either


def test_sigkill_during_qemu_img_convert_then_resume(runs: Runs) -> None:
    assert runs.killed_tmp_seen, "convert's temp file never showed up"
    assert runs.killed_rc == -signal.SIGKILL
    assert runs.killed_merge_receipt and not runs.killed_convert_receipt


def test_kill_after_convert_before_receipt_then_resume(runs: Runs) -> None:
    assert runs.injected is not None and runs.injected.returncode == -signal.SIGKILL
    assert not runs.injected_convert_receipt
    assert runs.final is not None and runs.final.returncode == 0
    xp = runs.dir("xp")
    overlay, final = xp / "work" / "xp" / "overlay.qcow2", xp / "images" / "xp.raw"
    r = qemu_compare(overlay, "qcow2", final, "raw")
    assert r.returncode == 0, r.stdout + r.stderr
    assert tmp_leftovers(xp / "work", xp / "images") == []
    # the resumed runs did not redo inspect or registry-merge: one launch over all four runs
    launched = [e["task"] for e in runs.xp_events if e.get("event") == "appliance launched"]
    assert launched == ["inspect"]


# ------------------------------------------------------------------------------------------ Windows 7


def test_win7_run_outcome(runs: Runs) -> None:
    """Registry-merge and convert finish; domain XML for a UEFI guest needs OVMF on the host, which the
    test:///default driver may not offer: only that failure, after convert, is accepted."""
    assert runs.win7 is not None
    if runs.win7.returncode != 0:
        failed = [e for e in log_events(runs.win7) if e.get("event") == "step failed"]
        assert [e["task"] for e in failed] == ["xml-render"], runs.win7.stdout
        assert "UEFI" in failed[0]["error"], failed[0]["error"]
    assert runs.receipt("win7", "convert")["result"]["verified"] is True


def test_win7_changes_land_in_control_set_002(runs: Runs) -> None:
    system = runs.hives["win7-system"]
    assert hivexget(system, r"\Select", "Current") == "2"
    for svc in ("atapi", "intelide"):  # the IDE boot drivers (disk_bus ide) ...
        assert hivexget(system, rf"\ControlSet002\Services\{svc}", "Start") == "0", svc
    for svc in ("msahci", "pciide"):  # ... and only those: the others keep the guest's own Start
        assert hivexget(system, rf"\ControlSet002\Services\{svc}", "Start") == "3", svc
    cdd = r"\ControlSet002\Control\CriticalDeviceDatabase"
    assert hivexget(system, rf"{cdd}\pci#cc_010601", "Service") == "msahci"
    assert hivexget(system, rf"{cdd}\pci#ven_8086&dev_7010", "Service") == "intelide"
    assert hivexget(system, rf"\ControlSet002\{DEEP}", "Level") == "42"
    assert hivexget(runs.hives["win7-software"], r"\Gho2kvm\Test", "Installed") == UNICODE_VALUE


def test_win7_control_set_001_untouched(runs: Runs) -> None:
    before = export(runs.hives["win7-source-system"], r"\ControlSet001")
    after = export(runs.hives["win7-system"], r"\ControlSet001")
    assert "atapi" in before and after == before
    assert hivexget(runs.hives["win7-system"], rf"\ControlSet001\{DEEP}") is None
    # and the live set did change
    assert export(runs.hives["win7-system"], r"\ControlSet002") != export(
        runs.hives["win7-source-system"], r"\ControlSet002")


def test_win7_streamoptimized_to_qcow2(runs: Runs) -> None:
    merge = runs.receipt("win7", "registry-merge")["result"]
    assert merge["current_control_set"] == "ControlSet002" and merge["registry_variant"] == "nt6"
    assert merge["backing_format"] == "vmdk"
    final = runs.dir("win7") / "images" / "win7.qcow2"
    info = qemu_info(final)
    assert info["format"] == "qcow2"
    assert "backing-filename" not in info  # standalone, not chained to the overlay or the source
    assert info["virtual-size"] == 128 << 20
    conv = runs.receipt("win7", "convert")["result"]
    assert conv["format"] == "qcow2" and conv["verified"] is True
    r = qemu_compare(runs.dir("win7") / "work" / "win7" / "overlay.qcow2", "qcow2", final, "qcow2")
    assert r.returncode == 0, r.stdout + r.stderr


# ------------------------------------------------------------------------------------------ no Windows


def test_non_windows_disk_skips_registry_merge(runs: Runs) -> None:
    assert runs.linux is not None and runs.linux.returncode == 0, runs.linux.stdout
    merge = runs.receipt("linux", "registry-merge")
    assert merge["result"]["skipped"] is True and merge["result"]["overlay"] is None
    assert merge["warnings"] and "not recognised as Windows" in merge["warnings"][0]
    work = runs.dir("linux") / "work" / "linux"
    assert not (work / "overlay.qcow2").exists()
    conv = runs.receipt("linux", "convert")["result"]
    src = runs.dir("linux") / "linux.raw"
    assert conv["input"] == str(src) and conv["input_format"] == "raw" and conv["verified"] is True
    assert qemu_compare(src, "raw", runs.dir("linux") / "images" / "linux.raw", "raw").returncode == 0
    warned = [e for e in log_events(runs.linux) if e.get("event") == "registry-merge skipped"]
    assert warned and warned[0]["level"] == "warning"
