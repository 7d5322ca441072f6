"""`costeer proxy`'s API under an outside fuzzer: schemathesis generates valid and invalid
requests from the proxy's own /openapi.json, and no answer may be a 5xx. The proxy runs
on the seeded NumPy models with a small window, so every generated request is fast. The
cases carry the proxy's key, so that they reach the app (test_proxy_security.py fuzzes it
over HTTP, thousands of cases, and shows that without the key nothing is served), and
the ASGI test client's Host name is allowed; every parametric method is served, in range."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from costeer import CoSteer  # noqa: E402
from costeer.proxy.access import MethodAllowList, ProxyAccess  # noqa: E402
from costeer.proxy.app import create_proxy_app  # noqa: E402
from costeer.proxy.schema import ProxyDefaults  # noqa: E402
from support.fakes import NumpyModel  # noqa: E402
from support.fuzz import examples  # noqa: E402

CANARY = "canary-Fuzz-5150"
COSTEER = CoSteer(llm=NumpyModel(1, "numpy-cloud", context_window=1024),
                  slm=NumpyModel(2, "numpy-device", context_window=1024), context_cache=False)
KEY = "fuzz-proxy-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
ACCESS = ProxyAccess(api_key=KEY, allow_hosts=("testserver",),
                     methods=MethodAllowList.parse("costeer,auto,llm,slm,mix,unsure,bounded,cos:*,ada:*"))
APP = create_proxy_app(COSTEER, f"I keep bees. {CANARY}", ProxyDefaults(max_tokens=16), access=ACCESS)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP, headers=AUTH)


@schema.parametrize()
# per operation; schemathesis generating a case costs ten times the proxy answering it: the
# suite runs a quarter, COSTEER_FUZZ_FULL=1 all 200 (test_proxy_security.py fuzzes over HTTP too)
@settings(max_examples=examples(50, 200), deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_proxy_fail(case):
    response = case.call_and_validate(headers=AUTH, checks=[not_a_server_error])
    if response.status_code >= 400:  # every refusal in OpenAI's error shape
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert CANARY not in response.text
