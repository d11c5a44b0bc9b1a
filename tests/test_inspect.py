"""The inspect step against real disks: qemu-img facts, VMDK safety, and libguestfs guest facts.

Appliance launches are what cost time here (≈ 35 s each under TCG), so each guest inspection runs
once per module in a fixture and several tests read its result: XP raw, Windows 7 UEFI raw, one VMDK
(twoGbMaxExtentSparse, copied and renamed), the non-Windows disk and a blank disk — five launches in
all. Everything else (VMDK safety, damaged images, backing files) needs qemu-img at most.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.fakedisk import VMDK_SUBFORMATS
from pipeline.core.errors import InputError
from pipeline.model import windows as guest
from pipeline.steps import inspect as insp
from pipeline.tools import guestfs
from tests.support.fx_disks import private_copy, vmdk_files

pytestmark = pytest.mark.guestfs

IDE = ("atapi.sys", "intelide.sys", "pciide.sys", "pciidex.sys")
ALL_DRIVERS = {f: f in IDE for f in guest.DRIVER_FILES}  # the IDE drivers, no AHCI or virtio driver
WIN7_DRIVERS = {**ALL_DRIVERS, "msahci.sys": True}


def fingerprint(files: list[Path]) -> dict[str, tuple[str, int, int]]:
    """sha256, size and mtime of each file: what 'inspect never writes' means to a user."""
    out = {}
    for f in files:
        st = f.stat()
        out[f.name] = (hashlib.sha256(f.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def inspected(source: Path, image_id: str, files: list[Path] | None = None,
              expect_os: str = "windows") -> dict[str, Any]:
    files = files or [source]
    before = fingerprint(files)
    appliances = guestfs.Appliances(Path(tempfile.mkdtemp(prefix="gho2kvm-inspect-launches-")))
    facts = insp.inspect_image(insp.InspectInput(source, image_id, force_tcg=True,
                                                 image_dir=appliances.folder, expect_os=expect_os)).to_dict()
    facts["_launches"] = len(appliances.launches())
    shutil.rmtree(appliances.folder)
    facts["_unchanged"] = fingerprint(files) == before
    return facts


@pytest.fixture(scope="module")
def xp_facts(xp_raw: Path) -> dict[str, Any]:
    return inspected(xp_raw, "xp")


@pytest.fixture(scope="module")
def win7_facts(win7_uefi_raw: Path) -> dict[str, Any]:
    return inspected(win7_uefi_raw, "win7")


@pytest.fixture(scope="module")
def vmdk_copy(xp_vmdk: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private twoGbMaxExtentSparse copy (descriptor + extent) in a folder of its own."""
    return private_copy(xp_vmdk("twoGbMaxExtentSparse"), tmp_path_factory.mktemp("twogb"))


@pytest.fixture(scope="module")
def vmdk_facts(vmdk_copy: Path) -> dict[str, Any]:
    return inspected(vmdk_copy, "xp-vmdk", vmdk_files(vmdk_copy))


@pytest.fixture(scope="module")
def linux_facts(linux_raw: Path) -> dict[str, Any]:
    return inspected(linux_raw, "data")


# ---------------------------------------------------------------------------------------------
# guest facts


def test_xp_guest_facts(xp_facts: dict[str, Any], xp_raw: Path) -> None:
    f = xp_facts
    assert f["image_id"] == "xp"
    assert f["source"] == str(xp_raw)
    assert f["format"] == "raw"
    assert f["virtual_size"] == 64 * 1024 * 1024
    assert f["backing_file"] is None
    assert f["os"] == "windows"
    assert f["product_name"] == "Microsoft Windows XP"
    assert (f["major_version"], f["minor_version"]) == (5, 1)
    assert f["arch"] == "i386"
    assert f["systemroot"] == "/WINDOWS"
    assert f["current_control_set"] == "ControlSet001"
    assert f["partition_table"] == "msdos"
    assert f["firmware"] == "bios"
    assert f["hostname"].upper() == "XPDEMO"
    assert f["drivers_present"] == ALL_DRIVERS
    sig = f["disk_signature"]  # this disk has no MountedDevices: nothing to compare
    assert sig["mbr"].startswith("0x") and sig["registry"] is None and sig["matches"] is None
    assert "MountedDevices" in sig["note"]
    assert f["services"]["atapi"] == 3 and f["services"]["msahci"] is None
    assert f["qemu_img_version"][0].isdigit()
    assert f["appliance_seconds"] > 0
    assert f["_launches"] == 1, "one appliance launch per inspection"


def test_win7_uefi_guest_facts(win7_facts: dict[str, Any]) -> None:
    f = win7_facts
    assert f["os"] == "windows"
    assert f["product_name"] == "Windows 7 Professional"
    assert (f["major_version"], f["minor_version"]) == (6, 1)
    assert f["arch"] == "x86_64"
    assert f["current_control_set"] == "ControlSet002"
    assert f["partition_table"] == "gpt"
    assert f["firmware"] == "uefi"
    assert f["root"] == "/dev/sda2"  # the ESP is partition 1
    assert f["hostname"].upper() == "WIN7DEMO"
    assert f["drivers_present"] == WIN7_DRIVERS
    # read from the live ControlSet002: msahci installed but off, no virtio drivers
    assert f["services"] == {"atapi": 3, "intelide": 3, "pciide": 3, "msahci": 3, "storahci": None,
                             "viostor": None, "netkvm": None}
    assert f["_launches"] == 1


def test_vmdk_guest_facts(vmdk_facts: dict[str, Any]) -> None:
    f = vmdk_facts
    assert f["format"] == "vmdk"
    assert f["create_type"] == "twoGbMaxExtentSparse"
    assert f["os"] == "windows"
    assert (f["product_name"], f["major_version"], f["minor_version"]) == ("Microsoft Windows XP", 5, 1)
    assert f["current_control_set"] == "ControlSet001"
    assert f["firmware"] == "bios"
    assert f["drivers_present"] == ALL_DRIVERS


def test_non_windows_disk_is_os_unknown(linux_facts: dict[str, Any]) -> None:
    f = linux_facts
    assert f["os"] == "unknown"
    assert f["partition_table"] == "msdos"
    assert f["firmware"] == "bios"
    assert f["product_name"] is None and f["drivers_present"] is None
    assert f["_launches"] == 1


def test_disk_without_a_partition_table_is_os_unknown(tmp_path: Path) -> None:
    """A blank data disk: part-get-parttype fails on it (handled), and the appliance must live on for
    inspect-os and the rest (it used to die with the failed command: 'server is not running')."""
    blank = tmp_path / "blank.raw"
    with open(blank, "wb") as f:
        f.truncate(64 << 20)
    f = inspected(blank, "blank", expect_os="any")
    assert (f["os"], f["partition_table"], f["firmware"]) == ("unknown", "none", "bios")
    assert f["_launches"] == 1 and f["_unchanged"]


@pytest.mark.parametrize("which", ["xp_facts", "win7_facts", "vmdk_facts", "linux_facts"])
def test_inspect_leaves_the_source_untouched(which: str, request: pytest.FixtureRequest) -> None:
    assert request.getfixturevalue(which)["_unchanged"], "sha256, size or mtime changed"


# ---------------------------------------------------------------------------------------------
# VMDK subformats (qemu-img only)


@pytest.mark.parametrize("subformat", VMDK_SUBFORMATS)
def test_vmdk_subformats(subformat: str, xp_vmdk: Callable[[str], Path]) -> None:
    vmdk = xp_vmdk(subformat)
    facts = insp.disk_facts(vmdk, "xp")
    assert facts["format"] == "vmdk"
    assert facts["create_type"] == subformat
    assert facts["virtual_size"] == 64 * 1024 * 1024
    assert facts["check"] is None or facts["check"].get("check-errors", 0) == 0
    expected_file = {"monolithicSparse": "xp.vmdk", "streamOptimized": "xp.vmdk",
                     "monolithicFlat": "xp-flat.vmdk", "twoGbMaxExtentSparse": "xp-s001.vmdk"}[subformat]
    (ext,) = facts["extents"]
    assert ext["file"] == expected_file
    assert ext["path"] == str(vmdk.parent.resolve() / expected_file)
    assert ext["sectors"] * 512 == 64 * 1024 * 1024
    assert ext["type"] == ("FLAT" if subformat == "monolithicFlat" else "SPARSE")


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_renamed_single_file_vmdk_is_its_own_extent(subformat: str, xp_vmdk: Callable[[str], Path],
                                                     tmp_path: Path) -> None:
    # the embedded descriptor still says "xp.vmdk"; qemu ignores that name, so must we
    renamed = tmp_path / "office-pc.vmdk"
    shutil.copyfile(xp_vmdk(subformat), renamed)
    facts = insp.disk_facts(renamed, "office")
    assert facts["create_type"] == subformat
    assert [e["path"] for e in facts["extents"]] == [str(renamed)]


# ---------------------------------------------------------------------------------------------
# unsafe or unknown VMDK descriptors: refused before qemu-img or libguestfs touch anything


@pytest.fixture
def no_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("qemu-img/libguestfs must not run for a refused descriptor")

    monkeypatch.setattr(insp.qemu_img, "info", forbidden)
    monkeypatch.setattr(insp.qemu_img, "check", forbidden)
    monkeypatch.setattr(insp, "inspect_session", forbidden)


def descriptor(folder: Path, *extent_lines: str, create_type: str = "monolithicFlat",
               extra: str = "", name: str = "disk.vmdk") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "disk-flat.vmdk").write_bytes(b"\0" * 4096)
    text = ("# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
            f'createType="{create_type}"\n{extra}\n# Extent description\n'
            + "\n".join(extent_lines or ['RW 8 FLAT "disk-flat.vmdk" 0'])
            + '\n\n# The Disk Data Base\n#DDB\nddb.adapterType = "ide"\n')
    path = folder / name
    path.write_text(text)
    return path


def refused(path: Path, image_id: str = "bad") -> str:
    with pytest.raises(InputError) as ei:
        insp.inspect_image(insp.InspectInput(path, image_id, force_tcg=True))
    msg = str(ei.value)
    assert msg.startswith(f"[image {image_id}, step inspect] {path}: "), msg
    assert "\n" not in msg
    return msg


def test_hand_written_descriptor_is_accepted_when_safe(tmp_path: Path) -> None:
    # control for the refusals below: same descriptor, harmless extent — qemu-img reads it
    facts = insp.disk_facts(descriptor(tmp_path / "img"), "ok")
    assert facts["virtual_size"] == 4096
    assert facts["extents"][0]["path"] == str((tmp_path / "img" / "disk-flat.vmdk").resolve())


def test_extent_with_absolute_path_is_refused(tmp_path: Path, no_tools: None) -> None:
    vmdk = descriptor(tmp_path / "img", 'RW 8 FLAT "disk-flat.vmdk" 0', 'RW 1 FLAT "/etc/hostname" 0')
    msg = refused(vmdk)
    assert "VMDK extent '/etc/hostname' lies outside the image's folder" in msg
    assert msg.endswith("refused")


def test_extent_climbing_out_of_the_folder_is_refused(tmp_path: Path, no_tools: None) -> None:
    (tmp_path / "outside.vmdk").write_bytes(b"\0" * 4096)
    msg = refused(descriptor(tmp_path / "img", 'RW 8 FLAT "../outside.vmdk" 0'))
    assert f"VMDK extent '../outside.vmdk' lies outside the image's folder {tmp_path / 'img'}" in msg


def test_extent_symlink_pointing_out_is_refused(tmp_path: Path, no_tools: None) -> None:
    (tmp_path / "outside.vmdk").write_bytes(b"\0" * 4096)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "link-flat.vmdk").symlink_to("../outside.vmdk")
    msg = refused(descriptor(tmp_path / "img", 'RW 8 FLAT "link-flat.vmdk" 0'))
    assert "VMDK extent 'link-flat.vmdk' lies outside the image's folder" in msg


def test_extent_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "alias-flat.vmdk").symlink_to("disk-flat.vmdk")
    facts = insp.disk_facts(descriptor(tmp_path / "img", 'RW 8 FLAT "alias-flat.vmdk" 0'), "ok")
    assert facts["extents"][0]["path"] == str((tmp_path / "img" / "disk-flat.vmdk").resolve())


@pytest.mark.parametrize("line", [
    'RW +1 FLAT "/etc/hostname" 0',  # qemu's sscanf takes "+1" as a number
    'RW 1 VMFSSPARSE"/etc/hostname"',  # ... and needs no space before the name
    'rw 1 flat /etc/hostname',
])
def test_extent_lines_qemu_would_read_differently_are_refused(tmp_path: Path, no_tools: None,
                                                              line: str) -> None:
    msg = refused(descriptor(tmp_path / "img", 'RW 8 FLAT "disk-flat.vmdk" 0', line))
    assert f"VMDK extent line {line!r} not understood; refused" in msg


def test_extent_name_longer_than_qemu_reads_is_refused(tmp_path: Path, no_tools: None) -> None:
    long = "d" * 600 + "-flat.vmdk"
    msg = refused(descriptor(tmp_path / "img", f'RW 8 FLAT "{long}" 0'))
    assert "lies outside the image's folder" in msg


@pytest.mark.parametrize("create_type", ["fullDevice", "partitionedDevice", "custom"])
def test_unknown_create_type_is_refused(tmp_path: Path, no_tools: None, create_type: str) -> None:
    msg = refused(descriptor(tmp_path / "img", 'RW 8 FLAT "/dev/sda" 0', create_type=create_type))
    assert f"VMDK createType '{create_type}' refused; expected one of monolithicFlat, monolithicSparse" in msg


def test_delta_disk_is_refused(tmp_path: Path, no_tools: None) -> None:
    vmdk = descriptor(tmp_path / "img", create_type="vmfsSparse", extra='parentFileNameHint="base.vmdk"')
    assert "VMDK has a parent (delta disk); merge it into a standalone disk first" in refused(vmdk)


def test_descriptor_without_extents_is_refused(tmp_path: Path, no_tools: None) -> None:
    vmdk = descriptor(tmp_path / "img", "# none")
    assert "VMDK descriptor lists no extents" in refused(vmdk)


def test_not_a_vmdk_at_all(tmp_path: Path, no_tools: None) -> None:
    fake = tmp_path / "photo.vmdk"
    fake.write_bytes(b"\xff\xd8\xff\xe0 JFIF" + b"\0" * 1000)
    assert "not a VMDK (no descriptor with createType found)" in refused(fake)


# ---------------------------------------------------------------------------------------------
# damaged images and images that depend on other files (qemu-img, no appliance)


@pytest.fixture
def no_guestfs(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("a damaged image must be refused before any appliance launch")

    monkeypatch.setattr(insp, "inspect_session", forbidden)


def cut(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(size)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
def test_truncated_sparse_vmdk(subformat: str, xp_vmdk: Callable[[str], Path], tmp_path: Path,
                               no_guestfs: None) -> None:
    vmdk = private_copy(xp_vmdk(subformat), tmp_path)
    cut(vmdk, vmdk.stat().st_size // 2)
    msg = refused(vmdk)
    # refused from its own tables before any tool (docs/safety.md), or by qemu-img check
    assert "past the end of the file" in msg or (
        "qemu-img check found the image damaged or unreadable" in msg and "points after EOF" in msg), msg


def test_truncated_flat_extent(xp_vmdk: Callable[[str], Path], tmp_path: Path, no_guestfs: None) -> None:
    vmdk = private_copy(xp_vmdk("monolithicFlat"), tmp_path)
    cut(tmp_path / "xp-flat.vmdk", 1024 * 1024)
    msg = refused(vmdk)
    assert f"VMDK extent 'xp-flat.vmdk' is truncated: 1048576 bytes, descriptor says {64 << 20}" in msg


def test_missing_extent_file(xp_vmdk: Callable[[str], Path], tmp_path: Path, no_guestfs: None) -> None:
    vmdk = private_copy(xp_vmdk("twoGbMaxExtentSparse"), tmp_path)
    (tmp_path / "xp-s001.vmdk").unlink()
    msg = refused(vmdk)
    assert "qemu-img cannot read the image" in msg and "xp-s001.vmdk': No such file or directory" in msg


def test_truncated_raw(xp_raw: Path, tmp_path: Path, no_guestfs: None) -> None:
    raw = tmp_path / "xp.raw"
    with open(xp_raw, "rb") as src, open(raw, "wb") as dst:
        dst.write(src.read(1024 * 1024 + 100))
    assert "raw image size 1048676 is not a multiple of 512; truncated?" in refused(raw)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_qcow2_with_backing_file_is_refused(tmp_path: Path, no_guestfs: None) -> None:
    base, top = tmp_path / "base.raw", tmp_path / "top.qcow2"
    base.write_bytes(b"\0" * 65536)
    qemu_img("create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(top))
    msg = refused(top)
    assert f"image has a backing file '{base}'; refused (commit it into a standalone image first)" in msg


def test_qcow2_with_external_data_file_is_refused(tmp_path: Path, no_guestfs: None) -> None:
    data, top = tmp_path / "data.raw", tmp_path / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data}", str(top), "1M")
    assert f"qcow2 has an external data file '{data}'; refused" in refused(top)


def test_unsupported_suffix(tmp_path: Path, no_tools: None) -> None:
    iso = tmp_path / "disk.iso"
    iso.write_bytes(b"")
    with pytest.raises(InputError, match="unsupported source type; expected one of .vmdk, .qcow2"):
        insp.inspect_image(insp.InspectInput(iso, "x", force_tcg=True))

