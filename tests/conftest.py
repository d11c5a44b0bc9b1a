"""Test-suite setup: libguestfs under TCG (no KVM here) and the shared fixture modules."""

from __future__ import annotations

import os
from pathlib import Path

# libguestfs only works on this machine with LIBGUESTFS_BACKEND=direct + force_tcg; the pipeline
# turns that on when GHO2KVM_FORCE_TCG=1. Set before any test module imports the pipeline.
os.environ["GHO2KVM_FORCE_TCG"] = "1"

pytest_plugins = [m for m in ("fx_disks", "fx_libvirtd") if (Path(__file__).parent / f"{m}.py").exists()]

# The fast tier (`make test-fast`): everything that needs no libguestfs appliance and no libvirtd.
# A test is "slow" when it is marked guestfs/libvirtd or uses a fixture that launches an appliance
# (every such fixture depends on force_tcg_env) or starts a daemon.
SLOW_FIXTURES = {"force_tcg_env", "libvirtd_system"}


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    import pytest

    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SLOW_FIXTURES or item.get_closest_marker("guestfs") or item.get_closest_marker("libvirtd"):
            item.add_marker(pytest.mark.slow)
