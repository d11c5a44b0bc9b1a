"""The one error type of the GHO reader, its limits, and the advisory-warning collector."""

from __future__ import annotations

from pipeline.core.errors import InputError

#: hard caps (a clear refusal beyond them); they bound memory independently of the image size
MAX_SECTIONS = 64            # partition sections per image
MAX_ENTRIES = 1 << 17        # directory slots per image (131072): ~150 bytes of tree each
MAX_CATALOGUE_ENTRIES = MAX_ENTRIES
MAX_RECORDS = 1 << 26        # records per image (64 Mi: 2 TiB of 32 KiB data blocks)
MAX_TRACK0_BYTES = 8 << 20   # decoded sectors before the first partition
MAX_FILES_LISTED = 1000      # per-file rows kept in a result / receipt (the count is always given)
WARNINGS_SHOWN = 20          # warnings kept verbatim; the rest are counted


class GhoError(InputError):
    """A GHO image cannot be read: the one-line message names the file and what was expected."""


class Advisories:
    """Mismatches of checks the spec calls advisory (checksums, catalogue, header copies).

    Without ``strict`` they are collected (the first :data:`WARNINGS_SHOWN` verbatim, the rest counted);
    with ``strict`` the first one is a refusal.
    """

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict
        self.shown: list[str] = []
        self.total = 0

    def add(self, message: str) -> None:
        if self.strict:
            raise GhoError(f"{message} (an advisory check, refused in strict mode: --strict, ghost-convert)")
        self.total += 1
        if len(self.shown) < WARNINGS_SHOWN:
            self.shown.append(message)

    def summary(self) -> list[str]:
        more = self.total - len(self.shown)
        return [*self.shown, f"… and {more} more warnings"] if more > 0 else list(self.shown)
