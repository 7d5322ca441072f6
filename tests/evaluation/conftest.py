"""What the evaluation's tests share."""

import pytest

from costeer import CoSteer
from support.tiny_hf import make_model_pair


@pytest.fixture(scope="session")
def tiny_costeer(tmp_path_factory):
    """A CoSteer on the tiny Hugging Face pair: real forward passes in milliseconds (built once)."""
    cs = CoSteer(*make_model_pair(tmp_path_factory.mktemp("eval-hf")), quiet=True)
    yield cs
    cs.close()
