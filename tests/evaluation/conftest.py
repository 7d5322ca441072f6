"""What the evaluation's tests share."""

import pytest

from costeer import CoSteer


@pytest.fixture(scope="session")
def tiny_costeer(tiny_hf_pair):
    """A CoSteer on the tiny Hugging Face pair: real forward passes in milliseconds."""
    cs = CoSteer(*tiny_hf_pair, quiet=True)
    yield cs
    cs.close()
