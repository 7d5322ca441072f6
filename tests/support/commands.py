"""The `costeer` command line, as a shell runs it: a subprocess of this Python."""

from __future__ import annotations

import os
import subprocess
import sys


def costeer_command(*args: str) -> list[str]:
    """The argv of `costeer ARGS`, run by this interpreter."""
    return [sys.executable, "-m", "costeer.cli", *args]


def costeer(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`costeer ARGS` to its end: exit status, stdout and stderr (unbuffered)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(costeer_command(*args), capture_output=True, text=True, timeout=timeout, env=env)
