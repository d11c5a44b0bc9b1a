"""The disk signature the guest expects (issue 10 item 2): read by inspect, fixed in the overlay.

One phony XP disk whose ``MountedDevices`` names another disk signature (built once, cached); one
inspect launch; one registry-merge launch as a native GHO rebuild (fixed in the overlay, read back
from it). Other sources (VMDK, Ghost's own executable, raw) only get a warning, with no disk access.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pipeline.app.fakedisk import XP
from pipeline.core.config import ImageConfig, load_config
from pipeline.guest import disksig
from pipeline.steps.inspect import InspectInput, inspect_image
from pipeline.steps.registry_merge import MergeInput, registry_merge
from tests.support.fx_disks import build_disk, private_copy
from tests.support.fx_pipeline import make_config

pytestmark = [pytest.mark.guestfs, pytest.mark.usefixtures("force_tcg_env")]
EXPECTED = 0x0BADC0DE  # what the guest's registry says; the disk itself carries parted's signature


def test_mounted_device_forms() -> None:
    sig, off, note = disksig.parse_mounted_device(bytes.fromhex("dec0ad0b") + (32256).to_bytes(8, "little"))
    assert (sig, off, note) == (EXPECTED, 32256, None)
    gpt = disksig.parse_mounted_device(b"DMIO:ID:" + bytes(16))
    assert gpt[:2] == (None, None) and "GPT" in (gpt[2] or "")
    other = disksig.parse_mounted_device("\\??\\Volume{x}".encode("utf-16-le"))
    assert other[:2] == (None, None) and "not the 12-byte MBR form" in (other[2] or "")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _first_sector(disk: Path, fmt: str, tmp: Path) -> bytes:
    out = tmp / "first.raw"
    subprocess.run(["qemu-img", "dd", "-f", fmt, "-O", "raw", "bs=512", "count=1", f"if={disk}", f"of={out}"],
                   check=True, capture_output=True, timeout=120)
    return out.read_bytes()[:512]


def _image(tmp: Path, source: str, image_id: str) -> ImageConfig:
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = make_config(tmp, [{"id": image_id, "source": tmp / source}])
    return load_config(cfg, check_sources=False).image(image_id)


@pytest.fixture(scope="module")
def phony(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cached = build_disk("xp-mounted-c.raw", replace(XP, mounted_c_signature=EXPECTED))
    tmp = tmp_path_factory.mktemp("disksig")
    raw = private_copy(cached, tmp / "src")
    facts = inspect_image(InspectInput(raw, "sig", force_tcg=True))
    return {"raw": raw, "sha": _sha(raw), "facts": facts, "tmp": tmp}


def test_inspect_reads_both_signatures(phony: dict[str, Any]) -> None:
    ds = phony["facts"].disk_signature
    mbr = int.from_bytes(phony["raw"].read_bytes()[440:444], "little")
    assert ds["mbr"] == f"0x{mbr:08x}" and ds["registry"] == "0x0badc0de" and ds["matches"] is False
    assert ds["registry_partition"] == 1 and ds["registry_offset"] > 0 and ds["note"] is None


def test_native_rebuild_gets_the_expected_signature_in_the_overlay(phony: dict[str, Any]) -> None:
    tmp = phony["tmp"] / "native"
    image = _image(tmp, "XP.GHO", "native")
    assert image.ghost.backend == "native"
    res = registry_merge(MergeInput.from_config(image, phony["facts"], phony["raw"], "raw", force_tcg=True))
    sig = res.disk_signature
    assert sig is not None
    assert sig["action"] == "fixed" and sig["verified"] is True and sig["registry"] == "0x0badc0de"
    # the one other note: the XP boot sector's geometry made the BIOS's (pipeline.guest.ntfsgeom)
    assert sig["warnings"] == [] and [w for w in res.warnings if "heads/" not in w] == []
    assert sig["mbr"] == phony["facts"].disk_signature["mbr"]
    assert res.overlay is not None
    first = _first_sector(res.overlay, "qcow2", tmp)
    src = phony["raw"].read_bytes()[:512]
    assert int.from_bytes(first[440:444], "little") == EXPECTED
    assert first[:440] + first[444:] == src[:440] + src[444:]  # nothing else changed
    assert _sha(phony["raw"]) == phony["sha"]  # the source is untouched


class _NoAppliance:
    """Stands in for the merge session: a VMDK's mismatch must not touch the disk at all."""

    def __call__(self, *args: str) -> str:
        raise AssertionError(f"guestfish {args} called for a warning-only mismatch")

    lines = __call__


@pytest.mark.parametrize(("source", "backend"), [("xp.vmdk", "native"), ("XP.GHO", "exe"),
                                                 ("xp.raw", "native")])
def test_other_sources_mismatch_is_only_a_warning(phony: dict[str, Any], source: str, backend: str) -> None:
    tmp = phony["tmp"] / f"warn-{source}-{backend}"
    image = _image(tmp, source, "vm")
    image = replace(image, ghost=replace(image.ghost, backend=backend))
    g: Any = _NoAppliance()
    sig = disksig.reconcile(g, phony["facts"], image_id=image.id,
                            rebuilt_natively=disksig.rebuilt_natively(image), step="registry-merge")
    assert sig["action"] == "warning" and sig["verified"] is None
    [w] = sig["warnings"]
    assert "0x0badc0de" in w and "MountedDevices" in w and sig["mbr"] in w
    assert sig["mbr"] == phony["facts"].disk_signature["mbr"]


def test_matching_or_unknown_signature_needs_nothing(phony: dict[str, Any]) -> None:
    image = _image(phony["tmp"] / "same", "XP.GHO", "same")
    g: Any = _NoAppliance()
    for ds in ({**phony["facts"].disk_signature, "matches": True}, {"mbr": "0x1", "registry": None}, None):
        facts = dataclasses.replace(phony["facts"], disk_signature=ds)
        got = disksig.reconcile(g, facts, image_id=image.id, rebuilt_natively=disksig.rebuilt_natively(image),
                                step="registry-merge")
        assert got["action"] == "none" and got["warnings"] == []


def test_offset_without_a_partition_is_warned(phony: dict[str, Any]) -> None:
    image = _image(phony["tmp"] / "off", "xp.vmdk", "off")
    ds = {**phony["facts"].disk_signature, "matches": True, "registry_partition": None,
          "note": "\\DosDevices\\C: names byte offset 512, where no partition starts"}
    g: Any = _NoAppliance()
    got = disksig.reconcile(g, dataclasses.replace(phony["facts"], disk_signature=ds), image_id=image.id,
                            rebuilt_natively=disksig.rebuilt_natively(image), step="registry-merge")
    assert got["action"] == "none" and "offset 512" in got["warnings"][0]
