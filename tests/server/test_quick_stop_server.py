"""tests/support/servers.py's QuickStopServer rewrites two methods of uvicorn's Server (as
of 0.54) to poll every 10 ms instead of sleeping 0.1 s. It must still stop as uvicorn
does: a response in flight is finished, idle connections are closed, new ones are
refused, and a request that outlives the graceful timeout is cancelled. The same
scenarios run through uvicorn's own Server beside it, so an upgrade of uvicorn that
changes what its Server does (or the internals the copy relies on) fails here."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import uvicorn

from support.servers import QuickStopServer, free_port, started_in_thread


def slow_app(started: threading.Event, seconds: float):
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        started.set()
        await asyncio.sleep(seconds)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"done"})
    return app


def serve(kind: type[uvicorn.Server], app, graceful: float | None):
    port = free_port()
    server = kind(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical", lifespan="off",
                                 timeout_graceful_shutdown=graceful))
    return server, started_in_thread(server), port


def in_flight_then_stop(kind: type[uvicorn.Server], seconds: float, graceful: float | None) -> dict:
    started = threading.Event()
    server, thread, port = serve(kind, slow_app(started, seconds), graceful)
    idle = socket.create_connection(("127.0.0.1", port))  # a connection that never sends a request
    outcome: dict = {}

    def request() -> None:
        try:
            outcome["answer"] = httpx.get(f"http://127.0.0.1:{port}/", timeout=10).text
        except httpx.HTTPError as exc:
            outcome["answer"] = type(exc).__name__

    client = threading.Thread(target=request)
    client.start()
    assert started.wait(10)
    server.should_exit = True
    client.join(15)
    thread.join(15)
    idle.settimeout(5)
    outcome["idle closed"] = idle.recv(1) == b""
    idle.close()
    outcome["stopped"] = not thread.is_alive()
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        outcome["refuses new"] = False
    except OSError:
        outcome["refuses new"] = True
    return outcome


@pytest.mark.parametrize("seconds, graceful, answer", [(0.3, None, "done"), (5.0, 0.3, "Internal Server Error")])
def test_it_stops_as_uvicorn_does(seconds, graceful, answer):
    with ThreadPoolExecutor(2) as pool:  # side by side: each mostly waits on its slow request
        ours, theirs = pool.map(lambda kind: in_flight_then_stop(kind, seconds, graceful),
                                (QuickStopServer, uvicorn.Server))
    assert ours == theirs == {"answer": answer, "idle closed": True, "stopped": True, "refuses new": True}
