"""Which tests share an xdist worker (the suite runs on two: pyproject's addopts).

Tests that load torch in their own process (tiny Hugging Face models, the evaluation's
embedding model) share one worker, so that only it pays for importing torch and
transformers (about 10 s) and for building the models. tests/conftest.py puts the tests of
the real models on one worker too.
"""

import pytest

TORCH_WORKER = pytest.mark.xdist_group("torch")
MODELS_WORKER = pytest.mark.xdist_group("models")
