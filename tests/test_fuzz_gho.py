"""Seeded fuzzing of the GHO reader: mutated fixtures through ``gho info``/``extract``.

The fast tier runs a small fixed-seed sample (every mutation class on every fixture); the long run
(``make test``, marked ``fuzz``) a few hundred cases, and ``make fuzz`` thousands (``GHO_FUZZ_CASES``).
"""

from __future__ import annotations

import os

import pytest

from tests.support.fuzz_gho import CLASSES, FIXTURE_NAMES, run

SEED = 2026
CASES = int(os.environ.get("GHO_FUZZ_TEST_CASES", "216"))
SAMPLE = len(CLASSES) * len(FIXTURE_NAMES)  # every mutation class on every fixture, once


def check(n: int) -> None:
    per_class, fails, notes = run(seed=SEED, n=n)
    assert sum(per_class.values()) == n and set(per_class) == set(CLASSES)
    assert not fails, "\n".join(notes[:20])


def test_fuzz_gho_sample_is_clean() -> None:
    check(SAMPLE)


@pytest.mark.fuzz
def test_fuzz_gho_every_case_is_clean() -> None:
    check(CASES)
