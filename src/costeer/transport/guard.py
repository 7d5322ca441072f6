"""The front door of costeer's HTTP servers: checks made before any body byte is read.

`costeer serve` (the cloud) and `costeer proxy` (the device, which holds the private
context) both sit behind `Guard`, a plain ASGI middleware. In order it refuses:

- a `Host` that is not allowed (403): a web page that rebinds its own DNS name to
  127.0.0.1 sends its own name as Host (DNS rebinding, as in CVE-2024-28224);
- an `Origin` that is not allowed (403): no cross-site page may call the API;
- a missing or wrong key (401), compared in constant time against every key;
- a POST, PUT or PATCH that is not `application/json` (415): a browser sends
  `text/plain` and form bodies without a CORS preflight (blind requests, CSRF);
- a declared body over the cap (413), unread; too many requests at once (503).

Then it reads the body itself, counting it as it arrives (a chunked body is cut off at
the cap: 413) under a deadline (408), and replays it to the app. Early refusals say
`Connection: close`, so an unread body is dropped with the connection, not drained.

`serve_app` runs an app with uvicorn plus what uvicorn lacks: a deadline on each
request's head, so clients that trickle their headers (slowloris) are dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable, MutableMapping

from ..errors import UserError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
# status, code, message -> the JSON error body in the app's own shape
ErrorRenderer = Callable[[int, str, str], dict]

MIN_KEY_CHARS = 16
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True)
class GuardPolicy:
    api_keys: tuple[str, ...] = ()  # empty: no key asked
    # served without a key; a valid key sent there is still recognised (request.state.api_key)
    open_paths: frozenset[str] = frozenset({"/healthz"})
    # hostnames (lowercase, no port, IPv6 without brackets); None: any Host
    allowed_hosts: frozenset[str] | None = None
    # "scheme://host[:port]"; a request with an Origin not in it is refused; None: not checked
    allowed_origins: frozenset[str] | None = frozenset()
    require_json: bool = True
    max_body_bytes: int = 2 * 2**20
    body_timeout_s: float = 30.0
    max_in_flight: int | None = None  # requests handled at once; None: no cap
    # appended to the 403 messages: how this server's own command widens its allow-lists
    host_hint: str = ""
    origin_hint: str = ""

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.body_timeout_s <= 0:
            raise UserError("the body cap and the body timeout must be positive")


@dataclass
class GuardStats:
    refused: Counter = field(default_factory=Counter)  # error code -> requests refused with it
    in_flight: int = 0


class _Refusal(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers or {}


class Guard:
    """ASGI middleware: `policy`'s checks before `app` sees the request. The matched key
    (None without one) is put in scope["state"]["api_key"]: request.state.api_key."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy, render: ErrorRenderer) -> None:
        self.app, self.policy, self.render = app, policy, render
        self.stats = GuardStats()
        self._keys = [k.encode() for k in policy.api_keys]

    def __getattr__(self, name: str) -> Any:  # app.state, app.openapi(), ...: the wrapped app's
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":  # lifespan passes; this API has no websockets
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        try:
            self._check_head(scope, headers)
        except _Refusal as refusal:
            await self._refuse(send, refusal)
            return
        cap = self.policy.max_in_flight
        if cap is not None and self.stats.in_flight >= cap:
            await self._refuse(send, _Refusal(503, "overloaded", f"the server is handling its maximum of {cap} "
                                              "requests; retry shortly", {"Retry-After": "1"}))
            return
        self.stats.in_flight += 1
        try:
            if scope["method"] in BODY_METHODS or "content-length" in headers or "transfer-encoding" in headers:
                try:
                    body = await self._read_body(receive, headers)
                except _Refusal as refusal:
                    await self._refuse(send, refusal)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send)
        finally:
            self.stats.in_flight -= 1

    def _check_head(self, scope: Scope, headers: dict[str, str]) -> None:
        p = self.policy
        if p.allowed_hosts is not None and host_name(headers.get("host", "")) not in p.allowed_hosts:
            raise _Refusal(403, "host_not_allowed", "this server does not answer to that Host name" + p.host_hint)
        origin = headers.get("origin")
        if p.allowed_origins is not None and origin is not None and origin.lower().rstrip("/") not in p.allowed_origins:
            raise _Refusal(403, "origin_not_allowed", "cross-origin requests are refused" + p.origin_hint)
        scope.setdefault("state", {})["api_key"] = key = self._key(headers.get("authorization", ""))
        if self._keys and key is None and scope["path"] not in p.open_paths:
            raise _Refusal(401, "unauthorized", "a valid API key is required (Authorization: Bearer KEY)",
                           {"WWW-Authenticate": "Bearer"})
        if p.require_json and scope["method"] in BODY_METHODS:
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                raise _Refusal(415, "unsupported_media_type", "the body must be JSON, sent with "
                               "Content-Type: application/json")
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                raise _Refusal(400, "bad_content_length", "Content-Length is not a number")
            if int(declared) > p.max_body_bytes:
                raise _Refusal(413, "body_too_large", f"the body's {int(declared)} bytes exceed this server's limit "
                               f"of {p.max_body_bytes}")

    def _key(self, authorization: str) -> str | None:
        if not self._keys or not authorization[:7].lower() == "bearer ":
            return None
        given = authorization[7:].strip().encode("latin-1", "replace")
        # every key is compared, so the time taken does not depend on which one matched
        matches = [i for i, key in enumerate(self._keys) if hmac.compare_digest(given, key)]
        return self.policy.api_keys[matches[0]] if matches else None

    async def _read_body(self, receive: Receive, headers: dict[str, str]) -> bytes:
        cap, parts, size = self.policy.max_body_bytes, [], 0
        try:
            async with asyncio.timeout(self.policy.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Refusal(400, "client_disconnected", "the client left before sending its body")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > cap:
                        raise _Refusal(413, "body_too_large", f"the body exceeds this server's limit of {cap} bytes")
                    parts.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(parts)
        except TimeoutError:
            raise _Refusal(408, "body_timeout", f"the body did not arrive within {self.policy.body_timeout_s:g} s") from None

    async def _refuse(self, send: Send, refusal: _Refusal) -> None:
        self.stats.refused[refusal.code] += 1
        body = json.dumps(self.render(refusal.status, refusal.code, refusal.message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
        await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _headers(scope: Scope) -> dict[str, str]:
    """The request's headers by lowercase name (the first of repeated ones)."""
    out: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        out.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
    return out


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body once, then the connection's own messages (a disconnect, while a response streams)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replayed


def host_name(host: str) -> str:
    """A Host header's name: lowercase, without port, brackets or a trailing dot."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":")[0]
    return host.rstrip(".")


# --- keys and addresses -------------------------------------------------------------

def check_keys(keys: Iterable[str], label: str = "API key #{n}") -> tuple[str, ...]:
    """Keys as given, or a UserError: printable ASCII without spaces, at least 16 characters.
    `label` names the key in the message ({n}: its position); the message never quotes it."""
    out = tuple(keys)
    for n, key in enumerate(out, 1):
        name = label.format(n=n)
        if not key or not all(0x21 <= ord(c) <= 0x7E for c in key):
            raise UserError(f"{name} must be printable ASCII without spaces (an HTTP header cannot carry it "
                            "otherwise)")
        if len(key) < MIN_KEY_CHARS:
            raise UserError(f"{name} has {len(key)} characters; use at least {MIN_KEY_CHARS} (python -c "
                            "\"import secrets; print(secrets.token_urlsafe(32))\" makes one)")
    return out


def is_loopback(host: str) -> bool:
    """A bind address or Host name that only this machine can reach."""
    name = host.strip().lower() if not host.startswith("[") and host.count(":") > 1 else host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def loopback_hosts() -> frozenset[str]:
    return frozenset({"localhost", "127.0.0.1", "::1"})


def local_origins(hosts: Iterable[str], port: int) -> frozenset[str]:
    """The origins of a page served by the app itself, at each of `hosts`."""
    return frozenset(f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}" for h in hosts)


# --- uvicorn with a deadline on request heads ------------------------------------------

def _deadline_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol, plus: a request's head must arrive within header_timeout_s
    of the connection opening, or of the previous response (uvicorn times out idle
    keep-alive connections, but not a client that sends a byte now and then)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeadDeadlineH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _waiting_for_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(header_timeout_s, self._head_too_slow)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            self._head_timer = None
            if self._waiting_for_head() and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._waiting_for_head():
                self._arm()
            super().data_received(data)
            if not self._waiting_for_head():
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._disarm()  # idle until the next request: uvicorn's keep-alive timeout governs

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeadDeadlineH11


def uvicorn_config(app: ASGIApp, host: str, port: int, *, header_timeout_s: float = 10.0, keep_alive_s: float = 5.0,
                   max_connections: int = 1000, shutdown_timeout_s: float = 5.0, **extra: Any):
    import uvicorn

    extra.setdefault("log_level", "warning")
    return uvicorn.Config(app, host=host, port=port, http=_deadline_protocol(header_timeout_s),
                          limit_concurrency=max_connections, timeout_keep_alive=keep_alive_s,
                          timeout_graceful_shutdown=shutdown_timeout_s, **extra)


def serve_app(app: ASGIApp, host: str, port: int, **options: Any) -> None:
    """Run `app` until interrupted (options: uvicorn_config's)."""
    import uvicorn

    uvicorn.Server(uvicorn_config(app, host, port, **options)).run()
