"""Hypothesis defaults for this suite, loaded before any test module.

No per-example deadline: the machine is shared and noisy, and a deadline
there measures the neighbours, not the code (speed lives in loadtest/).
print_blob: a failure prints the blob that replays it exactly
(@reproduce_failure), whatever seed the run had. HYPOTHESIS_PROFILE picks
another registered profile (e.g. "thorough" for a longer search)."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("fuelcard", deadline=None, print_blob=True)
settings.register_profile("thorough", parent=settings.get_profile("fuelcard"),
                          max_examples=1_000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fuelcard"))
