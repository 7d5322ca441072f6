"""Real servers on loopback for the tests: started as subprocesses, stopped after."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], health_path: str, port: int, env: dict | None = None, timeout_s: float = 120,
            procs: list | None = None) -> Iterator[str]:
    """Start `command`, wait until GET health_path answers, yield the base URL.
    The process is appended to `procs` when given (to check it is still alive)."""
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if procs is not None:
        procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited early: {proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(url + health_path, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not come up in time")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def costeer_serve(*args: str, port: int, threads: int = 1, procs: list | None = None) -> contextlib.AbstractContextManager[str]:
    # one thread each: the server and the device share this machine's 2 cores
    return running([sys.executable, "-m", "costeer.cli", "serve", "--port", str(port), *args], "/healthz", port,
                   env={"COSTEER_THREADS": str(threads)}, procs=procs)


# llama-cpp-python's OpenAI-compatible server, as a third party runs it, except that
# ggml's AMX buffer type is removed first: on this CPU it crashes every llama.cpp
# build (see costeer.backends.llama_cpp_backend._drop_amx_buffer_type).
_LLAMA_SERVER = """
import runpy, sys
from costeer.backends.llama_cpp_backend import _llama
_llama()
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def llama_cpp_server(model_path: str, port: int) -> contextlib.AbstractContextManager[str]:
    command = [sys.executable, "-c", _LLAMA_SERVER, "--model", model_path, "--port", str(port),
               "--host", "127.0.0.1", "--n_threads", "1", "--logits_all", "true"]
    return running(command, "/v1/models", port)


@contextlib.contextmanager
def app_in_thread(app, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on loopback from a thread of this process: real
    HTTP and real concurrency, without a model load per test."""
    import threading

    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-thread server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
