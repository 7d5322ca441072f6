"""Other busy llama.cpp processes on this machine, so long runs can warn before they start.

On a machine with few cores, two llama.cpp processes decoding at once each get a fraction of
the CPU (here, 2 cores: about 6x slower each). Answers do not change, but an evaluation takes
hours longer and benchmark timings mean nothing. Linux only (reads /proc); elsewhere it finds none.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

# shared libraries that mark a process as running llama.cpp (llama-cpp-python, llama-server, ggml builds)
ENGINE_LIBRARIES = ("libllama", "libggml")
PROC = Path("/proc")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BusyEngine:
    pid: int
    name: str
    cores: float  # CPU cores it used while sampled


def _loads_engine(pid: int) -> bool:
    try:
        with open(PROC / str(pid) / "maps", encoding="utf-8", errors="replace") as maps:
            return any(lib in line for line in maps for lib in ENGINE_LIBRARIES)
    except OSError:  # gone, or another user's process
        return False


def _cpu_seconds(pid: int) -> float | None:
    try:
        stat = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the name in parentheses may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _name(pid: int) -> str:
    # the executable's short name only: another process's arguments may hold private text
    try:
        return (PROC / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def busy_engines(sample_s: float = 0.3, min_cores: float = 0.5) -> list[BusyEngine]:
    """Other processes with llama.cpp loaded that used at least `min_cores` over `sample_s` seconds.

    An idle server (models loaded, no request) is not reported: it costs memory, not speed.
    """
    if not PROC.is_dir():
        return []
    me = os.getpid()
    candidates = [int(p.name) for p in PROC.iterdir()
                  if p.name.isdigit() and int(p.name) != me and _loads_engine(int(p.name))]
    if not candidates:
        return []
    before = {pid: _cpu_seconds(pid) for pid in candidates}
    start = time.monotonic()
    time.sleep(sample_s)
    elapsed = time.monotonic() - start
    busy = []
    for pid, t0 in before.items():
        t1 = _cpu_seconds(pid)
        if t0 is not None and t1 is not None and (t1 - t0) / elapsed >= min_cores:
            busy.append(BusyEngine(pid, _name(pid), (t1 - t0) / elapsed))
    return busy


def warn_if_contended(what: str) -> list[BusyEngine]:
    """Log one warning per busy llama.cpp process; returns them."""
    busy = busy_engines()
    for engine in busy:
        log.warning("costeer %s: warning: another llama.cpp process is busy (pid %s, %.1f cores: %s). On %s cores "
                    "both run several times slower; answers are unchanged, timings are not.",
                    what, engine.pid, engine.cores, engine.name, os.cpu_count())
    return busy
