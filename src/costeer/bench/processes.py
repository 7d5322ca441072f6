"""A server started as a subprocess on loopback, waited for, and stopped: for
`costeer bench` (the cloud on its own core) and the tests."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from typing import Iterator

import httpx

from ..errors import UserError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(command: list[str], health_path: str, port: int, env: dict | None = None, timeout_s: float = 120,
            procs: list | None = None, log: str | os.PathLike | None = None) -> Iterator[str]:
    """Start `command`, wait until GET health_path answers, yield the base URL; stop it after.
    The process is appended to `procs` when given (to check it is still alive). Its
    output goes to the file `log` when given (a chatty server would fill a pipe and stall)."""
    sink = open(log, "w") if log else None
    proc = subprocess.Popen(command, env={**os.environ, **(env or {})}, stdout=sink or subprocess.DEVNULL,
                            stderr=sink or subprocess.PIPE, text=True)
    if procs is not None:
        procs.append(proc)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                output = open(log).read() if log else proc.stderr.read()
                raise UserError(f"server exited early (status {proc.returncode}): {output[-2000:]}")
            try:
                if httpx.get(url + health_path, timeout=2).status_code < 500:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise UserError(f"server did not come up within {timeout_s:g} s")
            time.sleep(0.3)
        yield url
    finally:
        stop(proc)
        if sink:
            sink.close()


def stop(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM, and SIGKILL if it has not exited within grace_s."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
