"""`costeer proxy`'s API under an outside fuzzer: schemathesis generates valid and invalid
requests from the proxy's own /openapi.json, and no answer may be a 5xx. The proxy runs
on the seeded NumPy models with a small window, so every generated request is fast."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from costeer import CoSteer  # noqa: E402
from costeer.transport.proxy import ProxyDefaults, create_proxy_app  # noqa: E402
from fakes import NumpyModel  # noqa: E402

CANARY = "canary-Fuzz-5150"
COSTEER = CoSteer(llm=NumpyModel(1, "numpy-cloud", context_window=1024),
                  slm=NumpyModel(2, "numpy-device", context_window=1024), context_cache=False)
APP = create_proxy_app(COSTEER, f"I keep bees. {CANARY}", ProxyDefaults(max_tokens=16))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_proxy_fail(case):
    response = case.call_and_validate(checks=[not_a_server_error])
    if response.status_code >= 400:  # every refusal in OpenAI's error shape
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert CANARY not in response.text
