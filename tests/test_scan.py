"""``gho2kvm scan``: span sets, VMware folders, hostile names and files, ``--update`` keeping edits.

Every test runs the real CLI (``python -m pipeline scan``) over a folder built with qemu-img and the
GHO test writer, and checks what a user sees: the config written (it must pass ``gho2kvm validate``),
the one-line messages on stderr and the exit code.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.app import scan
from tests.support import gho_writer as gw

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "gho"


def run_cli(*args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout, env=dict(os.environ, GHO2KVM_FORCE_TCG="1"))


def qemu_img(*args: str | Path) -> None:
    subprocess.run(["qemu-img", "create", "-q", *map(str, args)], check=True)


def images(config: Path) -> dict[str, dict]:
    return {i["id"]: i for i in yaml.safe_load(config.read_text())["images"]}


def validate(config: Path) -> None:
    r = run_cli("validate", "--config", config)
    assert r.returncode == 0, r.stderr


def sector_gho(path: Path, span_size: int | None = None) -> list[Path]:
    """A small Ghost disk image (sector mode, one FAT16 partition), split into spans when asked."""
    disk = bytearray(2 * 1024 * 1024)
    disk[:512] = gw.mbr([(0x06, 2048, 2048)])
    gw.write_sector_disk(path, bytes(disk), [(0x06, 2048, 2048)], "high")
    return gw.split_spans(path, span_size) if span_size else [path]


def scan_to(tmp_path: Path, *folders: Path) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path / "site.yaml"
    r = run_cli("scan", *folders, "--output", out)
    assert r.returncode == 0, r.stderr
    return out, r


def test_span_set_is_one_image_and_a_missing_span_is_named(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    files = sector_gho(shelf / "OFFICE.GHO", 3000)
    assert len(files) >= 4  # OFFICE.GHO + OFFIC001.GHS …
    shutil.copy(FIXTURES / "11_high.gho", shelf / "Win98 Lab.gho")
    cfg, r = scan_to(tmp_path, shelf)
    got = images(cfg)
    assert set(got) == {"office", "win98-lab"}, cfg.read_text()
    assert got["office"]["source"] == str(shelf / "OFFICE.GHO")
    text = cfg.read_text()
    assert "spans: OFFIC001.GHS, OFFIC002.GHS" in text
    assert "Ghost 7.5-style image, compression high, sector, no password" in text
    assert "disk partitions: FAT16 1.0 MiB (active)" in text
    assert "3 FAT partition(s), files per catalogue: 5, 1, 1" in text  # read from the trailer only
    assert r.stderr.count("scan:") == 0
    validate(cfg)

    # a span goes missing: the entry is commented out, stderr names the span
    files[2].unlink()
    cfg.unlink()
    cfg, r = scan_to(tmp_path, shelf)
    assert set(images(cfg)) == {"win98-lab"}
    assert f"span {files[2].name} is missing" in r.stderr
    assert f"{files[3].name}: a continuation of OFFICE.GHO after a missing span" in r.stderr
    assert "# NOT USABLE YET: span OFFIC002.GHS is missing" in cfg.read_text()
    validate(cfg)


def test_continuation_without_its_first_file(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    files = sector_gho(shelf / "LOST.GHO", 3000)
    shutil.copy(FIXTURES / "75_none.gho", shelf / "keep.gho")
    files[0].unlink()
    cfg, r = scan_to(tmp_path, shelf)
    assert set(images(cfg)) == {"keep"}
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scan:")]
    assert len(lines) == len(files) - 1 and all("first file (.GHO) was not found" in ln for ln in lines)


def test_password_protected_image_gets_password_env(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copy(FIXTURES / "11_high_pw.gho", shelf / "hr-pc.gho")
    cfg, _ = scan_to(tmp_path, shelf)
    img = images(cfg)["hr-pc"]
    assert img["ghost"] == {"password_env": "GHO2KVM_PW_HR_PC"}
    assert "password-protected" in cfg.read_text()
    validate(cfg)


def test_vmware_folder(tmp_path: Path) -> None:
    vm = tmp_path / "shelf" / "XP Office"
    vm.mkdir(parents=True)
    qemu_img("-f", "vmdk", "-o", "subformat=twoGbMaxExtentFlat", vm / "xp.vmdk", "64M")
    qemu_img("-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", vm / "data.vmdk", "3G")
    (vm / "XP Office.vmx").write_text(
        '.encoding = "UTF-8"\nvirtualHW.version = "7"\ndisplayName = "XP Office"\nguestOS = "winxppro"\n'
        'memsize = "768"\nnumvcpus = "2"\nscsi0:1.present = "TRUE"\nscsi0:1.fileName = "data.vmdk"\n'
        'ide1:0.present = "TRUE"\nide1:0.deviceType = "cdrom-image"\nide1:0.fileName = "x.iso"\n'
        'ide0:0.present = "TRUE"\nide0:0.fileName = "xp.vmdk"\nethernet0.present = "TRUE"\n'
        'ethernet0.address = "52:54:00:12:34:56"\n')
    # a standalone monolithicSparse disk and a snapshot (delta) of another one, next to it
    other = tmp_path / "shelf" / "disks"
    other.mkdir()
    qemu_img("-f", "vmdk", other / "w2k3.vmdk", "64M")
    qemu_img("-f", "vmdk", other / "base.vmdk", "64M")
    qemu_img("-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", other / "base-000001.vmdk")
    cfg, r = scan_to(tmp_path, tmp_path / "shelf")
    got = images(cfg)
    assert set(got) == {"xp-office", "w2k3"}, cfg.read_text()
    xp = got["xp-office"]
    assert xp["source"] == str(vm / "xp.vmdk")  # ide0:0 before scsi0:1
    assert (xp["memory_mib"], xp["vcpus"], xp["title"]) == (768, 2, "XP Office")
    assert xp["mac"] == "52:54:00:12:34:56"
    text = cfg.read_text()
    assert "disks: ide0:0 xp.vmdk, scsi0:1 data.vmdk" in text
    for extent in ("xp-f001.vmdk", "data-s001.vmdk", "data-s002.vmdk"):
        assert f'"{vm / extent}"' not in text and extent not in r.stderr
    assert "base-000001" in text and "NOT USABLE YET: a snapshot (delta disk)" in text
    assert str(other / "base.vmdk") not in text  # the delta's parent is part of it, not an image
    assert "scan:" not in r.stderr
    validate(cfg)


def test_other_formats_by_content_not_name(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    qemu_img("-f", "qcow2", shelf / "win7.qcow2", "1G")
    qemu_img("-f", "qcow2", "-b", "win7.qcow2", "-F", "qcow2", shelf / "overlay.qcow2")
    qemu_img("-f", "vpc", shelf / "old.vhd", "64M")
    qemu_img("-f", "vhdx", shelf / "new.vhdx", "64M")
    disk = bytearray(1024 * 1024)
    disk[:512] = gw.mbr([(0x07, 63, 2000)])
    (shelf / "server.img").write_bytes(bytes(disk))
    (shelf / "server-backup.bin").write_bytes(bytes(disk))  # a raw disk with a name no source may have
    (shelf / "notes.img").write_bytes(b"not a disk at all" * 40)  # .img, but no partition table
    ova = tmp_path / "ova"
    ova.mkdir()
    (ova / "app.ovf").write_text('<?xml version="1.0"?><Envelope/>')
    qemu_img("-f", "vmdk", "-o", "subformat=streamOptimized", ova / "app-disk1.vmdk", "16M")
    subprocess.run(["tar", "cf", str(shelf / "appliance.ova"), "app.ovf", "app-disk1.vmdk"], cwd=ova,
                   check=True)
    cfg, r = scan_to(tmp_path, shelf)
    got = images(cfg)
    assert set(got) == {"win7", "old", "new", "server"}, cfg.read_text()
    text = cfg.read_text()
    assert "raw disk, MBR partitions: NTFS 1000.0 KiB (active)" in text
    assert "VHDX, 64.0 MiB virtual" in text and "VHD (dynamic), 64.0 MiB virtual" in text
    assert "qcow2 version 3, 1.0 GiB virtual" in text
    assert "# - id: overlay" in text and "has a backing file" in text
    assert "# - id: server-backup" in text and "link or rename it" in text
    assert "# - id: appliance" in text and "OVA is not yet accepted" in text
    assert "holds: app.ovf, app-disk1.vmdk" in text
    assert "notes" not in text
    validate(cfg)


def test_hostile_names_and_files_one_line_each(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    good = shelf / 'a "quoted" #name: x.gho'
    shutil.copy(FIXTURES / "75_none.gho", good)
    shutil.copy(FIXTURES / "75_none.gho", shelf / "line\nbreak.gho")
    shutil.copy(FIXTURES / "75_none.gho", shelf / "\u2028sep.gho")
    shutil.copy(FIXTURES / "75_none.gho", os.fsdecode(os.fsencode(str(shelf)) + b"/bad\xff.gho"))
    os.mkfifo(shelf / "pipe.gho")
    os.mkfifo(shelf / "pipe.vmdk")
    (shelf / "truncated.gho").write_bytes((FIXTURES / "11_high.gho").read_bytes()[:4096])
    (shelf / "garbage.vmdk").write_bytes(b"KDMV" + b"\xff" * 600)
    (shelf / "empty.gho").write_bytes(b"")
    (shelf / "evil.img").symlink_to("/etc/passwd")
    (shelf / "dangling.vhd").symlink_to(shelf / "nowhere.vhd")
    (shelf / "loop").symlink_to(shelf)
    (shelf / "out").symlink_to("/")
    (shelf / "inside.gho").symlink_to(good)  # the same file through a link inside the shelf: once
    if os.geteuid() == 0:
        os.mknod(shelf / "dev.qcow2", stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    cfg, r = scan_to(tmp_path, shelf)
    got = images(cfg)
    assert set(got) == {"a-quoted-name-x"}, cfg.read_text()
    assert got["a-quoted-name-x"]["source"] == str(good)
    text = cfg.read_text()
    assert text.count("# NOT USABLE YET: its path has control or line-break characters") == 2
    assert "# NOT USABLE YET: its path is not valid UTF-8" in text
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("scan:")]
    for needle in ("pipe.gho: is a FIFO", "pipe.vmdk: is a FIFO", "truncated.gho", "garbage.vmdk",
                   "empty.gho", "evil.img: symlink to /etc/passwd, outside", "dangling.vhd: dangling"):
        assert sum(needle in ln for ln in lines) == 1, (needle, r.stderr)
    if os.geteuid() == 0:
        assert sum("dev.qcow2: is a character device" in ln for ln in lines) == 1
    assert len(lines) == 7 + (os.geteuid() == 0), r.stderr
    assert "Traceback" not in r.stderr
    validate(cfg)


def test_bounded_depth_and_count(tmp_path: Path) -> None:
    deep = tmp_path / "shelf"
    d = deep
    for k in range(5):
        d = d / f"d{k}"
    d.mkdir(parents=True)
    shutil.copy(FIXTURES / "75_none.gho", d / "deep.gho")
    r = run_cli("scan", deep, "--max-depth", "3")
    assert r.returncode == 0 and "deep" not in r.stdout.split("images:")[1]
    assert "deeper than 3 folders; not scanned" in r.stderr
    for k in range(30):
        (tmp_path / "shelf" / f"f{k:02d}.txt").write_text("x")
    r = run_cli("scan", deep, "--max-files", "10")
    assert r.returncode == 0 and "stopped after 10 entries" in r.stderr


def test_output_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "site.yaml"
    out.write_text("mine\n")
    r = run_cli("scan", FIXTURES, "--output", out)
    assert r.returncode == 2 and "use --update" in r.stderr and out.read_text() == "mine\n"


def test_update_keeps_edits_comments_and_ids(tmp_path: Path) -> None:
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    shutil.copy(FIXTURES / "75_none.gho", shelf / "xp1.gho")
    shutil.copy(FIXTURES / "11_high.gho", shelf / "xp2.gho")
    cfg, _ = scan_to(tmp_path, shelf)
    # the user's edits: an id renamed, a key added, comments, a section after images
    text = cfg.read_text().replace("- id: xp1", "- id: accounting   # renamed by me")
    text = text.replace("  - id: xp2\n", "  - id: xp2\n    memory_mib: 1024   # more RAM\n")
    text += "    # boot_check: 120   (xp2's, for later)\n"
    text = "# my site\n" + text + "  # end of my list\nsettings:\n  force_tcg: true\n"
    cfg.write_text(text)
    validate(cfg)
    # new images arrive, one leaves
    shutil.copy(FIXTURES / "11_high_pw.gho", shelf / "xp3.gho")
    shutil.copy(FIXTURES / "75_none.gho", shelf / "accounting.gho")  # its natural id is taken
    (shelf / "xp2.gho").unlink()
    r = run_cli("scan", shelf, "--update", cfg)
    assert r.returncode == 0, r.stderr
    new = cfg.read_text()
    assert new.startswith(text.split("  # end of my list")[0])  # every byte before the new entries kept
    assert new.endswith("  # end of my list\nsettings:\n  force_tcg: true\n")
    assert "- id: accounting   # renamed by me" in new and "memory_mib: 1024   # more RAM" in new
    assert "    # boot_check: 120   (xp2's, for later)\n  # accounting-" in new, "xp2's comment stays with it"
    ids = [i["id"] for i in yaml.safe_load(new)["images"]]
    assert ids[:2] == ["accounting", "xp2"] and ids[2].startswith("accounting-") and ids[3] == "xp3"
    assert "gone     xp2" in r.stdout and str(shelf / "xp2.gho") in r.stdout
    assert "added" in r.stdout and "xp3" in r.stdout
    # a second update finds nothing new: the file is unchanged
    before = cfg.read_bytes()
    r = run_cli("scan", shelf, "--update", cfg)
    assert r.returncode == 0 and cfg.read_bytes() == before and "0 image(s) added" in r.stderr
    shutil.copy(FIXTURES / "11_high.gho", shelf / "xp2.gho")  # back again: validates
    validate(cfg)


def test_update_refuses_a_flow_list_and_a_broken_config(tmp_path: Path) -> None:
    src = tmp_path / "a.gho"
    shutil.copy(FIXTURES / "75_none.gho", src)
    cfg = tmp_path / "site.yaml"
    cfg.write_text(f"images: [{{id: a, source: {src}}}]\n")
    shutil.copy(FIXTURES / "11_high.gho", tmp_path / "b.gho")
    r = run_cli("scan", tmp_path, "--update", cfg)
    assert r.returncode == 2 and "must be a block list" in r.stderr
    assert cfg.read_text() == f"images: [{{id: a, source: {src}}}]\n"
    cfg.write_text("images:\n  - id: a\n    sourc: x.gho\n")
    r = run_cli("scan", tmp_path, "--update", cfg)
    assert r.returncode == 2 and "site.yaml:3: image 'a'" in r.stderr


def test_ids_unique_sanitised_and_stable() -> None:
    found = [scan.Found(Path(p), "raw disk", n, Path(p)) for p, n in
             (("/a/XP Pro.img", "XP Pro"), ("/b/xp pro.img", "xp pro"), ("/c/???.img", "???"),
              ("/d/" + "x" * 80 + ".img", "x" * 80), ("/e/...img", ".."))]
    scan.give_ids(found, {"taken"})
    ids = [f.id for f in found]
    assert ids[0] == "xp-pro" and ids[1].startswith("xp-pro-") and len(set(ids)) == len(ids)
    assert all(scan.ID_RE.match(i) and len(i) <= 64 for i in ids)
    again = [scan.Found(f.scanned, f.kind, f.name, f.source) for f in found]
    scan.give_ids(again, {"taken"})
    assert [f.id for f in again] == ids
    assert scan.env_name("win.98-a") == "GHO2KVM_PW_WIN_98_A"


@pytest.mark.parametrize("text", ["a\nb", "a\u2028b", "x\x85y", "\ufffe", "a\udc80b"])
def test_comment_and_quoted_cannot_break_the_yaml(text: str) -> None:
    doc = f"# {scan.comment(text)}\nkey: {scan.quoted(text)}\n"
    assert yaml.safe_load(doc) == {"key": text}


def test_single_disk_vmware_vm_is_named_by_its_vmx(tmp_path: Path) -> None:
    vm = tmp_path / "shelf" / "Reception"
    vm.mkdir(parents=True)
    qemu_img("-f", "vmdk", vm / "rec.vmdk", "64M")
    (vm / "Reception.vmx").write_text(
        'displayName = "Reception"\nmemsize = "512"\nide0:0.present = "TRUE"\nide0:0.fileName = "rec.vmdk"\n'
        'ethernet0.present = "TRUE"\nethernet0.generatedAddress = "00:0c:29:01:02:03"\n')
    cfg, _ = scan_to(tmp_path, tmp_path / "shelf")
    got = images(cfg)["reception"]
    assert got["source"] == str(vm / "Reception.vmx") and "mac" not in got and "memory_mib" not in got
    validate(cfg)
    r = run_cli("plan", "--config", cfg)
    assert r.returncode == 0 and "00:0c:29:01:02:03  (vmx: ethernet0 (generated))" in r.stdout, r.stdout
