"""Nothing private in any server log or answer. A device generates with a private context
holding a canary; the server's logs, at the most verbose level there is, and every body it
sends hold no trace of it. The same holds under a fuzz run whose inputs carry the canary.

(The wire-log tests in test_transport.py and test_split_fake.py show that the canary never
leaves the device; these tests look at the other side: what the server writes and says.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from costeer import CloudConfig, CoSteer
from costeer.transport.server.limits import ServerLimits
from costeer.transport.protocol import IDS, decode_array
from costeer.transport.server.app import create_app
from costeer.bench.processes import stop
from support.example_profile import BIRTHDAY_PROMPT, PROFILE_FACTS
from support.fakes import NumpyModel
from support.fuzz import examples
from support.logs import Captured, capturing_every_log
from support.servers import free_port, verbose_in_thread
from support.split_fixtures import CANARY, CONTEXT, PROMPT

KEY = "canary-test-key-0123456789"
# Where the private context's words would show: the canary, and a fact from the profile.
SECRETS = (CANARY, "Ingrid")


def leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


# --- `costeer serve` with the real model, every log on -----------------------------------

# `costeer serve` as its console script runs it, with every log there is turned up:
# Python's root logger at its lowest level (costeer's own loggers included), uvicorn at
# "trace" (connections, ASGI messages with bodies and headers replaced by sizes) with its
# access log, and llama.cpp's own log (COSTEER_LLAMA_LOGS=1, set in the environment).
_VERBOSE_SERVE = """
import logging, sys
import uvicorn
logging.basicConfig(level=1, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
_init = uvicorn.Config.__init__
def _verbose(self, *args, **kwargs):
    kwargs["log_level"], kwargs["access_log"] = "trace", True
    _init(self, *args, **kwargs)
uvicorn.Config.__init__ = _verbose
from costeer.cli import main
sys.exit(main(["serve"] + sys.argv[1:]))
"""


def wait_healthy(url: str, proc: subprocess.Popen, err: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, f"server exited: {err.read_text()[-2000:]}"
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.3)


@pytest.mark.models
def test_real_server_logs_and_answers_hold_no_private_context(tmp_path, profile_text):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    env = {**os.environ, "COSTEER_LLAMA_LOGS": "1", "COSTEER_THREADS": "1"}
    # output to files, not pipes: a full pipe nobody reads would stall a chatty server
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", _VERBOSE_SERVE, "--port", str(port), "--api-key", KEY,
                                 "--session-ttl", "5"], env=env, stdout=stdout, stderr=stderr)
    try:
        wait_healthy(url, proc, err)
        wire = tmp_path / "wire.jsonl"
        context = f"{profile_text}\nMy name is Ingrid. Secret code: {CANARY}"
        per_token = CoSteer(cloud=CloudConfig(url, api_key=KEY, wire_log=wire), quiet=True)
        # a streamed lookahead tree too: the other way answers leave the server
        tree = CoSteer(cloud=CloudConfig(url, api_key=KEY, wire_log=wire, lookahead=(2, 2, 0.0)), quiet=True)
        try:
            per_token.generate(BIRTHDAY_PROMPT, context, max_new_tokens=10)
            per_token.generate(BIRTHDAY_PROMPT, context, method="light", max_new_tokens=6)
            tree._slots["slm"].model = per_token.model("slm")  # one device model in memory
            g = tree.generate(BIRTHDAY_PROMPT, context, max_new_tokens=8)
            assert g.traffic["lookahead_tokens"] > 0
        finally:
            tree._slots["slm"].model = None
            tree.close()
            per_token.close()
        records = [json.loads(line) for line in wire.read_text(encoding="utf-8").splitlines()]
        assert any(r["direction"] == "cloud->device" for r in records)
        assert not leaks(wire.read_text(encoding="utf-8"))  # nothing either way, answers included

        # requests that carry the canary where a server might echo it (never in the URL,
        # which every proxy logs): the refusals must not quote it
        auth = {"Authorization": f"Bearer {KEY}"}
        message = {"role": "user", "content": f"Hi {CANARY}"}
        refused = [
            httpx.get(f"{url}/v1/model", headers={"Authorization": f"Bearer {CANARY}"}),
            httpx.post(f"{url}/v1/sessions", headers=auth, json={"messages": [{"role": CANARY, "content": "x"}], "max_new_tokens": 2}),
            httpx.post(f"{url}/v1/sessions", headers=auth, json={"messages": [message], "max_new_tokens": 10**9}),
            httpx.post(f"{url}/v1/sessions", headers=auth, json={"messages": [message], "max_new_tokens": CANARY}),
            httpx.post(f"{url}/v1/sessions", headers=auth, json={"messages": [{**message, "content": CANARY * 10**4}], "max_new_tokens": 2}),
            httpx.post(f"{url}/v1/sessions", headers={**auth, "content-type": "application/json"}, content=f'{{"messages": "{CANARY}'),
        ]
        assert [r.status_code for r in refused] == [401, 422, 422, 422, 413, 422]
        assert not any(leaks(r.text) for r in refused), [r.text for r in refused]
        # the logs are really captured: a marker in a URL shows in the access log
        marker = "log-probe-7f3c"
        assert httpx.get(f"{url}/{marker}", headers=auth).status_code == 404  # past the key check, to the app
        time.sleep(0.5)
    finally:
        stop(proc)
    logs = out.read_text(errors="replace") + err.read_text(errors="replace")
    assert marker in logs and "POST /v1/sessions" in logs and "/step" in logs  # uvicorn's access log
    assert "TRACE" in logs and "ASGI" in logs  # uvicorn's trace of every request
    assert "llama_" in logs  # llama.cpp's own log
    found = leaks(logs) + [fact for fact in PROFILE_FACTS if fact in logs]
    assert not found, f"the server's log holds private text: {found}"
    print(f"\nserver log: {len(logs.splitlines())} lines, {len(logs)} characters; {len(records)} wire records")


# --- the fuzz run -------------------------------------------------------------------------


def with_canary(value):
    """Every string in a generated value, with the canary appended (a message's role
    left as it is, so valid requests stay valid and reach the model)."""
    if isinstance(value, str):
        return value + CANARY
    if isinstance(value, dict):
        return {k: v if k == "role" else with_canary(v) for k, v in value.items()}
    if isinstance(value, list):
        return [with_canary(v) for v in value]
    return value


@pytest.fixture
def every_log():
    """Every log record, at every logger's lowest level; kept are those that quote the
    private context, or are errors."""
    with capturing_every_log(Captured(leaks)) as handler:
        yield handler


# per operation (operations with no parameters run out sooner): 150 take about 10 s here, almost
# all of it schemathesis generating; the suite runs a third, COSTEER_FUZZ_FULL=1 all 150
FUZZ_EXAMPLES = examples(50, 150)


def test_fuzz_run_with_canary_inputs_leaves_no_trace_in_logs_or_answers(every_log, tmp_path):
    """schemathesis cases (valid and invalid) for every operation, with the canary added to
    every string they hold, or as the API key, or neither; meanwhile a device generates
    with the canary in its private context against the same app over HTTP."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.generation import GenerationMode

    app = create_app(NumpyModel(1, "numpy-cloud"), api_keys=[KEY],
                     limits=ServerLimits(max_sessions=64, session_ttl_s=2, max_kv_tokens=64 * 2048 + 65536))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    port = free_port()
    server, thread = verbose_in_thread(app, port)
    url = f"http://127.0.0.1:{port}"
    stop, device_errors, generations = threading.Event(), [], []

    def device_loop() -> None:
        cs = CoSteer(slm=NumpyModel(2, "numpy-device"),
                     cloud=CloudConfig(url, api_key=KEY, wire_log=tmp_path / "wire.jsonl"))
        try:
            while not stop.is_set():
                generations.append(cs.generate(PROMPT, CONTEXT, max_new_tokens=6).token_ids)
        except Exception as exc:  # noqa: BLE001  (reported below)
            device_errors.append(repr(exc))
        finally:
            cs.close()

    device = threading.Thread(target=device_loop, daemon=True)
    device.start()
    statuses: dict[int, int] = {}
    per_operation: dict[str, int] = {}
    opened_with_canary: list[int] = []
    bodies_with_canary: list[str] = []
    started = time.monotonic()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=cases, carrier=st.sampled_from(["none", "strings", "key", "both"]))
            @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
            def fuzz(case, carrier):
                if carrier in ("strings", "both"):
                    for part in ("body", "path_parameters", "query"):
                        value = getattr(case, part, None)
                        if isinstance(value, (str, dict, list)):
                            setattr(case, part, with_canary(value))
                key = CANARY if carrier in ("key", "both") else KEY
                response = case.call(headers={"Authorization": f"Bearer {key}"})
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                per_operation[f"{case.method} {case.path}"] = per_operation.get(f"{case.method} {case.path}", 0) + 1
                assert response.status_code < 500, f"{case.method} {case.formatted_path}: {response.text[:300]}"
                if carrier in ("strings", "both") and response.status_code == 200 and case.path == "/v1/sessions":
                    opened_with_canary.append(1)  # the server took a prompt holding the canary
                if leaks(response.text):
                    bodies_with_canary.append(f"{case.method} {case.formatted_path} {response.status_code}: {response.text[:300]}")

            fuzz()
    finally:
        fuzz_s = time.monotonic() - started
        stop.set()
        device.join(60)
    try:
        assert not device_errors, device_errors
        assert generations  # the device generated while the fuzz ran
        assert not leaks((tmp_path / "wire.jsonl").read_text(encoding="utf-8"))  # nothing either way
        # after the fuzz the server still serves: open, step, close (on a prompt holding
        # the canary, so that it surely went through the whole server, whatever the fuzz drew)
        auth = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=auth, timeout=30) as http:
            opened = http.post("/v1/sessions", json={"messages": [{"role": "user", "content": f"Hello {CANARY}"}],
                                                     "max_new_tokens": 4})
            assert opened.status_code == 200, opened.text
            sid = opened.json()["session_id"]
            token = int(decode_array(opened.json()["distribution"]["top_ids_b64"], IDS)[0])
            step = http.post(f"/v1/sessions/{sid}/step", json={"tokens": [token], "top_k": 4})
            assert step.status_code == 200 and step.json()["position"] == opened.json()["prompt_tokens"] + 1
            assert http.delete(f"/v1/sessions/{sid}").status_code == 204
            assert not leaks(opened.text + step.text)
            assert http.get("/healthz").json()["ok"]
    finally:
        server.should_exit = True
        thread.join(10)
    total = sum(statuses.values())
    print(f"\nfuzz: {total} cases in {fuzz_s:.1f} s ({per_operation}), statuses {dict(sorted(statuses.items()))}; "
          f"{len(opened_with_canary)} sessions opened on a prompt with the canary; "
          f"{len(generations)} device generations meanwhile; {every_log.count} log records")
    assert not bodies_with_canary, bodies_with_canary
    assert not statuses.get(500) and all(code < 500 for code in statuses)
    assert all(n >= FUZZ_EXAMPLES for op, n in per_operation.items() if "sessions" in op) and every_log.count > 0
    assert {"uvicorn.access", "uvicorn.asgi"} <= every_log.names  # the server's own records were captured
    assert not every_log.kept, every_log.kept[:5]  # no record quotes the canary; none is an error
