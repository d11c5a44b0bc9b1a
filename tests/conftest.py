"""Test-suite setup: libguestfs under TCG (no KVM here) and the shared fixture modules."""

from __future__ import annotations

import os
from pathlib import Path

# libguestfs only works on this machine with LIBGUESTFS_BACKEND=direct + force_tcg; the pipeline
# turns that on when GHO2KVM_FORCE_TCG=1. Set before any test module imports the pipeline.
os.environ["GHO2KVM_FORCE_TCG"] = "1"

pytest_plugins = [m for m in ("fx_disks", "fx_libvirtd") if (Path(__file__).parent / f"{m}.py").exists()]
