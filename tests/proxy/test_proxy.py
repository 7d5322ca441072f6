"""`costeer proxy` on the seeded NumPy models: the official `openai` SDK (and raw HTTP for
the wire format) against the proxy on loopback, in a thread of this process. Same text
as `CoSteer.generate`, the SSE format, usage, methods as models, OpenAI-shaped errors,
a remote cloud that never sees the context, and clients that go away mid-stream. Every
request carries the proxy's key (test_proxy_security.py: what happens without it)."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import httpx
import pytest

from costeer import CloudConfig, CoSteer
from costeer.methods import METHODS
from costeer.prompts import CONTEXT_INTRO, PAPER_SYSTEM_PROMPT, REQUEST_INTRO
from costeer.proxy.access import MethodAllowList, ProxyAccess
from costeer.proxy.app import create_proxy_app
from costeer.proxy.schema import ProxyDefaults
from costeer.transport.server.app import create_app
from support.fakes import EndlessModel, NumpyModel, SlowEndlessModel
from support.servers import app_in_thread, free_port

openai = pytest.importorskip("openai")

CANARY = "canary-Pr0xy-7731"
CONTEXT = f"My name is Ingrid and I live in Tromso. {CANARY}"
PROMPT = "Write a note for my friend."
KEY = "proxy-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
# the published methods, and the parametric ones some tests ask for
METHODS_SERVED = MethodAllowList.parse(",".join([*METHODS, "mix", "cos:*"]))


def embedded(slow: bool = False) -> CoSteer:
    kind = SlowEndlessModel if slow else NumpyModel
    return CoSteer(llm=kind(1, "numpy-cloud"), slm=kind(2, "numpy-device"), context_cache=False)


@pytest.fixture(scope="module")
def reference() -> CoSteer:
    """A CoSteer of its own, to compare the proxy's answers with."""
    return embedded()


@contextlib.contextmanager
def serving(cs: CoSteer, defaults: ProxyDefaults = ProxyDefaults(), context: str = CONTEXT, **access):
    """The proxy on loopback with the test key (and `access`'s other options): (url, app)."""
    port = free_port()
    access.setdefault("methods", METHODS_SERVED)
    app = create_proxy_app(cs, context, defaults, access=ProxyAccess(api_key=KEY, port=port, **access))
    with app_in_thread(app, port) as url:
        yield url, app


@pytest.fixture(scope="module")
def proxy():
    cs = embedded()
    with serving(cs) as (url, app):
        yield url, app, cs


def client(url: str) -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def ask(url: str, **request) -> "openai.types.chat.ChatCompletion":
    request.setdefault("model", "costeer")
    request.setdefault("messages", [{"role": "user", "content": PROMPT}])
    return client(url).chat.completions.create(**request)


def test_models_are_the_methods_in_openai_list_shape(proxy):
    url, _, _ = proxy
    body = httpx.get(f"{url}/v1/models", headers=AUTH).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == list(METHODS)
    assert all(m["object"] == "model" and m["owned_by"] == "costeer" and isinstance(m["created"], int) for m in body["data"])
    assert [m.id for m in client(url).models.list()] == list(METHODS)
    assert client(url).models.retrieve("mix:0.50").id == "mix:0.5"  # parametric methods are models too
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4o")


@pytest.mark.parametrize("method", ["costeer", "llm", "slm-context", "light", "mix:2", "cos:0.5"])
def test_a_single_user_message_answers_as_generate_does(proxy, reference, method):
    url, _, _ = proxy
    reply = ask(url, model=method, max_tokens=24)
    g = reference.generate(PROMPT, CONTEXT, method=method, max_new_tokens=24)
    assert reply.choices[0].message.content == g.text and g.new_tokens > 0
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    assert reply.model == g.method and reply.choices[0].finish_reason == ("length" if g.finish_reason == "length" else "stop")
    public = g.prompt_tokens.get("llm_public", g.prompt_tokens.get("slm_public"))
    if public is not None:  # slm-context reads the private prompt only: the proxy counts the public one itself
        assert reply.usage.prompt_tokens == public
    assert reply.usage.completion_tokens == g.new_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + g.new_tokens
    extension = reply.model_extra["costeer"]
    assert extension["method"] == g.method and extension["prompt_tokens"] == g.prompt_tokens
    assert extension["traffic"] is None and extension["context_tokens_reused"] == 0


def test_the_public_prompt_count_does_not_depend_on_the_method(proxy):
    url, _, _ = proxy
    counts = {m: ask(url, model=m, max_tokens=2).usage.prompt_tokens for m in ("costeer", "llm", "slm", "slm-context")}
    assert len(set(counts.values())) == 1, counts


def sse_lines(url: str, request: dict) -> list[str]:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=request, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        return [line for line in response.iter_lines() if line]


def test_streaming_is_openai_sse_with_the_same_text_and_usage_last(proxy, reference):
    url, _, _ = proxy
    lines = sse_lines(url, {"model": "costeer", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 30,
                            "stream": True, "stream_options": {"include_usage": True}})
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    g = reference.generate(PROMPT, CONTEXT, max_new_tokens=30)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]) == g.text
    assert len(chunks) > 4  # token by token, not one piece at the end
    *content, finish, usage = chunks
    assert all(c["usage"] is None and c["choices"][0]["finish_reason"] is None for c in content)
    assert finish["choices"][0]["finish_reason"] == "length" and finish["costeer"]["method"] == "costeer"
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": g.prompt_tokens["llm_public"],
                                                         "completion_tokens": 30, "total_tokens": g.prompt_tokens["llm_public"] + 30}


def test_streaming_without_include_usage_sends_no_usage(proxy):
    url, _, _ = proxy
    lines = sse_lines(url, {"model": "llm", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 5, "stream": True})
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]" and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "costeer" in chunks[-1]


def test_the_sdk_streams_the_same_text_as_it_gets_whole(proxy):
    url, _, _ = proxy
    stream = ask(url, model="costeer-plausible", max_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ask(url, model="costeer-plausible", max_tokens=20).choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 20


def private_turns(turns: list[dict]) -> list[dict]:
    """The conversation as the proxy must give it to the device: context in the first user turn."""
    private = [dict(t) for t in turns]
    first = next(t for t in private if t["role"] == "user")
    first["content"] = f"{CONTEXT_INTRO}\n\n{CONTEXT}\n\n{REQUEST_INTRO}\n{first['content']}"
    return private


def test_a_conversation_is_public_as_given_and_private_with_the_context_in_its_first_user_turn(proxy, reference):
    url, _, _ = proxy
    turns = [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Suggest a dinner."},
             {"role": "assistant", "content": "Fish soup."}, {"role": "user", "content": "Something warmer?"}]
    reply = ask(url, messages=turns, max_tokens=20)
    g = reference.generate_from_messages(turns, private_turns(turns), max_new_tokens=20)
    assert reply.choices[0].message.content == g.text
    # without a system message of its own, the conversation gets the default one
    no_system = turns[1:]
    reply = ask(url, messages=no_system, max_tokens=20)
    public = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, *no_system]
    assert reply.choices[0].message.content == reference.generate_from_messages(public, private_turns(public),
                                                                               max_new_tokens=20).text


def test_text_parts_and_the_developer_role_are_read_as_text_and_system(proxy):
    url, _, _ = proxy
    parts = [{"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Write a note"}, {"type": "text", "text": "for my friend."}]}]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a note\nfor my friend."}]
    assert ask(url, messages=parts, max_tokens=12).choices[0].message.content == \
        ask(url, messages=plain, max_tokens=12).choices[0].message.content


def test_sampling_fields_reach_the_picker(proxy, reference):
    url, _, _ = proxy
    sampled = [ask(url, max_tokens=20, temperature=0.9, top_p=0.9, seed=seed).choices[0].message.content for seed in (1, 1, 2)]
    assert sampled[0] == sampled[1] != sampled[2]
    assert sampled[0] == reference.generate(PROMPT, CONTEXT, max_new_tokens=20, temperature=0.9, top_p=0.9, seed=1).text


def test_stop_strings_end_the_answer_with_finish_reason_stop(proxy, reference):
    url, _, _ = proxy
    full = reference.generate(PROMPT, CONTEXT, max_new_tokens=30).text
    stop = full[10:12]
    for given in (stop, [stop, "never-there"]):
        reply = ask(url, max_tokens=30, stop=given)
        assert reply.choices[0].message.content == full[: full.index(stop)]
        assert reply.choices[0].finish_reason == "stop"


def test_max_completion_tokens_wins_over_max_tokens_and_the_default_applies(proxy):
    url, _, _ = proxy
    assert ask(url, max_tokens=3, max_completion_tokens=5).usage.completion_tokens == 5
    cs = embedded()
    with serving(cs, ProxyDefaults(max_tokens=7)) as (small, _):
        assert ask(small).usage.completion_tokens == 7


def test_unknown_fields_are_ignored(proxy):
    url, _, _ = proxy
    response = httpx.post(f"{url}/v1/chat/completions", json={
        "model": "llm", "messages": [{"role": "user", "content": "hi", "name": "ada"}], "max_tokens": 3,
        "frequency_penalty": 0.5, "user": "someone", "logit_bias": {"1": 2}, "n": 1, "stream": False}, headers=AUTH)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 3


def user(content: object = "hi") -> list[dict]:
    return [{"role": "user", "content": content}]


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, "messages.0.role"),
    ({"messages": user([{"type": "image_url", "image_url": {"url": "http://x/cat.png"}}])}, "messages.0.content"),
    ({"messages": user(7)}, "messages.0.content"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": user(), "n": 2}, "n"),
    ({"messages": user(), "temperature": "hot"}, "temperature"),
    ({"messages": user(), "temperature": 3}, "temperature"),
    ({"messages": user(), "top_p": 0}, "top_p"),
    ({"messages": user(), "max_tokens": 0}, "max_tokens"),
    ({"messages": user(), "max_tokens": "5"}, "max_tokens"),
    ({"messages": user(), "max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"messages": user(), "seed": -1}, "seed"),
    ({"messages": user(), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": user(), "stop": 5}, "stop"),
    ({"messages": user(), "stream": "yes"}, "stream"),
    ({"messages": user(), "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ({"messages": user(), "model": 4}, "model"),
    ({"messages": [{"role": "assistant", "content": "hello"}]}, "messages"),  # no request in it
    ({"messages": user("   ")}, "messages"),
    ({"messages": user(), "max_tokens": 10**6}, "messages"),  # more than the device model's window
    ({"messages": user("x" * 5000), "max_tokens": 8}, "messages"),  # the prompt alone overflows it
])
def test_invalid_requests_are_400s_in_openai_error_shape(proxy, body, param):
    url, _, _ = proxy
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param), error
    assert "\n" not in error["message"] and "Traceback" not in response.text and CANARY not in response.text


def test_a_body_that_is_not_json_is_a_400(proxy):
    url, _, _ = proxy
    response = httpx.post(f"{url}/v1/chat/completions", content=b"{nope", headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"] == "the body is not valid JSON"


def test_an_unknown_model_is_a_404_naming_the_methods(proxy):
    url, _, _ = proxy
    with pytest.raises(openai.NotFoundError) as caught:
        ask(url, model="gpt-4o")
    error = caught.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert all(name in error["message"] for name in METHODS) and "mix:NUMBER with -8 <= NUMBER <= 8" in error["message"]
    bad = httpx.post(f"{url}/v1/chat/completions", json={"model": "mix:abc", "messages": user()}, headers=AUTH)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "model_not_allowed"  # mix is served, abc no number


def test_an_empty_model_name_means_costeer(proxy):
    url, _, _ = proxy
    response = httpx.post(f"{url}/v1/chat/completions", json={"model": "", "messages": user(), "max_tokens": 4},
                          headers=AUTH)
    assert response.status_code == 200 and response.json()["model"] == "costeer"


def test_unknown_routes_answer_in_openai_error_shape(proxy):
    url, _, _ = proxy
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi"}, headers=AUTH)
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_concurrent_requests_queue_and_each_gets_its_own_answer(proxy, reference):
    url, _, _ = proxy
    prompts = [f"{PROMPT} Number {i}." for i in range(4)]
    answers: dict[int, str] = {}

    def one(i: int) -> None:
        answers[i] = ask(url, messages=user(prompts[i]), max_tokens=40).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert answers == {i: reference.generate(p, CONTEXT, max_new_tokens=40).text for i, p in enumerate(prompts)}


def wait_for(predicate, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def passes(cs: CoSteer) -> int:
    return cs.model("llm").forward_passes + cs.model("slm").forward_passes


def test_a_client_that_leaves_mid_stream_stops_the_generation_and_the_next_answer_is_right(reference):
    cs = embedded(slow=True)  # about 8 ms a token: 2,000 tokens would take 16 s
    with serving(cs) as (url, app):
        before = passes(cs)
        stream = ask(url, max_tokens=2000, stream=True)
        received = [next(stream) for _ in range(4)]
        stream.close()  # the client goes away
        wait_for(lambda: app.state.stats.cancelled == 1)
        stopped_at = passes(cs)
        time.sleep(0.3)
        assert passes(cs) == stopped_at  # nothing runs on
        assert stopped_at - before < 2 * 200  # far fewer than 2,000 tokens' passes (2 groups a token)
        assert received[1].choices[0].delta.content
        reply = ask(url, max_tokens=20)
        assert reply.choices[0].message.content == reference.generate(PROMPT, CONTEXT, max_new_tokens=20).text
        assert app.state.stats.completed == 1 and app.state.stats.failed == 0


def test_a_queued_request_whose_client_left_is_skipped():
    cs = embedded(slow=True)
    with serving(cs) as (url, app):
        first = ask(url, max_tokens=2000, stream=True)
        next(first)  # generating now: the next request waits in the queue
        with pytest.raises(httpx.ReadTimeout):  # the client gives up while queued
            httpx.post(f"{url}/v1/chat/completions", json={"messages": user(), "max_tokens": 5}, headers=AUTH,
                       timeout=0.5)
        time.sleep(0.5)  # the proxy notices the client has gone
        first.close()
        wait_for(lambda: app.state.stats.cancelled == 2)
        assert app.state.stats.completed == 0
        assert ask(url, max_tokens=3).usage.completion_tokens == 3


@pytest.fixture
def remote_cloud(tmp_path):
    """The proxy on a device whose cloud model is `costeer serve` elsewhere (loopback)."""
    served = create_app(EndlessModel(1, "numpy-cloud"))
    with app_in_thread(served) as cloud_url:
        wire = tmp_path / "wire.jsonl"
        cs = CoSteer(slm=SlowEndlessModel(2, "numpy-device", delay_s=0.002),
                     cloud=CloudConfig(cloud_url, wire_log=wire, top_k=4), context_cache=False)
        with serving(cs) as (url, app):
            yield url, app, cloud_url, wire
        cs.close()


def test_a_remote_cloud_answers_the_same_and_never_sees_the_context(remote_cloud, reference):
    url, _, _, wire = remote_cloud
    reply = ask(url, max_tokens=24)
    assert reply.choices[0].message.content == reference.generate(PROMPT, CONTEXT, max_new_tokens=24).text
    traffic = reply.model_extra["costeer"]["traffic"]
    assert traffic["round_trips"] >= 24 and traffic["bytes_to_cloud"] > 0 and traffic["uncertified_steps"] == 0
    sent = [json.loads(line) for line in wire.read_text().splitlines()]
    assert sent and all(CANARY not in json.dumps(r) and "Ingrid" not in json.dumps(r) for r in sent)
    with pytest.raises(openai.PermissionDeniedError) as caught:  # the one method that would send the context
        ask(url, model="llm-context")
    assert caught.value.body["code"] == "private_context_refused" and CANARY not in str(caught.value.body)


def test_a_client_that_leaves_closes_the_remote_session_too(remote_cloud):
    url, app, cloud_url, _ = remote_cloud
    stream = ask(url, max_tokens=1000, stream=True)
    for _ in range(4):
        next(stream)
    assert httpx.get(f"{cloud_url}/healthz").json()["sessions"] == 1
    stream.close()
    wait_for(lambda: app.state.stats.cancelled == 1)
    assert httpx.get(f"{cloud_url}/healthz").json()["sessions"] == 0
    assert ask(url, max_tokens=5).usage.completion_tokens == 5


def test_a_cloud_that_cannot_be_reached_is_a_503_that_quotes_nothing_private(caplog):
    cs = CoSteer(slm=NumpyModel(2, "numpy-device"),
                 cloud=CloudConfig(f"http://127.0.0.1:{free_port()}", timeout_s=2, retry_for_s=0), context_cache=False)
    with serving(cs) as (url, _):
        with pytest.raises(openai.InternalServerError) as caught:
            ask(url, max_tokens=5)
        # streaming, a failure before the first token is a plain error status too, not a stream
        streamed = httpx.post(f"{url}/v1/chat/completions", json={"messages": user(), "max_tokens": 5, "stream": True},
                              headers=AUTH)
    error = caught.value.body
    assert caught.value.status_code == 503 and error["code"] == "cloud_unavailable"
    assert "cannot reach the cloud" in error["message"] and "\n" not in error["message"]
    assert streamed.status_code == 503 and streamed.json()["error"]["code"] == "cloud_unavailable"
    assert CANARY not in json.dumps(error) and CANARY not in caplog.text


def test_a_cloud_that_refuses_is_a_502():
    served = create_app(NumpyModel(1, "numpy-cloud"), api_keys=["the-right-cloud-key"])
    with app_in_thread(served) as cloud_url:
        cs = CoSteer(slm=NumpyModel(2, "numpy-device"), cloud=CloudConfig(cloud_url, api_key="a-wrong-cloud-key"),
                     context_cache=False)
        with serving(cs) as (url, _):
            response = httpx.post(f"{url}/v1/chat/completions", json={"messages": user(), "max_tokens": 5}, headers=AUTH)
    assert response.status_code == 502 and response.json()["error"]["code"] == "cloud_error"
    assert "API key" in response.json()["error"]["message"] and CANARY not in response.text


@pytest.mark.parametrize("args, message", [
    (["proxy", "--context", "/nonexistent/profile.md"], "context file not found"),
    (["proxy", "--temperature", "-1"], "temperature"),
    (["proxy", "--port", "0"], "--port"),
    (["proxy", "--host", "0.0.0.0", "--no-key"], "--no-key is allowed only with a loopback --host"),
    (["proxy", "--api-key", "short"], "the proxy's API key has 5 characters; use at least 16"),
    (["proxy", "--api-key", "a key with spaces in it"], "printable ASCII without spaces"),
    (["proxy", "--api-key", "k" * 20, "--no-key"], "contradict"),
    (["proxy", "--methods", "gpt-4o"], "--methods: unknown method 'gpt-4o'"),
    (["proxy", "--methods", "costeer,mix:9"], "mix:NUMBER with -8 <= NUMBER <= 8"),
    (["proxy", "--allow-origin", "evil.example"], "--allow-origin takes scheme://host[:port]"),
])
def test_proxy_command_mistakes_are_one_line_errors(args, message, tmp_path, costeer_in_process):
    # a config folder of its own: no key file is made in the user's
    result = costeer_in_process(*args, env={"XDG_CONFIG_HOME": str(tmp_path), "COSTEER_PROXY_API_KEY": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "costeer").exists()  # refused before any key file is made
