"""The device/cloud split over real HTTP on loopback: exactness, privacy, robustness."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from costeer import CloudConfig, CoSteer
from support.example_profile import BIRTHDAY_PROMPT
from support.servers import costeer_serve, free_port
from support.workers import TORCH_WORKER

KEY, OTHER_KEY = "test-key-1-0123456789", "test-key-2-0123456789"
CANARY = "canary-Zq81-Wx"


@pytest.fixture(scope="module")
def cloud_url():
    """`costeer serve` with the default cloud model and two keys."""
    with costeer_serve("--api-key", KEY, "--api-key", OTHER_KEY, port=free_port()) as url:
        yield url


@pytest.fixture(scope="module")
def device(cloud_url, tmp_path_factory):
    wire = tmp_path_factory.mktemp("wire") / "wire.jsonl"
    cs = CoSteer(cloud=CloudConfig(cloud_url, api_key=KEY, wire_log=wire), quiet=True)
    yield cs, wire
    cs.close()


@pytest.fixture(scope="module")
def fake_cloud_url():
    """The same server app on the seeded NumPy model: protocol tests need no real model."""
    from costeer.transport.server.app import create_app
    from support.fakes import NumpyModel
    from support.servers import app_in_thread

    with app_in_thread(create_app(NumpyModel(1), api_keys=[KEY, OTHER_KEY])) as url:
        yield url


def wire_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.models
def test_remote_greedy_equals_embedded_token_for_token(default_costeer, device, profile_text):
    cs, _ = device
    for method, tokens in (("costeer", 48), ("light", 16), ("costeer-plausible", 16), ("llm", 16)):
        remote = cs.generate(BIRTHDAY_PROMPT, profile_text, method=method, max_new_tokens=tokens)
        local = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, method=method, max_new_tokens=tokens)
        assert remote.token_ids == local.token_ids, method
        assert remote.traffic["round_trips"] >= remote.new_tokens and remote.traffic["bytes_from_cloud"] > 0
    assert remote.traffic.get("steps") is None  # `llm` needs no certification: top-1 is its answer


@pytest.mark.models
def test_lookahead_gives_the_per_token_text_with_fewer_round_trips(cloud_url, device, profile_text):
    per_token, _ = device
    trees = {tree: CoSteer(cloud=CloudConfig(cloud_url, api_key=KEY, lookahead=tree), quiet=True)
             for tree in ((2, 2, 0.0), (3, 1))}
    for cs in trees.values():
        cs._slots["slm"].model = per_token.model("slm")  # one device model in memory
    try:
        for prompt in (BIRTHDAY_PROMPT, "Write a short note to my neighbour about the noise."):
            steps = per_token.generate(prompt, profile_text, max_new_tokens=24)
            for tree, cs in trees.items():
                walked = cs.generate(prompt, profile_text, max_new_tokens=24)
                assert walked.text == steps.text and walked.token_ids == steps.token_ids, tree
                t = walked.traffic
                assert t["lookahead_tokens"] > 0 and t["uncertified_steps"] == 0
                assert t["round_trips"] < steps.traffic["round_trips"]
    finally:
        for cs in trees.values():
            cs._slots["slm"].model = None


COGENESIS_DEV = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cogenesis" / "ctx_dev.json"


@pytest.mark.models
def test_speculation_gives_the_per_token_tokens_bit_for_bit(cloud_url, device, profile_text):
    """The device runs ahead on its guesses and takes them back (llama.cpp cells freed
    and refilled), and the server computes the draft's nodes alone: greedy and seeded
    sampling give per-token CoSteer's tokens, on the README example and a CoGenesis dev
    prompt (its ~2,000-token profile), with fewer round trips."""
    per_token, _ = device
    modes = {mode: CoSteer(cloud=CloudConfig(cloud_url, api_key=KEY, **mode_cloud), quiet=True)
             for mode, mode_cloud in (("speculate 2", dict(speculate=2)),
                                      ("speculate 2, lookahead 3,1", dict(speculate=2, lookahead=(3, 1))))}
    for cs in modes.values():
        cs._slots["slm"].model = per_token.model("slm")  # one device model in memory
    cases = [("README", lambda cs, **kw: cs.generate(BIRTHDAY_PROMPT, profile_text, **kw))]
    if COGENESIS_DEV.is_file():
        from costeer.evaluation.datasets import load_dataset
        example = load_dataset(str(COGENESIS_DEV)).examples[0]
        cases.append(("CoGenesis", lambda cs, **kw: cs.generate_from_messages(example.public, example.private, **kw)))
    try:
        for case, run in cases:
            for sampling in (dict(), dict(temperature=0.8, seed=7)):
                steps = run(per_token, max_new_tokens=32, **sampling)
                for mode, cs in modes.items():
                    g = run(cs, max_new_tokens=32, **sampling)
                    assert g.token_ids == steps.token_ids, (case, sampling, mode)
                    t = g.traffic
                    assert t["draft_tokens_followed"] > 0 and t["uncertified_steps"] == 0
                    assert t["round_trips"] < steps.traffic["round_trips"], (case, sampling, mode)
    finally:
        for cs in modes.values():
            cs._slots["slm"].model = None


@pytest.mark.models
def test_certified_traffic_is_reported_and_much_smaller_than_full_vectors(device, profile_text):
    cs, _ = device
    g = cs.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=24)
    t = g.traffic
    assert t["steps"] == g.new_tokens or t["steps"] == g.new_tokens + 1  # + the step that chose end-of-sequence
    assert 0 <= t["certified_first_fraction"] <= 1 and t["uncertified_steps"] == 0
    full_vectors = t["steps"] * 151_936 * 4
    assert t["bytes_from_cloud"] < full_vectors / 3


@pytest.mark.models
def test_private_context_never_reaches_the_cloud(device, profile_text):
    cs, wire = device
    start = len(wire_records(wire))
    g = cs.generate(BIRTHDAY_PROMPT, f"{profile_text}\nSecret code: {CANARY}", max_new_tokens=12,
                    system_prompt="You are a helpful assistant.")
    records = wire_records(wire)[start:]
    to_cloud = [r for r in records if r["direction"] == "device->cloud"]
    assert to_cloud and all(CANARY not in json.dumps(r) for r in to_cloud)
    assert all("Thaddeus" not in json.dumps(r, ensure_ascii=False) for r in to_cloud)
    opened = next(r for r in to_cloud if r["path"] == "/v1/sessions")
    assert opened["body"]["messages"] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": BIRTHDAY_PROMPT},
    ]
    steps = [r["body"]["tokens"] for r in to_cloud if r["path"].endswith("/step")]
    assert [t for s in steps for t in s] == g.token_ids[: len([t for s in steps for t in s])]
    # escalations ask for a bigger k or everything, never for particular ids
    assert all(set(r["body"]) == {"tokens", "top_k"} for r in to_cloud if r["path"].endswith("/step"))


@pytest.mark.models
def test_simulated_rtt_delays_every_round_trip_and_changes_nothing_else(cloud_url, default_costeer, profile_text):
    slow = CoSteer(cloud=CloudConfig(cloud_url, api_key=KEY, simulate_rtt_ms=40), quiet=True)
    slow.model("slm")
    g = slow.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=6)
    local = default_costeer.generate(BIRTHDAY_PROMPT, profile_text, max_new_tokens=6)
    assert g.token_ids == local.token_ids
    assert g.elapsed_s >= g.traffic["round_trips"] * 0.040 * 0.9  # the delay is real; a lower bound only
    slow.close()


def test_server_refuses_bad_input_with_json_and_keeps_serving(fake_cloud_url):
    from support.fakes import VOCAB_SIZE

    auth = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=fake_cloud_url, timeout=120) as http:
        def check(response, status, kind):
            assert response.status_code == status, response.text
            assert response.json()["error"] == kind and response.json()["message"]

        check(http.get("/v1/model"), 401, "unauthorized")
        check(http.get("/v1/model", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        check(http.post("/v1/sessions", content=b"{not json", headers={**auth, "Content-Type": "application/json"}),
              422, "malformed_json")
        check(http.post("/v1/sessions", json={"messages": [], "max_new_tokens": 4}, headers=auth), 422, "invalid_request")
        check(http.post("/v1/sessions", json={"messages": [{"role": "wizard", "content": "x"}], "max_new_tokens": 4},
                        headers=auth), 422, "invalid_request")
        check(http.post("/v1/sessions/nope/step", json={"tokens": [1]}, headers=auth), 404, "unknown_session")
        huge = {"messages": [{"role": "user", "content": "word " * 40_000}], "max_new_tokens": 4}
        check(http.post("/v1/sessions", json=huge, headers=auth), 413, "prompt_too_large")
        check(http.post("/v1/sessions", json={"messages": [{"role": "user", "content": "hi"}], "max_new_tokens": 10**6},
                        headers=auth), 422, "too_many_new_tokens")

        opened = http.post("/v1/sessions", json={"messages": [{"role": "user", "content": "Say hi."}],
                                                 "max_new_tokens": 2, "top_k": 5}, headers=auth)
        assert opened.status_code == 200, opened.text
        sid = opened.json()["session_id"]
        step = f"/v1/sessions/{sid}/step"
        check(http.post(step, json={"tokens": [VOCAB_SIZE]}, headers=auth), 422, "token_out_of_range")
        check(http.post(step, json={"tokens": [-1]}, headers=auth), 422, "token_out_of_range")
        # a session is bound to the key that opened it: another valid key cannot see it
        check(http.post(step, json={"tokens": [104]}, headers={"Authorization": f"Bearer {OTHER_KEY}"}), 404, "unknown_session")
        check(http.post(step, json={"tokens": [104, 11, 12]}, headers=auth), 422, "session_budget_exhausted")
        ok = http.post(step, json={"tokens": [104], "top_k": 3}, headers=auth)
        assert ok.status_code == 200 and ok.json()["position"] == opened.json()["prompt_tokens"] + 1
        assert http.delete(f"/v1/sessions/{sid}", headers=auth).status_code == 204
        check(http.post(step, json={"tokens": []}, headers=auth), 404, "unknown_session")
        assert http.get("/v1/model", headers=auth).json()["vocab_size"] == VOCAB_SIZE  # still serving


def test_openapi_schema_is_published(fake_cloud_url):
    schema = httpx.get(fake_cloud_url + "/openapi.json", timeout=30).json()
    assert {"/v1/model", "/v1/sessions", "/v1/sessions/{session_id}/step", "/v1/sessions/{session_id}"} <= set(schema["paths"])


@TORCH_WORKER  # the tiny models are built on that worker already
def test_session_cap_and_idle_expiry(tiny_hf_pair):
    """`costeer serve` on a tiny Hugging Face model, 2 sessions at most, a 2 s time-to-live."""
    with costeer_serve("--llm", str(tiny_hf_pair[0]), "--max-sessions", "2", "--session-ttl", "2",
                       port=free_port()) as url:
        with httpx.Client(base_url=url, timeout=60) as http:
            body = {"messages": [{"role": "user", "content": "hello"}], "max_new_tokens": 4}
            first, second = http.post("/v1/sessions", json=body), http.post("/v1/sessions", json=body)
            assert first.status_code == second.status_code == 200
            third = http.post("/v1/sessions", json=body)
            assert third.status_code == 429 and third.json()["error"] == "too_many_sessions"
            import time

            time.sleep(2.1)  # both idle past their 2 s time-to-live, counted from before the 429
            assert http.post("/v1/sessions", json=body).status_code == 200
            sid = first.json()["session_id"]
            assert http.post(f"/v1/sessions/{sid}/step", json={"tokens": [1]}).json()["error"] == "unknown_session"


@pytest.fixture(scope="module")
def openai_url():
    from costeer.default_models import DEFAULT_LLM, ensure_model
    from support.servers import llama_cpp_server

    with llama_cpp_server(str(ensure_model(DEFAULT_LLM, quiet=True)), free_port()) as url:
        yield url


@pytest.mark.models
def test_openai_compatible_server_as_the_cloud(openai_url, default_costeer, profile_text, tmp_path):
    """llama-cpp-python's server: one-token completions with top-20 logprobs, prompt as text
    (it refuses token ids). Where greedy output differs from the embedded run, it must be
    at a near-tie: the server computes the same model with other kernels and batch shapes."""
    wire = tmp_path / "wire.jsonl"
    cs = CoSteer(cloud=CloudConfig(f"openai+{openai_url}/v1", wire_log=wire), quiet=True)
    for method in ("llm", "costeer"):
        remote = cs.generate(BIRTHDAY_PROMPT, f"{profile_text}\n{CANARY}", method=method, max_new_tokens=12)
        local = default_costeer.generate(BIRTHDAY_PROMPT, f"{profile_text}\n{CANARY}", method=method, max_new_tokens=12)
        assert remote.text and remote.traffic["prompt_as_text"] is True
        diverged = next((i for i, (a, b) in enumerate(zip(remote.token_ids, local.token_ids)) if a != b), None)
        if diverged is not None and method == "llm":
            gap = _embedded_gap(default_costeer, remote.token_ids[:diverged], local.token_ids[diverged], remote.token_ids[diverged])
            assert gap < 0.5, f"differs at token {diverged} by {gap:.3f} nats: more than numerical noise"
    # the server's cap is final: no escalation; steps it cannot certify are counted
    assert remote.traffic["steps"] >= 1 and remote.traffic["escalations"] == {}
    assert 0 <= remote.traffic["uncertified_steps"] <= remote.traffic["steps"]
    to_cloud = [r for r in wire_records(wire) if r["direction"] == "device->cloud"]
    assert to_cloud and all(CANARY not in json.dumps(r) and "Thaddeus" not in json.dumps(r) for r in to_cloud)
    cs.close()


def _embedded_gap(cs: CoSteer, prefix: list[int], ours: int, theirs: int) -> float:
    """How much more likely the embedded cloud model finds its token than the server's, in nats."""
    from costeer.fusion import log_softmax

    llm = cs.model("llm")
    prompt = llm.encode_chat([{"role": "system", "content": "You are a helpful assistant."},
                              {"role": "user", "content": BIRTHDAY_PROMPT}])
    with llm.open_streams([prompt], len(prefix) + 1) as stream:
        for token in prefix:
            stream.advance(token)
        lp = log_softmax(stream.logits()[0])
    return float(lp[ours] - lp[theirs])


@pytest.mark.models
def test_ctrl_c_on_generate_closes_its_session_on_the_server(cloud_url, profile_text, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    def sessions() -> int:
        # the figures are for key holders: without a key /healthz says only {"ok": true}
        return httpx.get(f"{cloud_url}/healthz", headers={"Authorization": f"Bearer {KEY}"}).json()["sessions"]

    before = sessions()
    context = tmp_path / "profile.md"
    context.write_text(profile_text, encoding="utf-8")
    proc = subprocess.Popen([sys.executable, "-m", "costeer.cli", "generate", "--cloud", cloud_url, "--api-key", KEY,
                             "--prompt", BIRTHDAY_PROMPT, "--context", str(context), "--max-new-tokens", "400",
                             "--no-context-cache"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 120
    while sessions() == before and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None and sessions() == before + 1, "the device never opened its session"
    time.sleep(1.0)  # mid-generation
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in err and "interrupted" in err
    assert sessions() == before  # closed by the device on its way out, not left to expire


def test_a_cloud_that_does_not_answer_in_time_is_one_clear_error():
    import asyncio
    import threading

    from fastapi import FastAPI

    from costeer import UserError
    from support.fakes import NumpyModel
    from support.servers import app_in_thread

    slow, answered = FastAPI(), threading.Event()

    @slow.get("/v1/model")
    async def model() -> dict:
        while not answered.is_set():  # well past the client's 0.5 s: until the test is done with it
            await asyncio.sleep(0.01)
        return {}

    with app_in_thread(slow) as url:
        cs = CoSteer(slm=NumpyModel(2), cloud=CloudConfig(url, timeout_s=0.5))
        try:
            with pytest.raises(UserError, match=r"did not answer GET /v1/model within 0.5 s"):
                cs.generate("hi", max_new_tokens=2)
        finally:
            answered.set()  # the server's shutdown waits for it
    with pytest.raises(UserError, match="timeout"):
        CloudConfig("http://127.0.0.1:1", timeout_s=0)
