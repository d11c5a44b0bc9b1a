"""The seeded fuzz run of ``make test``: a few hundred mutated fixtures through ``gho info``/``extract``.

``make fuzz`` runs the same generator with thousands of cases (``GHO_FUZZ_CASES``).
"""

from __future__ import annotations

import os

from fuzz_gho import CLASSES, run

CASES = int(os.environ.get("GHO_FUZZ_TEST_CASES", "216"))


def test_fuzz_gho_every_case_is_clean() -> None:
    per_class, fails, notes = run(seed=2026, n=CASES)
    assert sum(per_class.values()) == CASES and set(per_class) == set(CLASSES)
    assert not fails, "\n".join(notes[:20])
