"""Which machine made a row: its CPU and the inference builds, as 8 hex digits.

llama-cpp-python is compiled for the CPU it is installed on, and two builds can round a
near tie apart, so the same greedy request can give another answer on another machine.
A folder resumed elsewhere then mixes the two; each row records where it was made, and
the report says how many machines a folder's rows came from.
"""

from __future__ import annotations

import hashlib
import platform
from functools import cache
from importlib import metadata
from pathlib import Path

BUILDS = ("llama-cpp-python", "torch")  # the packages whose arithmetic decides the answers


def _cpu() -> list[str]:
    """The CPU's model name and feature flags (Linux), else what `platform` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return [platform.processor()]
    fields = {}
    for line in lines:
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("model name", "flags", "Features", "CPU part"):
            fields.setdefault(key.strip(), value.strip())
    return [f"{k}: {v}" for k, v in sorted(fields.items())] or [platform.processor()]


@cache
def machine_fingerprint() -> str:
    versions = []
    for name in BUILDS:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    text = "\n".join([platform.machine(), *_cpu(), *versions])
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:8]
