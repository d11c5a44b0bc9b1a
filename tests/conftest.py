"""Test-suite setup: libguestfs under TCG (no KVM here), the shared fixtures, and the fast tier.

``make test-fast`` runs ``-m "not slow"``: everything that needs no libguestfs appliance and no
libvirtd, and of the seeded fuzz runs only their small fixed-seed sample (the long runs are marked
``fuzz``; ``make test`` and ``make fuzz`` run them).
"""

from __future__ import annotations

import os

import pytest

# libguestfs only works on this machine with LIBGUESTFS_BACKEND=direct + force_tcg; the pipeline
# turns that on when GHO2KVM_FORCE_TCG=1. Set before any test module imports the pipeline.
os.environ["GHO2KVM_FORCE_TCG"] = "1"

pytest_plugins = ["tests.support.fx_disks", "tests.support.fx_libvirtd"]

# A test is "slow" when it is marked guestfs/libvirtd/fuzz or uses a fixture that launches an
# appliance (every such fixture depends on force_tcg_env) or starts a daemon.
SLOW_FIXTURES = {"force_tcg_env", "libvirtd_system"}
SLOW_MARKERS = ("guestfs", "libvirtd", "fuzz")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SLOW_FIXTURES or any(item.get_closest_marker(m) for m in SLOW_MARKERS):
            item.add_marker(pytest.mark.slow)
