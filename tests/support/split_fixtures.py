"""What the split-mode tests on fake models share: `costeer serve`'s app on the seeded
NumPy cloud model over real loopback HTTP, the same pair embedded, and a device."""

from __future__ import annotations

import pytest

from costeer import CloudConfig, CoSteer
from costeer.transport.server.app import create_app
from support.fake_servers import RequestLog
from support.fakes import NumpyModel
from support.servers import app_in_thread

PROMPT = "Write a note for my friend."
CONTEXT = "My name is Ingrid and I live in Tromso. canary-Zq81-Wx"
CANARY = "canary-Zq81-Wx"


@pytest.fixture(scope="module")
def served():
    log = RequestLog()
    with app_in_thread(log.install(create_app(NumpyModel(1, "numpy-cloud")))) as url:
        yield url, log


@pytest.fixture(scope="module")
def embedded():
    return CoSteer(llm=NumpyModel(1, "numpy-cloud"), slm=NumpyModel(2, "numpy-device"))


def device(url: str, **cloud) -> CoSteer:
    return CoSteer(slm=NumpyModel(2, "numpy-device"), cloud=CloudConfig(url, **cloud))
