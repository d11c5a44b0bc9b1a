"""The adopted disk's verify (issue 23): only the overlay's own clusters are compared (never a merged
range: see COMPARE_GAP), and a cluster that did not land is still caught."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pipeline.core.errors import ToolError
from pipeline.tools import qemu_img

MIB = 1 << 20


def _disk_and_overlay(tmp: Path) -> tuple[Path, Path]:
    base = tmp / "ghost.raw"
    with open(base, "wb") as f:
        f.truncate(256 * MIB)
        for k in range(0, 256, 8):  # data all over the disk: a full compare would read 32 MiB of it
            f.seek(k * MIB)
            f.write(os.urandom(MIB))
    ov = tmp / "overlay.qcow2"
    qemu_img.create_overlay(ov, base, "raw", image_id="v", step="test")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x41 1M 128k", "-c", "write -P 0x42 3M 4k",
                    "-c", "write -P 0x43 200M 64k", str(ov)], check=True, capture_output=True)
    return base, ov


def test_own_ranges_are_the_overlay_clusters_merged(tmp_path: Path) -> None:
    _base, ov = _disk_and_overlay(tmp_path)
    assert qemu_img.own_ranges(ov, image_id="v", step="test", gap=0) == [
        (1 * MIB, 128 << 10), (3 * MIB, 64 << 10), (200 * MIB, 64 << 10)]
    assert qemu_img.own_ranges(ov, image_id="v", step="test", gap=4 * MIB) == [
        (1 * MIB, 2 * MIB + (64 << 10)), (200 * MIB, 64 << 10)]


def test_overlay_zero_clusters_between_disk_data_verify(tmp_path: Path) -> None:
    """An overlay holding zero clusters and data near disk data it does not cover (what registry-merge
    leaves on an adopted NTFS disk): the committed disk verifies, and only the overlay's clusters are read."""
    base = tmp_path / "ghost.raw"
    with open(base, "wb") as f:
        f.truncate(64 * MIB)
        f.seek(48 * MIB)
        f.write(b"\x11" * (4 * MIB))  # the disk's own data, between two overlay clusters
    ov = tmp_path / "overlay.qcow2"
    qemu_img.create_overlay(ov, base, "raw", image_id="v", step="test")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 34M 64k", "-c", "write -z 50M 64k",
                    "-c", "discard 49M 64k", str(ov)], check=True, capture_output=True)
    qemu_img.commit_onto(ov, base, "raw", image_id="v", step="test")
    assert qemu_img.compare_onto(ov, base, "raw", image_id="v", step="test") == 3 * (64 << 10)
    with open(base, "rb") as f:
        f.seek(48 * MIB)
        assert f.read(MIB) == b"\x11" * MIB and f.seek(50 * MIB) and f.read(64 << 10) == bytes(64 << 10)


def test_committed_overlay_verifies_reading_only_its_clusters(tmp_path: Path) -> None:
    base, ov = _disk_and_overlay(tmp_path)
    qemu_img.commit_onto(ov, base, "raw", image_id="v", step="test")
    compared = qemu_img.compare_onto(ov, base, "raw", image_id="v", step="test")
    assert compared == (128 << 10) + (64 << 10) + (64 << 10)  # the overlay's clusters, not the disk's 32 MiB
    with open(base, "rb") as f:
        f.seek(200 * MIB)
        assert f.read(4) == b"CCCC"


def test_a_cluster_that_did_not_land_fails_verify(tmp_path: Path) -> None:
    base, ov = _disk_and_overlay(tmp_path)
    qemu_img.commit_onto(ov, base, "raw", image_id="v", step="test")
    with open(base, "r+b") as f:  # one committed byte lost
        f.seek(200 * MIB + 1000)
        f.write(b"\0")
    with pytest.raises(ToolError) as ei:
        qemu_img.compare_onto(ov, base, "raw", image_id="v", step="test")
    msg = ei.value.message
    assert msg.startswith("verification failed:") and str(base) in msg and f"offset {200 * MIB}" in msg, msg
