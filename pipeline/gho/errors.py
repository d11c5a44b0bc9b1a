"""The one error type of the GHO reader."""

from __future__ import annotations

from pipeline.errors import InputError


class GhoError(InputError):
    """A GHO image cannot be read: the one-line message names the file and what was expected."""
