"""`costeer serve` against hostile or careless clients: refusals before the body is read,
slow clients, fairness between keys, /healthz disclosure, a failing compute thread, and
command-line mistakes. Real uvicorn servers on loopback, the NumPy fake model."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from statistics import median

import httpx
import pytest

from costeer.cli import main
from costeer.transport.server.limits import ServerLimits
from costeer.transport.server.scheduler import Scheduler, SchedulerClosed
from costeer.transport.server.app import create_app
from support.clock import SkippingClock
from support.fakes import HookedModel, NumpyBatchEngine, NumpyModel
from support.serve_api import assert_error, open_body
from support.servers import app_in_thread, free_port, numpy_serve_job, rss_bytes

KEY_A, KEY_B = "key-a-0123456789abcdef", "key-b-0123456789abcdef"
AUTH_A, AUTH_B = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
MB = 2**20


# --- raw HTTP, for bodies and heads no ordinary client sends -------------------------------

def read_response(sock: socket.socket, timeout_s: float) -> tuple[int, bytes]:
    """The status and body of one response (Content-Length framed); the socket has a short timeout."""
    data, deadline = b"", time.monotonic() + timeout_s
    while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no complete response within {timeout_s} s: {data[:200]!r}")
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _length(data: bytes) -> int:
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    for line in head.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def send_body_until_answered(port: int, head: bytes, total: int, chunk: bytes) -> tuple[int, float, int]:
    """Send head, then chunk after chunk (up to total bytes) while reading the answer on
    another thread: the status, the seconds it took, and the bytes sent meanwhile."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(0.2)
    answer: dict = {}

    def reader() -> None:
        try:
            answer["status"], _ = read_response(sock, timeout_s=30)
        except OSError as exc:  # a reset before the answer: reported by the assert below
            answer["error"] = repr(exc)
        answer["at"] = time.monotonic()

    started = time.monotonic()
    sock.sendall(head)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    sent = 0
    try:
        while sent < total and thread.is_alive():
            try:
                sock.sendall(chunk)
                sent += len(chunk)
            except socket.timeout:  # the server reads no more: wait for its answer
                pass
    except OSError:
        pass  # it closed the connection: the answer is already on its way
    thread.join(30)
    sock.close()
    assert "status" in answer, answer
    return answer["status"], answer["at"] - started, sent


# --- refusals before the body ---------------------------------------------------------------

def test_key_and_size_are_checked_before_any_body_byte_is_read():
    """The ASGI app itself: a refused request never calls receive() (the old app read the
    whole body before it looked at the key)."""
    app = create_app(NumpyModel(1), api_keys=[KEY_A])

    def call(headers: dict[str, str]) -> tuple[int, int]:
        reads, sent = [], []

        async def receive() -> dict:
            reads.append(1)
            return {"type": "http.request", "body": b"{}", "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
                 "path": "/v1/sessions", "raw_path": b"/v1/sessions", "query_string": b"", "root_path": "",
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
                 "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
        asyncio.run(app(scope, receive, send))
        return sent[0]["status"], len(reads)

    json_200mb = {"host": "127.0.0.1", "content-type": "application/json", "content-length": str(200 * MB)}
    assert call(json_200mb) == (401, 0)  # no key
    assert call({**json_200mb, "authorization": "Bearer wrong-key-0123456789"}) == (401, 0)
    assert call({**json_200mb, **{k.lower(): v for k, v in AUTH_A.items()}}) == (413, 0)  # a key, but too large
    assert call({**json_200mb, "content-type": "text/plain", **{k.lower(): v for k, v in AUTH_A.items()}}) == (415, 0)


@pytest.mark.early.with_args(numpy_serve_job(KEY_A))  # started when the session starts (support/early.py)
def test_a_200_mb_post_is_refused_within_2_s_without_growing_the_server(capsys, early_result):
    """`serve` in its own process: 200 MB bodies, declared or chunked, with and without a
    key, are refused in under 2 s, and the process's memory grows < 50 MB in all."""
    with early_result() as (port, process):
        pid = process.pid
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"ok": True}
        before = rss_bytes(pid)
        chunk = b"x" * MB
        declared = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {200 * MB}\r\n").encode()
        chunked = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                   f"Transfer-Encoding: chunked\r\nAuthorization: Bearer {KEY_A}\r\n\r\n").encode()
        cases = {
            "no key, declared": (declared + b"\r\n", chunk, (401,)),
            "key, declared": (declared + f"Authorization: Bearer {KEY_A}\r\n\r\n".encode(), chunk, (413,)),
            "key, chunked": (chunked, b"%x\r\n" % len(chunk) + chunk + b"\r\n", (413,)),
        }
        results = {}
        for name, (head, piece, expected) in cases.items():
            status, seconds, sent = send_body_until_answered(port, head, 200 * MB, piece)
            results[name] = (status, round(seconds, 3), sent // MB)
            assert status in expected and seconds < 2.0, (name, results)
        time.sleep(0.5)
        grown = rss_bytes(pid) - before
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200  # still serving
    with capsys.disabled():
        print(f"\n200 MB POSTs (status, s, MiB sent before the answer): {results}; RSS grew {grown / MB:.1f} MiB")
    assert grown < 50 * MB


def test_a_chunked_body_over_the_cap_is_cut_off_and_a_slow_body_times_out():
    app = create_app(NumpyModel(1), api_keys=[KEY_A], limits=ServerLimits(max_body_bytes=64 * 1024), body_timeout_s=0.5)
    with app_in_thread(app) as url:
        port = int(url.rsplit(":", 1)[1])
        head = (f"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
                f"Authorization: Bearer {KEY_A}\r\n").encode()
        # 128 MiB offered: more than loopback's socket buffers can hold (tcp_rmem may grow to 32 MiB), so the
        # client cannot finish unless the server reads it all, even if the server's thread is
        # starved while the client fills the buffers (4 MiB once fitted in them under CI load)
        piece, offered = b"x" * 8192, 128 * MB
        status, seconds, sent = send_body_until_answered(port, head + b"Transfer-Encoding: chunked\r\n\r\n", offered,
                                                         b"%x\r\n" % len(piece) + piece + b"\r\n")
        assert status == 413 and sent < offered // 2, (status, sent)

        # a body declared at 1000 bytes that comes 10 bytes every 0.2 s: 408 after 0.5 s
        sock = socket.create_connection(("127.0.0.1", port))
        sock.settimeout(0.2)
        started = time.monotonic()
        sock.sendall(head + b"Content-Length: 1000\r\n\r\n")
        answer: list = []
        reader = threading.Thread(target=lambda: answer.append(read_response(sock, 10)), daemon=True)
        reader.start()
        while reader.is_alive() and time.monotonic() - started < 5:
            try:
                sock.sendall(b"x" * 10)
            except OSError:
                break
            time.sleep(0.2)
        reader.join(10)
        sock.close()
        status, body = answer[0]
        assert status == 408 and b"body_timeout" in body
        assert 0.4 < time.monotonic() - started < 3
        # the server still serves
        assert httpx.post(url + "/v1/sessions", json=open_body(), headers=AUTH_A).status_code == 200


def test_hosts_origins_and_content_types_are_checked():
    open_app = create_app(NumpyModel(1))
    with app_in_thread(open_app) as url:
        # a keyless loopback server answers to loopback names only (DNS rebinding)
        assert httpx.get(url + "/v1/model").status_code == 200
        assert httpx.get(url + "/v1/model", headers={"Host": "localhost"}).status_code == 200
        assert_error(httpx.get(url + "/v1/model", headers={"Host": "attacker.example"}), 403, "host_not_allowed")
    with app_in_thread(create_app(NumpyModel(1), api_keys=[KEY_A])) as url:
        # a keyed one under any name, but never from a web page
        assert httpx.get(url + "/v1/model", headers={**AUTH_A, "Host": "cloud.example"}).status_code == 200
        assert_error(httpx.get(url + "/v1/model", headers={**AUTH_A, "Origin": "http://evil.example"}), 403,
                     "origin_not_allowed")
        assert_error(httpx.post(url + "/v1/sessions", content=b"{}", headers={**AUTH_A, "Content-Type": "text/plain"}),
                     415, "unsupported_media_type")
        assert_error(httpx.get(url + "/v1/model", headers={"Authorization": "Bearer " + "x" * 20}), 401, "unauthorized")


# --- slow clients -----------------------------------------------------------------------------

HEADER_TIMEOUT_S = 1.0


@pytest.mark.early.with_args(numpy_serve_job(KEY_A, header_timeout_s=HEADER_TIMEOUT_S))  # (support/early.py)
def test_clients_trickling_headers_are_dropped_and_others_still_served(capsys, early_result):
    """`serve` in its own process: 200 connections sending their headers a byte every half
    second are dropped after the head deadline (1 s); meanwhile a normal client is served
    about as fast as without them."""
    header_timeout_s = HEADER_TIMEOUT_S
    served = early_result()
    port, _ = served.value
    url = f"http://127.0.0.1:{port}"

    def timed_request() -> float:
        started = time.monotonic()
        response = httpx.get(url + "/v1/model", headers=AUTH_A, timeout=10)  # a new connection each time
        assert response.status_code == 200
        return time.monotonic() - started

    with served:
        timed_request()  # warm
        alone = [timed_request() for _ in range(10)]
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        opened = time.monotonic()
        line = f"GET /v1/model HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: {'a' * 100}".encode()
        stop = threading.Event()

        def trickle() -> None:
            for i in range(len(line)):
                for sock in slow:
                    try:
                        sock.send(line[i:i + 1])
                    except OSError:
                        pass
                if stop.wait(header_timeout_s / 2):  # never idle for as long as the deadline
                    return

        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        time.sleep(0.2)
        during = []
        while time.monotonic() - opened < header_timeout_s - 0.3:  # before any slow one is dropped
            during.append(timed_request())
        # every slow connection is closed by the server soon after the deadline
        dropped_by = opened + header_timeout_s + 2.0
        dropped = 0
        for sock in slow:
            sock.settimeout(max(0.01, dropped_by - time.monotonic()))
            try:
                dropped += sock.recv(1024) == b""
            except ConnectionResetError:
                dropped += 1
            except socket.timeout:
                pass
        stop.set()
        for sock in slow:
            sock.close()
        after = timed_request()
    with capsys.disabled():
        print(f"\nnormal request: median {median(alone) * 1000:.1f} ms alone, {median(during) * 1000:.1f} ms "
              f"(max {max(during) * 1000:.1f} ms, {len(during)} requests) beside 200 tricklers; "
              f"{dropped}/200 dropped within {header_timeout_s + 2:.0f} s")
    assert dropped == 200
    assert len(during) >= 3 and median(during) < 5 * median(alone) + 0.2 and max(during) < 2.0
    assert after < 2.0


# --- fairness between keys --------------------------------------------------------------------

def test_one_busy_key_cannot_shut_out_another():
    """Key A opens its per-key cap and keeps stepping and looking from several threads;
    key B still opens and steps a session."""
    limits = ServerLimits(max_sessions=4)  # two keys: 2 sessions each by default
    with app_in_thread(create_app(NumpyModel(1, "numpy-cloud"), api_keys=[KEY_A, KEY_B], limits=limits)) as url, \
            httpx.Client(base_url=url, headers=AUTH_A, timeout=30) as a:
        sids = [a.post("/v1/sessions", json=open_body(1000)).json()["session_id"] for _ in range(2)]
        refused = a.post("/v1/sessions", json=open_body())
        body = assert_error(refused, 429, "too_many_sessions_for_key")
        assert "maximum of 2" in body["message"] and int(refused.headers["Retry-After"]) >= 1
        assert a.get("/v1/model").json()["limits"]["max_sessions_per_key"] == 2
        stop, statuses = threading.Event(), Counter()

        def hammer(i: int) -> None:
            with httpx.Client(base_url=url, headers=AUTH_A, timeout=30) as http:
                while not stop.is_set():
                    path = f"/v1/sessions/{sids[i % 2]}/step"
                    statuses[http.post(path, json={"tokens": [65], "top_k": 4}).status_code] += 1
                    statuses[http.post(path, json={"tokens": []}).status_code] += 1

        with ThreadPoolExecutor(4) as pool:
            busy = [pool.submit(hammer, i) for i in range(4)]
            time.sleep(0.5)
            try:
                with httpx.Client(base_url=url, headers=AUTH_B, timeout=30) as b:
                    opened = b.post("/v1/sessions", json=open_body())
                    assert opened.status_code == 200, opened.text
                    path = f"/v1/sessions/{opened.json()['session_id']}/step"
                    for token in (65, 66, 67):
                        assert b.post(path, json={"tokens": [token]}).status_code == 200
            finally:
                stop.set()
            for future in busy:
                future.result()
        assert statuses[200] > 20 and set(statuses) <= {200, 409}, statuses


def test_a_second_step_on_a_busy_session_is_refused_at_once(model: HookedModel):
    with app_in_thread(create_app(model)) as url, httpx.Client(base_url=url, timeout=30) as http:
        sid = http.post("/v1/sessions", json=open_body()).json()["session_id"]
        pause = model.at_advance.arm()
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(http.post, f"/v1/sessions/{sid}/step", json={"tokens": [65]})
            assert pause.reached.wait(10)  # the first step computes
            try:
                started = time.monotonic()
                second = httpx.post(f"{url}/v1/sessions/{sid}/step", json={"tokens": [66]}, timeout=2)
                assert_error(second, 409, "session_busy")
                assert time.monotonic() - started < 1.9  # not after the first step (never, here)
                assert httpx.post(f"{url}/v1/sessions/{sid}/step", json={"tokens": []}, timeout=2).status_code == 200
            finally:
                pause.go.set()
            assert first.result().status_code == 200


def test_looks_do_not_keep_a_session_alive_but_steps_do():
    clock = SkippingClock()  # each 0.25 s between requests passes at once
    with app_in_thread(create_app(NumpyModel(1), limits=ServerLimits(session_ttl_s=1), clock=clock)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        looked, stepped = (http.post("/v1/sessions", json=open_body(100)).json()["session_id"] for _ in range(2))
        started = clock()
        while clock() - started < 1.6:
            clock.skip(0.25)
            last_look = http.post(f"/v1/sessions/{looked}/step", json={"tokens": []})
            assert http.post(f"/v1/sessions/{stepped}/step", json={"tokens": [65]}).status_code == 200
        assert_error(last_look, 404, "unknown_session")  # looked at, never moved: expired
        assert http.post(f"/v1/sessions/{stepped}/step", json={"tokens": []}).status_code == 200


def test_a_session_is_closed_at_its_maximum_age_however_busy():
    limits = ServerLimits(session_ttl_s=300, session_max_age_s=1)
    clock = SkippingClock()  # each 0.1 s between steps passes at once
    with app_in_thread(create_app(NumpyModel(1), limits=limits, clock=clock)) as url, \
            httpx.Client(base_url=url, timeout=30) as http:
        sid = http.post("/v1/sessions", json=open_body(100)).json()["session_id"]
        started, statuses = clock(), []
        while clock() - started < 1.5:
            statuses.append(http.post(f"/v1/sessions/{sid}/step", json={"tokens": [65]}).status_code)
            clock.skip(0.1)
        assert statuses[0] == 200 and statuses[-1] == 404
        health = http.get("/healthz").json()
        assert health["sessions"] == 0 and health["kv_tokens"] == 0


# --- /healthz ------------------------------------------------------------------------------------

def test_healthz_tells_details_to_key_holders_only():
    with app_in_thread(create_app(NumpyModel(1), api_keys=[KEY_A])) as url:
        assert httpx.get(url + "/healthz").json() == {"ok": True}
        assert httpx.get(url + "/healthz", headers={"Authorization": "Bearer " + "x" * 20}).json() == {"ok": True}
        assert httpx.get(url + "/healthz", headers=AUTH_A).json()["sessions"] == 0
    with app_in_thread(create_app(NumpyModel(1))) as url:  # no keys: nothing to hold back from anyone
        assert httpx.get(url + "/healthz").json()["sessions"] == 0


# --- a failing compute thread -------------------------------------------------------------------

class ShortRowsModel(NumpyModel):
    """Its batch engine, once armed, holds a batch until `go`, then returns a row too few."""

    def __init__(self) -> None:
        super().__init__(1, "numpy-cloud")
        self.armed, self.reached, self.go = False, threading.Event(), threading.Event()

    def batch_engine(self, slots: int, slot_tokens: int, max_batch: int | None = None) -> NumpyBatchEngine:
        model = self

        class Short(NumpyBatchEngine):
            def decode(self, entries):
                rows = super().decode(entries)
                if model.armed:
                    model.reached.set()
                    model.go.wait(10)
                    return rows[:-1]
                return rows
        return Short(self, slots, slot_tokens, max_batch or 3)


def wait_until(condition, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def check_failure_fails_everyone(url: str, app, release, pending: list, capsys, label: str) -> None:
    """Once released, every waiting request is a clean 500 within seconds; then /healthz
    is 503 {"ok": false} and new work a 503."""
    scheduler = app.state.scheduler
    wait_until(lambda: len(scheduler._decodes) + len(scheduler._prefills) + len(scheduler._jobs) >= len(pending) - 1)
    released = time.monotonic()
    release()
    answers = [future.result(timeout=10) for future in pending]
    took = max(at for _, at in answers) - released
    for response, _ in answers:
        assert_error(response, 500, "internal_error")
        assert "alice" not in response.text
    assert took < 3.0, took  # not the 10 s a waiting request would sit out
    down = httpx.get(url + "/healthz", timeout=2)
    assert down.status_code == 503 and down.json() == {"ok": False}
    assert_error(httpx.post(url + "/v1/sessions", json=open_body(), timeout=2), 503, "unavailable")
    with capsys.disabled():
        print(f"\n{label}: {len(answers)} waiting requests answered 500 {took * 1000:.0f} ms after the fault")


def test_a_batch_with_missing_rows_fails_every_waiting_request(capsys):
    model = ShortRowsModel()
    app = create_app(model)
    with app_in_thread(app) as url, ThreadPoolExecutor(4) as pool:
        sids = [httpx.post(url + "/v1/sessions", json=open_body()).json()["session_id"] for _ in range(2)]
        model.armed = True

        def post(path: str, body: dict) -> tuple[httpx.Response, float]:
            response = httpx.post(url + path, json=body, timeout=10)
            return response, time.monotonic()

        pending = [pool.submit(post, f"/v1/sessions/{sids[0]}/step", {"tokens": [65]})]
        assert model.reached.wait(10)  # a batch is in the engine; a step and an open queue behind it
        pending += [pool.submit(post, f"/v1/sessions/{sids[1]}/step", {"tokens": [65]}),
                    pool.submit(post, "/v1/sessions", open_body())]
        check_failure_fails_everyone(url, app, model.go.set, pending, capsys, "short batch")


def test_an_exception_in_the_compute_loop_fails_every_waiting_request(capsys, caplog):
    app = create_app(NumpyModel(1))
    reached, go = threading.Event(), threading.Event()

    def broken_tick(*_) -> None:
        reached.set()
        go.wait(10)
        raise RuntimeError("private: /home/alice/notes.md")

    app.state.scheduler._tick = broken_tick  # the loop's own step, not one job
    with app_in_thread(app) as url, ThreadPoolExecutor(3) as pool, caplog.at_level("ERROR"):
        def post() -> tuple[httpx.Response, float]:
            response = httpx.post(url + "/v1/sessions", json=open_body(), timeout=10)
            return response, time.monotonic()

        pending = [pool.submit(post)]
        assert reached.wait(10)
        pending += [pool.submit(post) for _ in range(2)]
        check_failure_fails_everyone(url, app, go.set, pending, capsys, "loop exception")
    assert any("compute thread failed" in r.getMessage() for r in caplog.records)
    assert not any("alice" in r.getMessage() for r in caplog.records)  # the log names the failure, not its text


def test_stop_gives_up_on_a_stuck_tick_in_bounded_time():
    scheduler = Scheduler(None)
    started, unblock, results = threading.Event(), threading.Event(), []

    def capture(job) -> None:
        try:
            results.append(scheduler.run(job))
        except BaseException as exc:  # noqa: BLE001
            results.append(exc)

    stuck = threading.Thread(target=capture, args=(lambda: (started.set(), unblock.wait(10)),))
    stuck.start()
    assert started.wait(5)
    waiting = threading.Thread(target=capture, args=(lambda: 1,))
    waiting.start()
    wait_until(lambda: scheduler._jobs)
    t0 = time.monotonic()
    assert scheduler.stop(timeout_s=0.5) is False
    assert time.monotonic() - t0 < 1.5
    waiting.join(2)
    assert isinstance(results[0], SchedulerClosed)  # the queued job failed, not left waiting
    unblock.set()
    stuck.join(5)
    assert scheduler.run(lambda: 2) == 2  # a fresh thread computes; the stuck one has gone
    scheduler.close()


# --- the command line -------------------------------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """cmd_serve with its model load and server stubbed: what reached serve()."""
    import costeer.backends
    import costeer.default_models
    import costeer.transport.server.app

    served: list[dict] = []
    monkeypatch.delenv("COSTEER_API_KEY", raising=False)
    monkeypatch.setattr(costeer.default_models, "resolve_model_path", lambda *a: "model")
    monkeypatch.setattr(costeer.backends, "load_model", lambda *a: NumpyModel(1))
    monkeypatch.setattr(costeer.transport.server.app, "serve",
                        lambda model, host, port, keys, limits, max_batch, **kw: served.append(dict(keys=keys, limits=limits, **kw)))
    return served


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("costeer: error: "), err
    return err


def test_serve_refuses_an_open_server_beyond_loopback(no_model, capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "--insecure" in one_error_line(capsys) and not no_model
    assert main(["serve", "--host", "0.0.0.0", "--insecure"]) == 0
    assert "WARNING" in capsys.readouterr().err and no_model[-1]["insecure"] is True
    assert main(["serve", "--host", "0.0.0.0", "--api-key", KEY_A]) == 0 and no_model[-1]["keys"] == (KEY_A,)
    assert main(["serve", "--host", "::1"]) == 0  # loopback: no key needed


@pytest.mark.parametrize("args, env", [
    (["--api-key", "short"], None),
    (["--api-key", "sixteen chars but spaced"], None),
    ([], ","),
    ([], f"{KEY_A},"),
])
def test_serve_refuses_bad_keys_in_one_line(no_model, capsys, monkeypatch, args, env):
    if env is not None:
        monkeypatch.setenv("COSTEER_API_KEY", env)
    assert main(["serve", *args]) == 2
    err = one_error_line(capsys)
    assert "short" not in err and "spaced" not in err and not no_model  # a key is never quoted


def test_serve_takes_keys_from_the_environment(no_model, monkeypatch):
    monkeypatch.setenv("COSTEER_API_KEY", f"{KEY_A},{KEY_B}")
    assert main(["serve", "--max-sessions-per-key", "3", "--session-max-age", "60", "--max-body-bytes", "1000"]) == 0
    assert no_model[-1]["keys"] == (KEY_A, KEY_B)
    limits = no_model[-1]["limits"]
    assert (limits.max_sessions_per_key, limits.session_max_age_s, limits.max_body_bytes) == (3, 60, 1000)
