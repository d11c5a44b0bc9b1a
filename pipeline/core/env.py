"""The one reading of gho2kvm's environment switches (kept here so every caller parses them alike)."""

from __future__ import annotations

import os

FORCE_TCG_ENV = "GHO2KVM_FORCE_TCG"
_TRUE = ("1", "true", "yes", "on")


def force_tcg_from_env() -> bool:
    """``GHO2KVM_FORCE_TCG`` is set to a true value (1/true/yes/on)."""
    return os.environ.get(FORCE_TCG_ENV, "").strip().lower() in _TRUE
