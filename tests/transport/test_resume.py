"""A generation survives its cloud server going away: the device reopens its session
with the public prompt and the tokens it chose, and the output is the uninterrupted
run's token for token. Real HTTP on loopback, the seeded NumPy models on both sides."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import ExitStack
from typing import Callable

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from costeer import CloudConfig, CoSteer, UserError
from costeer.cli import main
from costeer.transport.client import resume
from costeer.transport.server.limits import ServerLimits
from costeer.transport.server.app import create_app
from costeer.transport.wire import CloudRefused
from support.fake_servers import RequestLog
from support.fakes import NumpyModel
from support.servers import app_in_thread, free_port
from support.split_fixtures import CANARY, CONTEXT, PROMPT, device, embedded  # noqa: F401  (fixtures)


class Restartable:
    """`costeer serve`'s app on one fixed port, in a thread: stopped and started again at will."""

    def __init__(self, limits: ServerLimits = ServerLimits(), wrap: Callable[[FastAPI], FastAPI] = lambda app: app) -> None:
        self.port, self.limits, self.wrap, self.log = free_port(), limits, wrap, RequestLog()
        self.model_name = "numpy-cloud"
        self._running: ExitStack | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        stack = ExitStack()
        app = create_app(NumpyModel(1, self.model_name), limits=self.limits)
        stack.enter_context(app_in_thread(self.log.install(self.wrap(app)), self.port))
        self._running = stack

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None

    def opens(self) -> int:
        return sum(path == "/v1/sessions" for path, _ in self.log.bodies)


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch):
    """The pauses between tries to reopen a tenth of their length (0.05 s, doubling up to
    0.4 s): the servers here stay down tenths of a second, not seconds."""
    monkeypatch.setattr(resume, "RESUME_BACKOFF_S", (0.05, 0.4))


@pytest.fixture
def server():
    s = Restartable()
    s.start()
    yield s
    s.stop()


def after_tokens(n: int, action):
    """An on_text hook: `action` once, after the n-th piece of text (the device's next
    request is the step that sends that token)."""
    count = [0]

    def hook(_: str) -> None:
        count[0] += 1
        if count[0] == n:
            action()
    return hook


def restart(server: Restartable, down_s: float):
    def action() -> None:
        server.stop()
        if down_s:
            threading.Timer(down_s, server.start).start()
        else:
            server.start()
    return action


CASES = {
    "plain": dict(kw={}, gen={}),
    "sampled": dict(kw={}, gen=dict(temperature=0.8, top_k=20, seed=3)),
    "tree": dict(kw=dict(lookahead=(2, 2, 0.0)), gen={}),
    "streamed chain": dict(kw=dict(lookahead=(3, 1, 0.0)), gen={}),
    "escalating": dict(kw=dict(top_k=1), gen=dict(method="mix:4")),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("down_s", [0.0, 0.3])  # 0: back at once, a server that does not know the session
def test_a_restart_mid_generation_changes_nothing(server, embedded, case, down_s, tmp_path):
    kw, gen = {"top_k": 4, **CASES[case]["kw"]}, {"method": "costeer", **CASES[case]["gen"]}
    wire = tmp_path / "wire.jsonl"
    cs = device(server.url, wire_log=wire, **kw)
    started = time.monotonic()
    g = cs.generate(PROMPT, CONTEXT, max_new_tokens=40, on_text=after_tokens(6, restart(server, down_s)), **gen)
    assert time.monotonic() - started >= down_s
    assert g.token_ids == embedded.generate(PROMPT, CONTEXT, max_new_tokens=40, **gen).token_ids
    assert g.new_tokens == 40 and g.traffic["resumes"] == 1 and g.traffic.get("uncertified_steps", 0) == 0
    # the new session got the chosen tokens once each, in order (the last few may stay walked in a tree)
    opened = [i for i, (path, _) in enumerate(server.log.bodies) if path == "/v1/sessions"]
    assert len(opened) == 2
    resent = [t for path, body in server.log.bodies[opened[1]:] if path.endswith("/step") for t in json.loads(body)["tokens"]]
    assert resent == g.token_ids[:len(resent)] and len(g.token_ids) - 5 <= len(resent) <= len(g.token_ids) - 1
    sent = [json.dumps(json.loads(line)) for line in wire.read_text().splitlines() if '"device->cloud"' in line]
    assert sent and not any(CANARY in r or "Ingrid" in r for r in sent)  # sent again: public data only
    cs.close()



def failing(answers: dict[tuple[str, int], tuple[int, dict, dict]]) -> Callable[[FastAPI], FastAPI]:
    """Answer the n-th open, step or look (counted from 1 for each) with a canned error, as
    a proxy in front of the server, a busy server or one shutting down would."""
    def wrap(app: FastAPI) -> FastAPI:
        seen: dict[str, int] = {}

        @app.middleware("http")
        async def fail(request: Request, call_next):
            path = request.url.path
            if request.method == "POST" and path.startswith("/v1/sessions"):
                kind = "open" if path == "/v1/sessions" else "step" if json.loads(await request.body())["tokens"] else "look"
                seen[kind] = seen.get(kind, 0) + 1
                if (kind, seen[kind]) in answers:
                    status, body, headers = answers[kind, seen[kind]]
                    return JSONResponse(status_code=status, content=body, headers=headers)
            return await call_next(request)
        return app
    return wrap


def test_proxy_errors_and_a_busy_reopen_are_ridden_out(embedded):
    answers = {("look", 2): (503, {"error": "shutting_down", "message": "the server is shutting down"}, {"Retry-After": "5"}),
               ("open", 2): (429, {"error": "too_many_sessions", "message": "full"}, {"Retry-After": "1"}),
               ("step", 30): (502, {"text": "<html>Bad Gateway</html>"}, {}),
               ("step", 45): (504, {"text": "<html>Gateway Timeout</html>"}, {})}
    server = Restartable(ServerLimits(max_tokens_per_step=4), failing(answers))  # resent in steps of 4
    server.start()
    try:
        # k = 1 every step rarely certifies: many looks, which the answers above count on
        cs = device(server.url, top_k=1, adaptive_top_k=False)
        started = time.monotonic()
        g = cs.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=40)
        assert time.monotonic() - started >= 1.0  # waited as Retry-After said
        assert g.token_ids == embedded.generate(PROMPT, CONTEXT, method="mix:4", max_new_tokens=40).token_ids
        assert g.traffic["resumes"] == 3 and server.opens() == 5 and g.traffic["uncertified_steps"] == 0
        steps = [json.loads(body) for path, body in server.log.bodies if path.endswith("/step")]
        assert max(len(s["tokens"]) for s in steps) == 4
    finally:
        server.stop()


def test_a_step_with_no_answer_in_time_is_resumed(embedded):
    """A step that takes longer than --cloud-timeout (a stalled server) counts as a failure:
    the device reopens and carries on; the stalled step ends on a session nobody uses."""
    released = threading.Event()

    def stall(app: FastAPI) -> FastAPI:
        seen = [0]

        @app.middleware("http")
        async def slow(request: Request, call_next):
            if request.url.path.endswith("/step"):
                seen[0] += 1
                if seen[0] == 5:  # well past the device's 0.5 s: until the test is done with it
                    while not released.is_set():
                        await asyncio.sleep(0.01)
            return await call_next(request)
        return app

    server = Restartable(wrap=stall)
    server.start()
    try:
        g = device(server.url, timeout_s=0.5).generate(PROMPT, CONTEXT, max_new_tokens=20)
        assert g.token_ids == embedded.generate(PROMPT, CONTEXT, max_new_tokens=20).token_ids
        assert g.traffic["resumes"] == 1 and server.opens() == 2
    finally:
        released.set()  # the server's shutdown waits for the stalled step
        server.stop()


@pytest.mark.parametrize("status, kind", [(422, "invalid_request"), (413, "prompt_too_large"), (403, "forbidden"),
                                          (404, "unknown_node"), (500, "internal_error")])
def test_a_refusal_fails_at_once(embedded, status, kind):
    server = Restartable(wrap=failing({("step", 3): (status, {"error": kind, "message": "no"}, {})}))
    server.start()
    try:
        started = time.monotonic()
        with pytest.raises(CloudRefused, match=f"\\({status}\\): no") as refused:
            device(server.url).generate(PROMPT, CONTEXT, max_new_tokens=20)
        assert refused.value.status == status and server.opens() == 1 and time.monotonic() - started < 5
    finally:
        server.stop()


def test_it_gives_up_after_the_window_in_one_line(server):
    cs = device(server.url, retry_for_s=0.3)
    stopped = []
    with pytest.raises(UserError) as failed:
        cs.generate(PROMPT, CONTEXT, max_new_tokens=40, on_text=after_tokens(4, lambda: (server.stop(), stopped.append(time.monotonic()))))
    waited = time.monotonic() - stopped[0]
    assert str(failed.value) == f"the cloud at {server.url} stopped answering (connection refused) and did not come back within 0.3 s"
    assert 0.3 <= waited < 2.8


def test_zero_turns_resuming_off(server):
    cs = device(server.url, retry_for_s=0)
    started = []
    with pytest.raises(UserError, match="cannot reach the cloud"):
        cs.generate(PROMPT, CONTEXT, max_new_tokens=40, on_text=after_tokens(4, lambda: (server.stop(), started.append(time.monotonic()))))
    assert time.monotonic() - started[0] < 3  # not the default 60 s window


def test_a_server_back_with_another_model_is_refused(server):
    def swap() -> None:
        server.stop()
        server.model_name = "numpy-other"
        server.start()
    with pytest.raises(UserError, match=r"came back with another model \(numpy-other, not numpy-cloud\)"):
        device(server.url).generate(PROMPT, CONTEXT, max_new_tokens=40, on_text=after_tokens(4, swap))


def test_a_dropped_stream_ends_the_walk(embedded):
    """Every streamed answer is cut after its second line (the distribution and the first
    node): the device walks one token of each chain, then sends the walk with its next
    token, and the output is the same."""
    def cut(app: FastAPI) -> FastAPI:
        @app.middleware("http")
        async def two_lines_only(request: Request, call_next):
            response = await call_next(request)
            if request.method != "POST" or "/step" not in request.url.path:
                return response
            inner = response.body_iterator

            async def body():
                lines = 0
                async for chunk in inner:
                    yield chunk
                    lines += chunk.count(b"\n")
                    if lines >= 2:
                        raise ConnectionResetError("cut")
            response.body_iterator = body()
            return response
        return app

    server = Restartable(wrap=cut)
    server.start()
    try:
        g = device(server.url, lookahead=(3, 1, 0.0), top_k=4).generate(PROMPT, CONTEXT, max_new_tokens=24)
        assert g.token_ids == embedded.generate(PROMPT, CONTEXT, max_new_tokens=24).token_ids
        # a cut may also reset the connection the next request goes on: that one resumes
        assert g.traffic["lookahead_tokens"] > 0 and server.opens() == 1 + g.traffic["resumes"]
    finally:
        server.stop()


@pytest.mark.parametrize("value, message", [("-1", "retry window must be >= 0"), ("inf", "must be finite"),
                                            ("soon", "expected a number")])
def test_a_bad_retry_window_is_one_line(capsys, value, message):
    assert main(["generate", "--prompt", "hi", "--cloud", "http://127.0.0.1:9", "--cloud-retry-for", value]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="retry window"):
        CloudConfig("http://127.0.0.1:9", retry_for_s=float("nan"))


@pytest.mark.models
def test_a_killed_costeer_serve_restarted_on_its_port_gives_the_same_text(tmp_path):
    """The real default models and processes: `costeer generate --cloud` against a
    `costeer serve` that is SIGKILLed after a few tokens and started again on its port."""
    import os
    import signal
    import subprocess
    import sys

    from support.servers import costeer_serve

    port = free_port()

    def generate(wire_log) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "costeer.cli", "generate", "--cloud", f"http://127.0.0.1:{port}", "--json",
             "--prompt", "Write a two-sentence invitation to my birthday party.", "--context-text",
             "My name is Ingrid and I live in Tromso.", "--max-new-tokens", "24", "--simulate-rtt", "100",
             "--cloud-retry-for", "120", "--wire-log", str(wire_log)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "COSTEER_THREADS": "1"})

    def steps_sent(wire_log) -> int:
        lines = wire_log.read_text().splitlines() if wire_log.exists() else []
        return sum('"device->cloud"' in line and "/step" in line for line in lines)

    procs: list[subprocess.Popen] = []
    interrupted = tmp_path / "interrupted.jsonl"
    with ExitStack() as servers:
        servers.enter_context(costeer_serve(port=port, procs=procs))
        device = generate(interrupted)
        deadline = time.monotonic() + 300
        while steps_sent(interrupted) < 4 and device.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait()
        assert device.poll() is None, device.communicate()
        servers.enter_context(costeer_serve(port=port))  # the same port; loads the model again
        out, err = device.communicate(timeout=600)
        assert device.returncode == 0, err
        resumed = json.loads(out)
        reference = generate(tmp_path / "uninterrupted.jsonl")
        out, err = reference.communicate(timeout=600)
        assert reference.returncode == 0, err
        straight = json.loads(out)
    assert resumed["token_ids"] == straight["token_ids"] and resumed["text"] == straight["text"]
    assert resumed["new_tokens"] == 24 and resumed["traffic"]["resumes"] == 1
    sent = [line for line in interrupted.read_text().splitlines() if '"device->cloud"' in line]
    assert not any("Ingrid" in line or "Tromso" in line for line in sent)
