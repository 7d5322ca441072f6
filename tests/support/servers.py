"""Real servers on loopback for the tests: started as subprocesses, stopped after."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import uvicorn

from costeer.bench.processes import free_port, running  # noqa: F401  (tests import both from here)
from support.commands import costeer_command
from support.early import Entered

TESTS = Path(__file__).resolve().parents[1]  # the folder that holds `support`


def costeer_serve(*args: str, port: int, threads: int = 1, procs: list | None = None) -> contextlib.AbstractContextManager[str]:
    # one thread each: the server and the device share this machine's 2 cores
    return running(costeer_command("serve", "--port", str(port), *args), "/healthz", port,
                   env={"COSTEER_THREADS": str(threads)}, procs=procs)


# `serve` as `costeer serve` runs it, on the NumPy model: argv is the tests folder, port, key,
# and serve()'s keyword options as JSON
_NUMPY_SERVE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from support.fakes import NumpyModel
from costeer.transport.server.limits import ServerLimits
from costeer.transport.server.app import serve
serve(NumpyModel(1, "numpy-cloud"), "127.0.0.1", int(sys.argv[2]), [sys.argv[3]], ServerLimits(), **json.loads(sys.argv[4]))
"""


def numpy_serve(port: int, key: str, procs: list, **options) -> contextlib.AbstractContextManager[str]:
    """costeer's server in a process of its own, as `costeer serve` runs it, on the seeded
    NumPy cloud model with one API key; `options` are serve()'s keyword options."""
    return running([sys.executable, "-c", _NUMPY_SERVE, str(TESTS), str(port), key, json.dumps(options)],
                   "/healthz", port, procs=procs)


@contextlib.contextmanager
def _numpy_served(key: str, options: dict) -> Iterator[tuple[int, subprocess.Popen]]:
    port, procs = free_port(), []
    with numpy_serve(port, key, procs, **options):
        yield port, procs[0]


def numpy_serve_job(key: str, **options) -> Callable[[Path], Entered]:
    """numpy_serve on a free port as an early job (support/early.py): started before its
    test, which gets (port, process) as the value of its `with`."""
    return lambda _folder: Entered(_numpy_served(key, options))


def rss_bytes(pid: int) -> int:
    """A process's resident memory (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


# llama-cpp-python's OpenAI-compatible server, as a third party runs it, except that
# ggml's AMX buffer type is removed first: on this CPU it crashes every llama.cpp
# build (see costeer.backends.llama_cpp.lib._drop_amx_buffer_type).
_LLAMA_SERVER = """
import runpy, sys
from costeer.backends.llama_cpp.lib import load_llama_cpp
load_llama_cpp()
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def llama_cpp_server(model_path: str, port: int) -> contextlib.AbstractContextManager[str]:
    command = [sys.executable, "-c", _LLAMA_SERVER, "--model", model_path, "--port", str(port),
               "--host", "127.0.0.1", "--n_threads", "1", "--logits_all", "true"]
    return running(command, "/v1/models", port)


class QuickStopServer(uvicorn.Server):
    """uvicorn's server (0.54), stopping as it does but polling every 10 ms where it waits
    0.1 s: for `should_exit` between its ticks, and for connections and tasks to end once
    it stops. The suite starts and stops some 150 servers in process: 0.15 s each."""

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            for _ in range(10):
                await asyncio.sleep(0.01)
                if self.should_exit:
                    return
            counter = (counter + 1) % 864_000
            should_exit = await self.on_tick(counter)

    async def shutdown(self, sockets: list | None = None) -> None:
        for server in self.servers:  # stop accepting connections; ask the open ones to close
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        # wait for responses in flight and background tasks, up to the graceful timeout
        timeout = self.config.timeout_graceful_shutdown
        deadline = None if timeout is None else time.monotonic() + timeout
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit:
            if deadline is not None and time.monotonic() > deadline:
                for task in state.tasks:
                    task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
                break
            await asyncio.sleep(0.01)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()


def started_in_thread(server: uvicorn.Server) -> threading.Thread:
    """Run a uvicorn server from a daemon thread of this process; the thread, once the server serves."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("in-thread server did not start")
        time.sleep(0.02)
    return thread


@contextlib.contextmanager
def app_in_thread(app, port: int | None = None) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on loopback from a thread of this process: real
    HTTP and real concurrency, without a model load per test."""
    port = port or free_port()
    server = QuickStopServer(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = started_in_thread(server)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def verbose_in_thread(app, port: int, config: Callable[..., uvicorn.Config] = uvicorn.Config
                      ) -> tuple[uvicorn.Server, threading.Thread]:
    """The app served by uvicorn from a thread at its most verbose level ("trace", with its
    access log), its records going to the root logger (no logging config of its own).
    `config` makes uvicorn's Config: transport.guard.uvicorn_config serves it as costeer's
    own servers do. Stop it with `server.should_exit = True` and a join of the thread."""
    server = uvicorn.Server(config(app, host="127.0.0.1", port=port, log_config=None, log_level="trace",
                                   access_log=True, lifespan="off"))
    return server, started_in_thread(server)
