"""The guard in front of costeer's servers (transport/guard.py): every refusal happens
before the app runs or a body byte is read, with a well-formed error; what passes reaches
the app with its body intact. Header checks are driven over ASGI directly; bodies, slow
clients and the head deadline over real sockets to uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time

import httpx
import pytest
from hypothesis import example, given, settings, strategies as st

from costeer.errors import UserError
from costeer.transport.guard import (Guard, GuardPolicy, check_keys, is_loopback, local_origins, loopback_hosts,
                                     uvicorn_config)
from support.servers import free_port

KEY = "k" * 16 + "-guard-test"
OTHER_KEY = "o" * 16 + "-guard-test"


class Echo:
    """An app that records what reached it and answers with the body's length."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.calls.append({"path": scope["path"], "key": scope["state"].get("api_key"), "body": body})
        payload = str(len(body)).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/plain"), (b"content-length", str(len(payload)).encode())]})
        await send({"type": "http.response.body", "body": payload})


def render(status: int, code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}


def guarded(**policy) -> tuple[Guard, Echo]:
    echo = Echo()
    return Guard(echo, GuardPolicy(**policy), render), echo


def call(app: Guard, method: str = "POST", path: str = "/v1/x", headers: dict | None = None,
         body: bytes = b"{}") -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:9") as client:
            return await client.request(method, path, headers=headers, content=body if method != "GET" else None)
    return asyncio.run(go())


JSON = {"content-type": "application/json"}
AUTH = {**JSON, "authorization": f"Bearer {KEY}"}


def test_a_request_that_passes_reaches_the_app_with_its_body_and_key():
    app, echo = guarded(api_keys=(KEY, OTHER_KEY))
    r = call(app, headers={**JSON, "authorization": f"Bearer {OTHER_KEY}"}, body=b'{"a": 1}')
    assert r.status_code == 200 and r.text == "8"
    assert echo.calls == [{"path": "/v1/x", "key": OTHER_KEY, "body": b'{"a": 1}'}]


@pytest.mark.parametrize("headers, status, code", [
    ({**AUTH, "host": "evil.example"}, 403, "host_not_allowed"),
    ({**AUTH, "host": "evil.example:8008"}, 403, "host_not_allowed"),
    ({**AUTH, "origin": "http://evil.example"}, 403, "origin_not_allowed"),
    ({**AUTH, "origin": "null"}, 403, "origin_not_allowed"),
    (JSON, 401, "unauthorized"),
    ({**JSON, "authorization": "Bearer wrong-key-of-enough-length"}, 401, "unauthorized"),
    ({**JSON, "authorization": KEY}, 401, "unauthorized"),  # not the Bearer scheme
    ({"authorization": f"Bearer {KEY}"}, 415, "unsupported_media_type"),
    ({"authorization": f"Bearer {KEY}", "content-type": "text/plain"}, 415, "unsupported_media_type"),
    ({"authorization": f"Bearer {KEY}", "content-type": "application/x-www-form-urlencoded"}, 415,
     "unsupported_media_type"),
    ({**AUTH, "content-length": "abc"}, 400, "bad_content_length"),
])
def test_refusals_come_before_the_app_in_the_apps_error_shape(headers, status, code):
    app, echo = guarded(api_keys=(KEY,), allowed_hosts=loopback_hosts(),
                        allowed_origins=local_origins(loopback_hosts(), 8008))
    r = call(app, headers=headers)
    assert r.status_code == status and r.json()["error"]["code"] == code
    assert r.headers["connection"] == "close"
    assert echo.calls == [] and app.stats.refused[code] == 1


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1:8008", "[::1]:8008", "LOCALHOST.", "localhost:1"])
def test_loopback_hosts_and_own_origins_pass(host):
    app, echo = guarded(allowed_hosts=loopback_hosts(), allowed_origins=local_origins(loopback_hosts(), 8008))
    r = call(app, headers={**JSON, "host": host, "origin": "http://127.0.0.1:8008"})
    assert r.status_code == 200 and len(echo.calls) == 1


def test_json_with_a_charset_passes_and_a_get_needs_no_content_type():
    app, echo = guarded()
    assert call(app, headers={"content-type": "Application/JSON; charset=utf-8"}).status_code == 200
    assert call(app, "GET").status_code == 200 and len(echo.calls) == 2


def test_open_paths_need_no_key_but_recognise_one():
    app, echo = guarded(api_keys=(KEY,))
    assert call(app, "GET", "/healthz").status_code == 200
    assert call(app, "GET", "/healthz", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert call(app, "GET", "/v1/models").status_code == 401
    assert [c["key"] for c in echo.calls] == [None, KEY]


def test_a_declared_body_over_the_cap_is_refused_unread():
    app, echo = guarded(max_body_bytes=100)
    assert call(app, headers=JSON, body=b"x" * 100).status_code == 200
    r = call(app, headers=JSON, body=b"x" * 101)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large" and len(echo.calls) == 1


def test_the_in_flight_cap_answers_503_with_retry_after():
    release = asyncio.Event()

    async def slow(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    app = Guard(slow, GuardPolicy(require_json=False, max_in_flight=2), render)

    async def go() -> list[int]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            first = [asyncio.create_task(client.get("/")) for _ in range(2)]
            await asyncio.sleep(0.05)
            third = await client.get("/")
            release.set()
            return [third.status_code, third.headers.get("retry-after")] + [(await t).status_code for t in first]
    assert asyncio.run(go()) == [503, "1", 200, 200]
    assert app.stats.in_flight == 0


@given(st.text(max_size=40))
@example("toke")  # a substring of the message's own advice
@settings(max_examples=200, deadline=None)
def test_check_keys_accepts_exactly_printable_ascii_of_16_or_more(key):
    ok = len(key) >= 16 and all(0x21 <= ord(c) <= 0x7E for c in key)
    try:
        assert check_keys([key]) == (key,) and ok
    except UserError as exc:
        # the message never quotes the key: a stand-in of the same length and kind gets the same one
        # (a substring test fails on keys such as 'toke', which the message's own advice contains)
        printable = bool(key) and all(0x21 <= ord(c) <= 0x7E for c in key)
        with pytest.raises(UserError) as stand_in:
            check_keys(["x" * len(key) if printable else " "])
        assert not ok and str(exc) == str(stand_in.value)


@pytest.mark.parametrize("host, loopback", [("127.0.0.1", True), ("127.8.0.1", True), ("localhost", True),
                                            ("::1", True), ("[::1]", True), ("0.0.0.0", False), ("::", False),
                                            ("192.168.1.4", False), ("example.com", False), ("10.0.0.1", False)])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


# --- over real sockets ---------------------------------------------------------------------

class _InThread:
    def __init__(self, app, **options) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", self.port, lifespan="off", **options))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "_InThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive()
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def _raw(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def _response(s: socket.socket) -> bytes:
    """One whole response with a Content-Length from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += s.recv(65536)
    return data


def _closed_without_reply(s: socket.socket) -> bool:
    try:
        return s.recv(100) == b""
    except ConnectionResetError:
        return True


def test_a_chunked_body_is_cut_off_at_the_cap_over_http():
    app, echo = guarded(max_body_bytes=1000)
    with _InThread(app) as srv:
        chunk = b"x" * 600
        head = b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(2)) + b"0\r\n\r\n"
        reply = _raw(srv.port, head + body)
        assert reply.startswith(b"HTTP/1.1 413") and b"body_too_large" in reply and echo.calls == []
        small = b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
        assert _raw(srv.port, small).startswith(b"HTTP/1.1 200")


def test_a_body_that_trickles_past_the_deadline_gets_408():
    app, echo = guarded(body_timeout_s=0.5)
    with _InThread(app) as srv, socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        start = time.monotonic()
        s.sendall(b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 50\r\n\r\n{")
        reply = b""
        while chunk := s.recv(65536):  # the refusal closes the connection
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"body_timeout" in reply
        assert 0.4 < time.monotonic() - start < 3 and echo.calls == []


def test_a_client_that_trickles_its_head_is_dropped_while_others_are_served():
    app, echo = guarded(require_json=False)
    with _InThread(app, header_timeout_s=0.5) as srv:
        slow = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(20)]
        silent = socket.create_connection(("127.0.0.1", srv.port), timeout=5)  # connects, sends nothing
        try:
            start = time.monotonic()
            for tick in range(6):  # a byte every 0.2 s: each alone is never idle for long
                for s in slow:
                    with contextlib.suppress(OSError):  # dropped already
                        s.sendall(b"G" if tick == 0 else b"E")
                assert httpx.get(f"http://127.0.0.1:{srv.port}/", timeout=2).status_code == 200
                time.sleep(0.2)
            for s in slow + [silent]:  # all dropped by the deadline, with nothing answered
                assert _closed_without_reply(s)
            assert time.monotonic() - start < 4
        finally:
            for s in slow + [silent]:
                s.close()
        assert [c["path"] for c in echo.calls] == ["/"] * 6


def test_a_keep_alive_connection_gets_a_fresh_deadline_for_its_next_head():
    app, echo = guarded(require_json=False)
    with _InThread(app, header_timeout_s=0.6, keep_alive_s=5) as srv, \
            socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        for _ in range(3):  # each request's head takes 0.4 s: under the deadline each time
            s.sendall(b"GET / HTTP/1.1\r\n")
            time.sleep(0.4)
            s.sendall(b"Host: 127.0.0.1\r\n\r\n")
            assert _response(s).startswith(b"HTTP/1.1 200")
        assert len(echo.calls) == 3
