"""`costeer proxy` holds the private context, so it answers only whom it must: a key by
default (kept in the user's config folder, mode 0600), loopback Host names and its own
origins, JSON bodies up to a cap, the methods of its allow-list with weights in range,
a bounded queue. Every refusal is in OpenAI's error shape, does no model work (the fake
models count their forward passes), and quotes nothing of the context; a fuzz run of
thousands of schemathesis cases, with the key so that they reach the app, gets no 5xx,
and at uvicorn's trace level no log line holds the context's canary."""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from costeer import CoSteer
from costeer.cli import build_parser, main
from costeer.errors import UserError
from costeer.methods import METHODS, PARAMETRIC_METHODS
from costeer.transport.guard import uvicorn_config
from costeer.proxy.access import PARAMETER_RANGES, MethodAllowList, ProxyAccess, proxy_key, proxy_key_path
from costeer.proxy.app import create_proxy_app
from costeer.proxy.errors import ApiError
from costeer.proxy.page import PAGE_PATHS
from costeer.proxy.schema import ProxyDefaults
from support.fakes import NumpyModel, SlowEndlessModel
from support.fuzz import examples
from support.logs import Captured, capturing_every_log
from support.servers import app_in_thread, free_port, verbose_in_thread

openai = pytest.importorskip("openai")

KEY = "security-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CANARY = "canary-Guard-4242"
CONTEXT = f"My name is Ingrid and my code is {CANARY}."
PROMPT = "Write a note for my friend."
CHAT = {"model": "costeer", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 4}


def embedded(kind: type = NumpyModel, **kw) -> CoSteer:
    return CoSteer(llm=kind(1, "numpy-cloud", **kw), slm=kind(2, "numpy-device", **kw), context_cache=False)


def passes(cs: CoSteer) -> int:
    return cs.model("llm").forward_passes + cs.model("slm").forward_passes


def outcomes(app) -> tuple[int, int, int]:
    s = app.state.stats
    return s.completed, s.cancelled, s.failed


def serve(cs: CoSteer, context: str = CONTEXT, defaults: ProxyDefaults = ProxyDefaults(), **access):
    port = free_port()
    app = create_proxy_app(cs, context, defaults, access=ProxyAccess(**{"api_key": KEY, "port": port, **access}))
    return app_in_thread(app, port), app, port


@pytest.fixture(scope="module")
def proxy():
    cs = embedded()
    server, app, port = serve(cs, max_body_bytes=4096)
    with server as url:
        yield url, app, cs, port


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert "\n" not in error["message"] and CANARY not in response.text and "Traceback" not in response.text
    return error


# --- refused before the app: Host, Origin, key, content type, size --------------------------

REFUSED = {
    "foreign Host": (dict(headers={**AUTH, "Host": "evil.example"}), 403, "host_not_allowed"),
    "foreign Host, proxy's port": (dict(headers={**AUTH, "Host": "evil.example:8008"}), 403, "host_not_allowed"),
    "foreign Origin": (dict(headers={**AUTH, "Origin": "http://evil.example"}), 403, "origin_not_allowed"),
    "Origin: null": (dict(headers={**AUTH, "Origin": "null"}), 403, "origin_not_allowed"),
    "loopback Origin, other port": (dict(headers={**AUTH, "Origin": "http://127.0.0.1:1"}), 403, "origin_not_allowed"),
    "no key": (dict(headers={}), 401, "unauthorized"),
    "wrong key": (dict(headers={"Authorization": "Bearer " + "x" * 28}), 401, "unauthorized"),
    "the context as key": (dict(headers={"Authorization": f"Bearer {CANARY}"}), 401, "unauthorized"),
    "not Bearer": (dict(headers={"Authorization": f"Basic {KEY}"}), 401, "unauthorized"),
    "text/plain": (dict(headers={**AUTH, "Content-Type": "text/plain"}, content=json.dumps(CHAT)), 415,
                   "unsupported_media_type"),
    "no Content-Type": (dict(headers=AUTH, content=json.dumps(CHAT).encode()), 415, "unsupported_media_type"),
    "form": (dict(headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"}, content=b"a=1"), 415,
             "unsupported_media_type"),
    "body over the cap": (dict(headers=AUTH, json={**CHAT, "padding": "x" * 5000}), 413, "body_too_large"),
    "a parametric method not served": (dict(headers=AUTH, json={**CHAT, "model": "mix:0.5"}), 400,
                                       "model_not_allowed"),
    "mix:1e9": (dict(headers=AUTH, json={**CHAT, "model": "mix:1e9"}), 400, "model_not_allowed"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_request_is_an_openai_error_and_does_no_model_work(proxy, name):
    url, app, cs, _ = proxy
    kwargs, status, code = REFUSED[name]
    kwargs = {"json": CHAT, **kwargs} if "content" not in kwargs else kwargs
    before, done = passes(cs), outcomes(app)
    response = httpx.post(f"{url}/v1/chat/completions", timeout=30, **kwargs)
    error = assert_openai_error(response, status, code)
    assert passes(cs) == before and outcomes(app) == done  # nothing generated, nothing queued
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if code == "model_not_allowed":
        assert error["param"] == "model" and "costeer" in error["message"] and "auto" in error["message"]


@pytest.mark.parametrize("path", ["/v1/models", "/v1/models/costeer", "/v1/costeer/context", "/openapi.json", "/docs",
                                  "/healthz"])
def test_nothing_is_served_without_the_key(proxy, path):  # but the chat page (test_chat_page.py)
    url = proxy[0]
    assert_openai_error(httpx.get(f"{url}{path}"), 401, "unauthorized")
    # with it: the API and its schema; no docs page (it would load scripts from a CDN)
    expected = 200 if path.startswith(("/v1", "/openapi")) else 404
    assert httpx.get(f"{url}{path}", headers=AUTH).status_code == expected


def test_the_proxys_own_origins_and_host_names_are_allowed(proxy):
    url, _, _, port = proxy
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}", f"http://[::1]:{port}"):
        response = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers={**AUTH, "Origin": origin})
        assert response.status_code == 200, (origin, response.text)
    for host in (f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert httpx.get(f"{url}/v1/models", headers={**AUTH, "Host": host}).status_code == 200, host
    # a JSON content type with parameters is JSON
    response = httpx.post(f"{url}/v1/chat/completions", content=json.dumps(CHAT),
                          headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 200


def test_the_sdk_with_the_key_streams_an_answer_and_without_it_is_refused(proxy):
    url, _, _, _ = proxy
    reference = embedded().generate(PROMPT, CONTEXT, max_new_tokens=12)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    chunks = list(client.chat.completions.create(model="costeer", messages=CHAT["messages"], max_tokens=12, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reference.text
    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-key-0123456789", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model="costeer", messages=CHAT["messages"], max_tokens=12)
    assert caught.value.body["code"] == "unauthorized"


def test_allowed_host_names_and_origins_can_be_added():
    access = ProxyAccess(api_key=KEY, host="0.0.0.0", port=9000, allow_hosts=("Box.LAN",),
                         allow_origins=("https://app.example:3000/",))
    policy = access.guard_policy()
    assert policy.allowed_hosts == {"localhost", "127.0.0.1", "::1", "box.lan"}  # 0.0.0.0 is no name
    assert policy.allowed_origins == {"http://localhost:9000", "http://127.0.0.1:9000", "http://[::1]:9000",
                                      "http://box.lan:9000", "https://app.example:3000"}
    assert policy.api_keys == (KEY,) and policy.open_paths == PAGE_PATHS and policy.require_json
    assert ProxyAccess(api_key=KEY, host="192.168.1.5").guard_policy().allowed_hosts >= {"192.168.1.5"}
    assert ProxyAccess(api_key=None).guard_policy().api_keys == ()
    for origin in ("app.example", "ftp://x", "http://x/path"):
        with pytest.raises(UserError, match="--allow-origin"):
            ProxyAccess(api_key=KEY, allow_origins=(origin,))
    with pytest.raises(UserError, match="at least 16") as caught:
        ProxyAccess(api_key="short-key")
    assert "short-key" not in str(caught.value)


# --- methods ---------------------------------------------------------------------------------

def test_the_default_methods_are_the_published_ones_and_parametric_ones_must_be_listed():
    default = MethodAllowList.parse(None)
    assert default.names == tuple(METHODS) and "auto" in default.names and not default.parametric
    listed = MethodAllowList.parse("costeer, auto,mix,cos:*,bounded:0.50")
    assert listed.names == ("costeer", "auto", "bounded:0.5") and listed.parametric == {"mix", "cos"}
    assert listed.resolve("mix:0.500") == "mix:0.5" and listed.resolve("cos:-2") == "cos:-2"
    assert listed.resolve("bounded:0.5") == "bounded:0.5" and listed.resolve("") == "costeer"
    assert MethodAllowList.parse("cos").names == ("cos",) and not MethodAllowList.parse("cos").parametric
    refused = {"mix:1e9": 400, "mix:8.5": 400, "mix:-9": 400, "mix:nan": 400, "mix:inf": 400, "mix:abc": 400,
               "cos:100": 400, "bounded:1": 400, "unsure:1": 400, "llm": 400, "ada": 400, "gpt-4o": 404, "mix": 404}
    for name, status in refused.items():
        with pytest.raises(ApiError) as caught:
            listed.resolve(name)
        assert caught.value.status == status, name
        assert caught.value.code == ("model_not_found" if status == 404 else "model_not_allowed")
        assert "mix:NUMBER with -8 <= NUMBER <= 8" in caught.value.message and "auto" in caught.value.message
    every = MethodAllowList.parse("mix,unsure,bounded,cos:*,ada:*,fit:*")
    for prefix, (low, high) in PARAMETER_RANGES.items():
        inside = (low + high) / 2
        assert every.resolve(f"{prefix}:{inside:g}") == f"{prefix}:{inside:g}"
        for outside in (low - 1, high + 1):
            with pytest.raises(ApiError, match="model_not_allowed|serves"):
                every.resolve(f"{prefix}:{outside:g}")
    for bad in ("ada:0", "ada:1", "bounded:0", "fit:0"):  # methods.py's own bounds, inside the range's ends
        with pytest.raises(ApiError):
            every.resolve(bad)
    for text, message in (("", "no method"), ("gpt-4o", "unknown method"), ("mix:9", "-8 <= NUMBER <= 8"),
                          ("ada:2", "ada:NUMBER"), ("cos:x", "finite number")):
        with pytest.raises(UserError, match=message):
            MethodAllowList.parse(text)


def test_the_help_states_the_ranges_the_proxy_enforces(monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # argparse does not wrap the help
    assert set(PARAMETER_RANGES) == set(PARAMETRIC_METHODS)
    help_text = " ".join(build_parser()._subparsers._group_actions[0].choices["proxy"].format_help().split())
    for text in ("mix:W and unsure:W -8..8", "bounded:B 0..8", "cos:LAMBDA -8..8", "ada:P 0..1", "fit:W 0..8"):
        assert text in help_text
    assert PARAMETER_RANGES == {"mix": (-8, 8), "unsure": (-8, 8), "bounded": (0, 8), "cos": (-8, 8), "ada": (0, 1),
                                "fit": (0, 8)}


def test_models_lists_the_served_methods_and_a_listed_parametric_method_answers():
    cs = embedded()
    server, app, _ = serve(cs, methods=MethodAllowList.parse("costeer,auto,mix"))
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["costeer", "auto"]
        reply = client.chat.completions.create(model="mix:0.5", messages=CHAT["messages"], max_tokens=8)
        assert reply.choices[0].message.content == embedded().generate(PROMPT, CONTEXT, method="mix:0.5",
                                                                       max_new_tokens=8).text
        before = passes(cs)
        for model in ("mix:9", "mix:1e9", "llm", "cos:0.5"):
            with pytest.raises(openai.BadRequestError) as caught:
                client.chat.completions.create(model=model, messages=CHAT["messages"], max_tokens=8)
            assert caught.value.body["code"] == "model_not_allowed" and "costeer, auto, mix:NUMBER" in caught.value.body["message"]
        with pytest.raises(openai.BadRequestError):
            client.models.retrieve("llm")
        assert passes(cs) == before


# --- the queue -------------------------------------------------------------------------------

def test_a_full_queue_is_a_429_with_retry_after_and_no_model_work():
    cs = embedded(SlowEndlessModel)
    server, app, _ = serve(cs, max_queue=2)
    with server as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        running = client.chat.completions.create(model="costeer", messages=CHAT["messages"], max_tokens=2000, stream=True)
        next(running)  # generating
        waiting = threading.Thread(target=lambda: httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "max_tokens": 2},
                                                             headers=AUTH, timeout=60))
        waiting.start()
        time.sleep(0.5)  # the second one waits in the queue: 2 of 2
        response = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH)
        error = assert_openai_error(response, 429, "queue_full")
        assert response.headers["retry-after"] == "1" and "--max-queue" in error["message"]
        with pytest.raises(openai.RateLimitError):  # as the SDK sees it (it would retry after Retry-After)
            client.chat.completions.create(model="costeer", messages=CHAT["messages"], max_tokens=2)
        running.close()
        waiting.join(60)
        deadline = time.monotonic() + 10
        while sum(outcomes(app)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert outcomes(app) == (1, 1, 0)  # the two admitted ones only: the refused ones never reached the worker
        assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=AUTH).status_code == 200


# --- the key file and the command line -------------------------------------------------------

def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_key_file_is_made_0600_in_a_0700_folder_and_refused_when_open_to_others(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    path = proxy_key_path()
    assert path == tmp_path / "config" / "costeer" / "proxy-key"
    key, where, created = proxy_key()
    assert where == path and created and len(key) >= 40
    assert mode(path) == 0o600 and mode(path.parent) == 0o700 and path.read_text().strip() == key
    assert proxy_key() == (key, path, False)  # the same key next time
    monkeypatch.setenv("XDG_CONFIG_HOME", "relative/path")  # not absolute: ignored, as the XDG spec says
    assert proxy_key_path() == Path(os.path.expanduser("~")) / ".config" / "costeer" / "proxy-key"
    path.chmod(0o640)
    with pytest.raises(UserError, match="open to other users") as caught:
        proxy_key(path)
    assert key not in str(caught.value) and str(path) in str(caught.value)
    path.chmod(0o600)
    path.parent.chmod(0o770)
    with pytest.raises(UserError, match="chmod 700"):
        proxy_key(path)
    path.parent.chmod(0o700)
    path.write_text("short\n")
    with pytest.raises(UserError, match="delete it"):
        proxy_key(path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="cannot read"):
        proxy_key(path)


class FakeCoSteer:
    cloud_url = None

    def model(self, role: str) -> None:
        return None

    def close(self) -> None:
        pass


@pytest.fixture
def cli(tmp_path, monkeypatch):
    """`costeer proxy` in this process with the models and the server stubbed: what it would serve."""
    import costeer.cli
    import costeer.proxy.app

    served = []
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("COSTEER_PROXY_API_KEY", raising=False)
    monkeypatch.setattr(costeer.cli, "_costeer", lambda args: FakeCoSteer())
    monkeypatch.setattr(costeer.proxy.app, "serve_proxy", lambda cs, context, defaults, access: served.append(access))
    profile = tmp_path / "profile.md"
    profile.write_text(CONTEXT)
    return lambda *args: (main(["proxy", "--context", str(profile), *args]), served[-1] if served else None)


def test_the_command_makes_the_key_file_and_prints_where_it_is_never_the_key(cli, capsys, tmp_path):
    code, access = cli()
    err = capsys.readouterr().err
    path = tmp_path / "config" / "costeer" / "proxy-key"
    key = path.read_text().strip()
    assert code == 0 and access.api_key == key and mode(path) == 0o600 and mode(path.parent) == 0o700
    assert f"clients must send the key in {path} (made now," in err and key not in err and CANARY not in err
    code, again = cli("--host", "0.0.0.0", "--allow-host", "box.lan", "--methods", "costeer,mix", "--max-queue", "3",
                      "--max-body-bytes", "1000", "--cloud-api-key", "cloud-key-0123456789")
    err = capsys.readouterr().err
    assert again.api_key == key and "made now" not in err and key not in err and "cloud-key" not in err
    policy = again.guard_policy()
    assert policy.allowed_hosts == {"localhost", "127.0.0.1", "::1", "box.lan"} and policy.max_body_bytes == 1000
    assert again.max_queue == 3 and again.methods.names == ("costeer",) and again.methods.parametric == {"mix"}
    path.chmod(0o644)
    assert cli()[0] == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "open to other users" in err and key not in err


def test_the_command_takes_a_key_from_the_flag_or_the_environment_and_no_key_on_loopback_only(cli, capsys, tmp_path,
                                                                                              monkeypatch):
    assert cli("--api-key", KEY)[1].api_key == KEY
    monkeypatch.setenv("COSTEER_PROXY_API_KEY", "env-key-0123456789abc")
    code, access = cli()
    err = capsys.readouterr().err
    assert access.api_key == "env-key-0123456789abc" and "$COSTEER_PROXY_API_KEY" in err and "env-key" not in err
    assert not (tmp_path / "config" / "costeer").exists()  # no key file when a key is given
    code, access = cli("--no-key", "--host", "localhost")
    err = capsys.readouterr().err
    assert code == 0 and access.api_key is None and access.guard_policy().api_keys == ()
    assert "warning: --no-key" in err
    assert cli("--no-key", "--host", "0.0.0.0")[0] == 2
    assert "loopback" in capsys.readouterr().err
    monkeypatch.setenv("COSTEER_PROXY_API_KEY", "short")
    assert cli()[0] == 2 and "at least 16" in capsys.readouterr().err


def test_the_cloud_key_is_cloud_api_key_and_generate_keeps_api_key_as_its_alias():
    parse = build_parser().parse_args
    assert parse(["generate", "--prompt", "p", "--api-key", "k"]).cloud_api_key == "k"
    assert parse(["generate", "--prompt", "p", "--cloud-api-key", "k"]).cloud_api_key == "k"
    proxy = parse(["proxy", "--api-key", "mine", "--cloud-api-key", "theirs"])
    assert (proxy.api_key, proxy.cloud_api_key) == ("mine", "theirs")


# --- a long fuzz run over HTTP, and every log at its most verbose --------------------------

LOG_MARKER = "log-probe-5e1f"


def unwanted_in_a_log(text: str) -> bool:
    return CANARY in text or "Ingrid" in text or "Traceback" in text


@pytest.fixture
def every_log():
    """Every log record, at every logger's lowest level; kept are those that hold the canary
    or a traceback, or are errors."""
    with capturing_every_log(Captured(unwanted_in_a_log, marker=LOG_MARKER, clip=500)) as handler:
        yield handler


# cases per operation; GET /v1/models has no parameters and runs out after a few. Generating
# a chat request takes schemathesis about 60 ms here, ten times what answering it takes, so
# the suite runs a twentieth of the full 2,000-odd cases (about 6 s; test_proxy_fuzz.py
# fuzzes the same schema in process, 50 cases an operation); COSTEER_FUZZ_FULL=1 runs them
# all (about 110 s)
_FULL = {"POST /v1/chat/completions": 1400, "GET /v1/models/{name}": 600, "GET /v1/models": 50,
         "GET /v1/costeer/context": 50}
FUZZ_CASES = {k: examples(max(10, v // 20), v) for k, v in _FULL.items()}
SERVED = "costeer,auto,llm,slm,slm-context,light,costeer-plausible,mix,unsure,bounded,cos:*,ada:*"
# models the fuzz puts into a generated body now and then, so that many cases generate
MODELS = ["costeer", "auto", "llm", "slm-context", "light", "costeer-plausible", "mix:0.5", "unsure:3", "bounded:2",
          "cos:-1", "ada:0.7", "mix:1e9", "llm-context"]


def test_thousands_of_fuzz_cases_with_the_key_no_5xx_and_the_context_in_no_log_body_or_traceback(every_log):
    """schemathesis cases (valid and invalid) for every operation of the proxy's schema, sent
    over HTTP with the key, with the canary in the private context only; then the refused
    requests of this file. No 5xx, and neither an answer nor a log record (uvicorn at trace,
    every logger at its lowest level) holds the canary or a traceback."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    from schemathesis.generation import GenerationMode

    schemathesis = pytest.importorskip("schemathesis")
    cs = embedded(context_window=384)
    port = free_port()
    app = create_proxy_app(cs, CONTEXT, ProxyDefaults(max_tokens=8),
                           access=ProxyAccess(api_key=KEY, port=port, max_body_bytes=64 * 1024,
                                              methods=MethodAllowList.parse(SERVED)))
    schema = schemathesis.openapi.from_dict(app.openapi())
    server, thread = verbose_in_thread(app, port, uvicorn_config)  # as `costeer proxy` serves it
    url = f"http://127.0.0.1:{port}"
    statuses: dict[int, int] = {}
    per_operation: dict[str, int] = {}
    leaked: list[str] = []
    started = time.monotonic()
    try:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE),
                              operation.as_strategy(GenerationMode.NEGATIVE))

            @given(case=cases, model=st.sampled_from([None, None, *MODELS]))
            @settings(max_examples=FUZZ_CASES[label], deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
            def fuzz(case, model):
                if model is not None and isinstance(case.body, dict):
                    case.body["model"] = model
                response = case.call(base_url=url, headers=AUTH, timeout=60)
                statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                per_operation[label] = per_operation.get(label, 0) + 1
                assert response.status_code < 500, f"{label}: {response.status_code} {response.text[:300]}"
                if CANARY in response.text or "Traceback" in response.text:
                    leaked.append(f"{label} {response.status_code}: {response.text[:300]}")

            fuzz()
        fuzz_s = time.monotonic() - started
        # the refused requests, over HTTP too
        for name, (kwargs, status, code) in REFUSED.items():
            kwargs = {"json": CHAT, **kwargs} if "content" not in kwargs else kwargs
            response = httpx.post(f"{url}/v1/chat/completions", timeout=30, **kwargs)
            if name not in ("body over the cap", "a parametric method not served"):  # this proxy takes those
                assert_openai_error(response, status, code)
        refused = [
            # fits the device's window without the context, not with it: refused inside the generation
            httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={**CHAT, "messages": [
                {"role": "user", "content": "x" * 290}], "max_tokens": 4}),
            httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={**CHAT, "model": "llm-context"}),
            httpx.post(f"{url}/v1/chat/completions", headers={**AUTH, "Content-Type": "application/json"}, content=b"{"),
            httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json={**CHAT, "max_tokens": 10**6}),
            httpx.get(f"{url}/v1/models/{LOG_MARKER}", headers=AUTH),  # the logs are really captured: see below
        ]
        assert [r.status_code for r in refused] == [400, 400, 400, 400, 404], [r.text for r in refused]
        for response in refused:
            assert_openai_error(response, response.status_code, response.json()["error"]["code"])
        assert "numpy-device" in refused[0].text  # the device's window, with the context, refused it
        # a client that leaves mid-stream
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="costeer", messages=CHAT["messages"], max_tokens=150,
                                                stream=True)
        next(stream)
        stream.close()
        assert httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=CHAT).status_code == 200
        time.sleep(0.3)
    finally:
        server.should_exit = True
        thread.join(10)
    total = sum(statuses.values())
    generated = app.state.stats.completed
    print(f"\nproxy fuzz: {total} cases in {fuzz_s:.1f} s ({per_operation}), statuses {dict(sorted(statuses.items()))}, "
          f"{generated} generations; {every_log.count} log records")
    assert total >= 0.95 * sum(FUZZ_CASES.values()) - 50 and not [code for code in statuses if code >= 500]
    assert not {401, 403, 413, 415} & set(statuses)  # with the key, every case reached the app
    assert statuses.get(200, 0) >= total // 50 and generated >= total // 50  # and many reached the models
    assert not leaked, leaked[:5]
    assert {"uvicorn.access", "uvicorn.asgi", "uvicorn.error"} <= every_log.names and every_log.markers > 0
    assert not every_log.kept, every_log.kept[:5]  # no record holds the canary or a traceback; none is an error
