"""Fixtures of the server's tests."""

from __future__ import annotations

import pytest

from support.fakes import HookedModel


@pytest.fixture
def model():
    """A HookedModel whose pauses are all released at the end, so a failing test cannot hang the server."""
    hooked = HookedModel()
    yield hooked
    for pause in (hooked.at_prefill, hooked.at_advance, hooked.at_validation):
        pause.go.set()
