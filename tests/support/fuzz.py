"""How hard the random tests push. The suite runs a sample of every fuzz run and property
test, sized so that the model-free suite stays fast on 2 cores; COSTEER_FUZZ_FULL=1 runs
each at its full strength (conftest loads hypothesis's profile to match)."""

from __future__ import annotations

import os

FUZZ_FULL = os.environ.get("COSTEER_FUZZ_FULL") == "1"


def examples(suite: int, full: int) -> int:
    """Random cases for a fuzz or property test: `suite` in the suite, `full` with COSTEER_FUZZ_FULL=1."""
    return full if FUZZ_FULL else suite
