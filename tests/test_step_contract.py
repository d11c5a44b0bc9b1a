"""The typed step contract: fingerprints derived from the step input, typed receipts that round-trip,
and every config field marking exactly the steps that use it as stale (no appliance, no libvirtd)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pipeline.core import receipts
from pipeline.core.config import ImageConfig
from pipeline.core.receipts import HASHED, NAMED, RUNTIME, UPSTREAM, Receipt
from pipeline.model.inspect import InspectFacts, VmdkExtent
from pipeline.model.results import ConvertResult, Defined, DomainXml, GhostConvertResult, MergeResult
from pipeline.steps.convert import ConvertInput
from pipeline.tasks import Convert, chain
from tests.support.fx_pipeline import make_config
from tests.support.fx_receipts import XP_FACTS, write_chain

STEPS = ("inspect", "registry-merge", "convert", "xml-render", "define")


# ------------------------------------------------------------------------------ fingerprint_of

@dataclass(frozen=True)
class Inner:
    n: int
    out: Path = field(metadata=NAMED)


@dataclass(frozen=True)
class Sample:
    disk: Path
    reg: tuple[Path, ...] = field(default=(), metadata=HASHED)
    inner: Inner = field(default_factory=lambda: Inner(1, Path("/out/x")))
    upstream: str = field(default="u", metadata=UPSTREAM)
    tcg: bool = field(default=False, metadata=RUNTIME)


def test_fingerprint_of_stamps_hashes_and_skips(tmp_path: Path) -> None:
    disk, reg = tmp_path / "d.raw", tmp_path / "a.reg"
    disk.write_bytes(b"\0" * 1024)
    reg.write_text("Windows Registry Editor Version 5.00\n")
    fp = receipts.fingerprint_of(Sample(disk, (reg,)))
    assert fp["disk"] == receipts.file_stamp(disk)  # size + mtime, no content read
    assert fp["reg"] == [receipts.content_hash(reg)]
    assert fp["inner"] == {"n": 1, "out": "/out/x"}
    assert "upstream" not in fp and "tcg" not in fp
    reg.write_text("Windows Registry Editor Version 5.00\n; changed\n")
    assert receipts.fingerprint_of(Sample(disk, (reg,)))["reg"] != fp["reg"]


def test_a_field_added_to_an_input_is_in_the_fingerprint() -> None:
    base = ConvertInput(image_id="a", final_disk=Path("/o/a.raw"))
    grown_type = dataclasses.make_dataclass("Grown", [("compress", bool, field(default=True))],
                                            bases=(ConvertInput,), frozen=True)
    grown = grown_type(image_id="a", final_disk=Path("/o/a.raw"))
    old, new = receipts.fingerprint_of(base), receipts.fingerprint_of(grown)
    assert new == {**old, "compress": True}
    why = receipts.why_stale({"fingerprint": old, "outputs": {}}, new)
    assert why == "input changed: compress null → true"


def test_a_field_added_to_an_input_marks_the_step_stale(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path)
    write_chain(cfg, "a")
    conv = Convert(config_path=str(cfg), image_id="a")
    assert conv.stale_reason() is None
    grown_type = dataclasses.make_dataclass("Grown", [("compress", bool, field(default=True))],
                                            bases=(ConvertInput,), frozen=True)
    real = Convert.step_input
    monkeypatch.setattr(Convert, "step_input",
                        lambda self: grown_type(**dataclasses.asdict(real(self))))
    assert conv.stale_reason() == "input changed: compress null → true"


# ------------------------------------------------------------------------------ config → stale steps

def _config(tmp: Path, file: str = "config.yaml", **fields_: Any) -> Path:
    src = tmp / "src" / "a.raw"
    if not src.exists():
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_bytes(b"\0" * 4096)
    return make_config(tmp, [{"id": "a", "source": src, **fields_}], name=file)


def _gho(tmp: Path) -> Path:
    """A stand-in ``.gho`` source (never read: receipts are written by ``write_chain``)."""
    gho = tmp / "src" / "XP.GHO"
    gho.parent.mkdir()
    gho.write_bytes(b"\xfe\xef" + b"\0" * 510)
    return gho


def _stale_steps(cfg: Path) -> tuple[str, ...]:
    """The steps whose own inputs changed (upstream aside)."""
    return tuple(t.step for t in chain(str(cfg), "a")
                 if receipts.why_stale(t.receipt(), t.fingerprint()) is not None)


#: config field → (a changed value, the steps whose own fingerprint it is part of)
CHANGES: dict[str, tuple[Any, tuple[str, ...]]] = {
    "source": ("other.raw", ("inspect",)),
    "output_dir": ("elsewhere", ("convert", "xml-render")),
    "format": ("qcow2", ("convert", "xml-render")),
    "libvirt_uri": ("test:///other", ("xml-render", "define")),
    "memory_mib": (1024, ("xml-render",)),
    "vcpus": (2, ("xml-render",)),
    "disk_bus": ("sata", ("xml-render",)),  # registry-merge only refuses early with it
    "nic_model": ("e1000", ("xml-render",)),
    "network": ("bridge:br0", ("xml-render",)),
    "disk_cache": ("directsync", ("xml-render",)),
    "disk_io": ("threads", ("xml-render",)),
    "cdrom": (True, ("xml-render",)),
    "virtio": ({"drivers": "virtio-win"}, ("registry-merge", "xml-render")),
    "registry": (["mergeide", "extra.reg"], ("registry-merge",)),
    "registry_remap_controlset": (True, ("registry-merge",)),
    "keep_autoreboot": (True, ("registry-merge",)),
    "keep_cpu_drivers": (True, ("registry-merge",)),
    "keep_boot_geometry": (True, ("registry-merge",)),
    "vmware_tools": ("disable", ("registry-merge",)),
    "network_restore": ("static", ("registry-merge",)),
    "uefi_loader": ("/usr/share/OVMF/OVMF_CODE_4M.fd", ("xml-render",)),
    "secure_boot": (True, ("xml-render",)),
    "verify": (False, ("convert",)),
    "name": ("other-name", ("xml-render", "define")),
    "title": ("A title", ("xml-render",)),
    "description": ("Words", ("xml-render",)),
    "uuid": ("5e0c6d1a-6c1b-4c53-9b7a-2a3f1c1d0e01", ("xml-render",)),
    "mac": ("52:54:00:12:34:56", ("xml-render",)),
    "autostart": (True, ("define",)),
    "boot_check": (30, ("define",)),
    "start": (True, ("define",)),
    "ghost": ({"vmdk_type": "flat"}, ()),  # a disk image source: no ghost-convert
    "overwrite": (True, ()),  # only whether an existing final disk may be replaced
    "expect_os": ("any", ()),  # only whether a disk without Windows is refused
    "vm_disk_dirs": (["/srv/datastore"], ()),  # .vmx sources only: where their disks may lie
}
#: not in the table: the image's identity and the folder its receipts live in
IDENTITY = {"id", "workdir"}


def test_the_table_covers_every_config_field() -> None:
    keys = {f.name for f in dataclasses.fields(ImageConfig) if not f.metadata.get("internal")}
    assert keys - IDENTITY == set(CHANGES)


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_a_config_field_marks_exactly_the_steps_that_use_it(tmp_path: Path, name: str) -> None:
    value, expected = CHANGES[name]
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "other.raw").write_bytes(b"\0" * 8192)
    (tmp_path / "src" / "extra.reg").write_text("Windows Registry Editor Version 5.00\r\n", encoding="utf-8")
    (tmp_path / "src" / "virtio-win").mkdir()
    write_chain(_config(tmp_path), "a")
    assert _stale_steps(_config(tmp_path, "same.yaml")) == ()
    if name in ("source", "registry", "virtio"):  # paths relative to the source's folder
        src = tmp_path / "src"
        value = ([str(src / v) if v != "mergeide" else v for v in value] if isinstance(value, list)
                 else {"drivers": str(src / value["drivers"])} if isinstance(value, dict)
                 else str(src / value))
    if name == "output_dir":
        value = str(tmp_path / value)
    changed = _config(tmp_path, "changed.yaml", **{name: value})
    assert _stale_steps(changed) == expected
    tasks = chain(str(changed), "a")
    if expected:  # everything before the first is up to date, everything from it on runs
        first = [t.step for t in tasks].index(expected[0])
        assert all(t.stale_reason() is None for t in tasks[:first])
        assert all(t.stale_reason() is not None for t in tasks[first:])
    else:
        assert all(t.stale_reason() is None for t in tasks)


@pytest.mark.parametrize(("ghost", "expected"), [
    ({"vmdk_type": "flat"}, ("ghost-convert",)),
    ({"password_env": "GHO_PW"}, ("ghost-convert",)),
    ({"backend": "exe", "command": ["ghost32.exe"]}, ("ghost-convert", "registry-merge")),  # disk signature
    ({"timeout_s": 60}, ()),  # how long Ghost may take changes nothing it makes
    ({"decode_threads": 1}, ()),  # nor how many threads decode: the disk is the same
    ({"vmdk_type": "auto"}, ()),  # the default
])
def test_ghost_fields_mark_ghost_convert(tmp_path: Path, ghost: dict[str, Any],
                                         expected: tuple[str, ...]) -> None:
    gho = _gho(tmp_path)
    write_chain(make_config(tmp_path, [{"id": "a", "source": gho}]), "a")
    changed = make_config(tmp_path, [{"id": "a", "source": gho, "ghost": ghost}], name="changed.yaml")
    assert _stale_steps(changed) == expected


@pytest.mark.parametrize(("ghost", "expected"), [
    ({"backend": "native"}, ("ghost-convert", "convert", "xml-render")),  # it writes the final format
    # vmdk_type auto: Ghost writes a flat VMDK for raw (its extent is adopted), a sparse one for qcow2
    ({"backend": "exe", "command": ["ghost32.exe"]}, ("ghost-convert", "convert", "xml-render")),
    ({"backend": "exe", "command": ["ghost32.exe"], "vmdk_type": "sparse"}, ("convert", "xml-render")),
    ({"backend": "exe", "command": ["ghost32.exe"], "vmdk_split_mb": 2000}, ("convert", "xml-render")),
])
def test_format_of_a_gho_marks_ghost_convert_when_the_native_reader_writes_it(
        tmp_path: Path, ghost: dict[str, Any], expected: tuple[str, ...]) -> None:
    gho = _gho(tmp_path)
    write_chain(make_config(tmp_path, [{"id": "a", "source": gho, "ghost": ghost}]), "a")
    changed = make_config(tmp_path, [{"id": "a", "source": gho, "ghost": ghost, "format": "qcow2"}],
                          name="changed.yaml")
    assert _stale_steps(changed) == expected


def test_an_upstream_rerun_marks_the_later_steps(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    tasks = write_chain(cfg, "a")
    merge = tasks[1]
    data = merge.receipt()
    assert data is not None
    receipts.write(merge.receipt_path, {**data, "run_id": receipts.new_run_id()})
    assert tasks[0].stale_reason() is None and merge.stale_reason() is None
    assert tasks[2].stale_reason() == "input changed: the previous step ran again (upstream_run_id)"
    assert all(t.stale_reason() is not None for t in tasks[2:])


def test_a_receipt_of_an_older_shape_is_stale(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    tasks = write_chain(cfg, "a")
    conv = tasks[2]
    data = conv.receipt()
    assert data is not None
    receipts.write(conv.receipt_path, {**data, "result": {"output": "/x"}})  # no input/format/verified
    assert conv.typed_receipt() is None
    assert conv.stale_reason() == "receipt of an older version (result unreadable)"


# ------------------------------------------------------------------------------ typed results

RESULTS = [
    XP_FACTS,
    dataclasses.replace(XP_FACTS, format="vmdk", create_type="monolithicFlat",
                        extents=(VmdkExtent("RW", 8, "FLAT", "x-flat.vmdk", "/s/x-flat.vmdk"),)),
    GhostConvertResult(disk=Path("/w/ghost.raw"), disk_format="raw", backend="native",
                       details={"partitions": [], "warnings": ["w"]}),
    MergeResult(skipped=False, overlay=Path("/w/overlay.qcow2"), warnings=("w",),
                hives={"SYSTEM": {"keys": 1}},
                virtio={"drivers": "/v", "installed": {"viostor": {"to": "x"}}}),
    ConvertResult(input=Path("/w/overlay.qcow2"), input_format="qcow2", output=Path("/o/a.raw"),
                  format="raw", verified=True, convert_seconds=1.5),
    DomainXml(domain_xml=Path("/w/domain.xml"), name="a", uri="test:///default", disk_bus="ide",
              nic_model="rtl8139", memory_mib=512),
    Defined(action="created", name="a", uuid="u", uri="test:///default", boot_check={"verdict": "desktop"}),
]


@pytest.mark.parametrize("result", RESULTS, ids=lambda r: type(r).__name__)
def test_results_round_trip_through_their_receipt(result: Any) -> None:
    r = Receipt(step="s", image_id="a", run_id="r", started="t0", finished="t1", duration_s=1.0,
                fingerprint={"k": 1}, outputs={}, bytes_read=3, bytes_written=4, result=result)
    data = r.to_dict()
    assert data["result"] == result.to_dict() and data["warnings"] == list(result.warnings)
    again = receipts.parse_receipt(data, type(result).from_dict)
    assert again == r


def test_merge_result_knows_the_installed_virtio_drivers() -> None:
    merged = RESULTS[3]
    assert isinstance(merged, MergeResult) and merged.installed_virtio == ("viostor",)
    assert MergeResult(skipped=True, overlay=None).installed_virtio == ()


def test_inspect_facts_read_an_old_receipt_result() -> None:
    """An inspect.json written before the typed facts still loads (same keys)."""
    old = {"image_id": "xp", "source": "/s/xp.raw", "format": "raw", "virtual_size": 67108864,
           "actual_size": 1048576, "backing_file": None, "check": None, "os": "windows",
           "appliance_seconds": 20.1, "partition_table": "msdos", "firmware": "bios", "os_type": "windows",
           "root": "/dev/sda1", "product_name": "Microsoft Windows XP", "major_version": 5,
           "minor_version": 1,
           "arch": "i386", "distro": "windows", "hostname": "XPDEMO", "systemroot": "/WINDOWS",
           "current_control_set": "ControlSet001", "drivers_present": {"atapi.sys": True},
           "disk_signature": {"mbr": "0x1"}, "services": {"atapi": 3}, "qemu_img_version": "7.2.0"}
    f = InspectFacts.from_dict(old)
    assert (f.major_version, f.minor_version, f.arch, f.control_set) == (5, 1, "i386", "ControlSet001")
    assert f.is_windows and f.to_dict() == {**InspectFacts().to_dict(), **old}
