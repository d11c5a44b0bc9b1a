"""pytest fixtures: fake Windows disks, built once per machine and cached under ``var/testdisks/``.

Each raw disk costs one libguestfs appliance launch (≈ 30 s under TCG) the first time; afterwards the
cached file is reused as long as its ``.spec.json`` stamp matches the spec (``fakedisk.build`` checks).
VMDK copies are converted from the cached XP raw with qemu-img (no appliance launch), each subformat in
its own folder because a VMDK's extent files are named after it.

The cached files are shared by every test session on this machine: never modify them. A test that
needs to change a disk copies it to ``tmp_path`` first (:func:`private_copy`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.app import fakedisk
from pipeline.app.fakedisk import VMDK_SUBFORMATS, W2003, WIN7, WIN7_UEFI, WIN10, XP, DiskSpec

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "var" / "testdisks"
LINUX = DiskSpec(windows=False, hostname="", size_mib=32)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialise builds of one cached disk between concurrent test sessions."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_disk(name: str, spec: DiskSpec, raw_cache: Path | None = None) -> Path:
    """The fake disk ``spec`` cached as ``var/testdisks/<name>`` (built once, under a lock; read-only)."""
    out = CACHE / name
    with _locked(out.parent.name + "-" + out.name):
        return fakedisk.build(out, spec, force_tcg=True, raw_cache=raw_cache)


def vmdk_files(vmdk: Path) -> list[Path]:
    """The descriptor/sparse file and every extent file that belongs to it."""
    return [vmdk, *sorted(vmdk.parent.glob(vmdk.stem + "-*.vmdk"))]


def private_copy(vmdk_or_raw: Path, dest_dir: Path) -> Path:
    """Copy a cached disk (with its VMDK extents) into ``dest_dir``; return the copy's main file."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    files = vmdk_files(vmdk_or_raw) if vmdk_or_raw.suffix == ".vmdk" else [vmdk_or_raw]
    for f in files:
        shutil.copyfile(f, dest_dir / f.name)
    return dest_dir / vmdk_or_raw.name


@pytest.fixture(scope="session")
def force_tcg_env() -> None:
    assert os.environ.get("GHO2KVM_FORCE_TCG") == "1", "tests/conftest.py sets GHO2KVM_FORCE_TCG=1"


@pytest.fixture(scope="session")
def xp_raw(force_tcg_env: None) -> Path:
    """Windows XP, MBR, one NTFS partition, ControlSet001, hostname XPDEMO."""
    return build_disk("xp.raw", XP)


@pytest.fixture(scope="session")
def win7_uefi_raw(force_tcg_env: None) -> Path:
    """Windows 7 x86_64, GPT with an EFI system partition, current control set 2."""
    return build_disk("win7-uefi.raw", WIN7_UEFI)


@pytest.fixture(scope="session")
def w2003_raw(force_tcg_env: None) -> Path:
    """Windows Server 2003 (NT 5.2, x86), MBR, ControlSet001."""
    return build_disk("w2003.raw", W2003)


@pytest.fixture(scope="session")
def win7_raw(force_tcg_env: None) -> Path:
    """Windows 7 x86_64, MBR (BIOS), current control set 2, msahci off (Start=3)."""
    return build_disk("win7.raw", WIN7)


@pytest.fixture(scope="session")
def win10_raw(force_tcg_env: None) -> Path:
    """Windows 10 x86_64 (CurrentMajorVersionNumber 10), MBR, storahci off with a StartOverride."""
    return build_disk("win10.raw", WIN10)


@pytest.fixture(scope="session")
def linux_raw(force_tcg_env: None) -> Path:
    """A disk with a partition and a file system but no operating system."""
    return build_disk("nonwindows.raw", LINUX)


@pytest.fixture(scope="session")
def xp_vmdk(xp_raw: Path) -> Callable[[str], Path]:
    """Factory: ``xp_vmdk("monolithicFlat")`` → cached VMDK of the XP disk in that subformat."""
    made: dict[str, Path] = {}

    def make(subformat: str) -> Path:
        if subformat not in VMDK_SUBFORMATS:
            raise ValueError(f"unknown subformat {subformat!r}; one of {VMDK_SUBFORMATS}")
        if subformat not in made:
            made[subformat] = build_disk(f"vmdk-{subformat}/xp.vmdk", replace(XP, output=subformat),
                                     raw_cache=xp_raw)
        return made[subformat]

    return make
