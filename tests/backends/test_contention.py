"""The warning about other busy llama.cpp processes: real processes, and a fake /proc for the parsing."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from costeer.bench import contention

pytestmark = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux /proc")

SECRET = "PRIVATE-PROFILE-TEXT-7d1c"
# `import llama_cpp` maps libllama and libggml, as every llama-cpp-python process does; argv holds a secret
_CHILD = "import sys, time, llama_cpp\nprint('ready', flush=True)\nend = time.time() + 30\n{body}"
BUSY = "while time.time() < end: pass"
IDLE = "time.sleep(30)"


def _start(code: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", code, SECRET], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []
    yield lambda code: started.append(_start(code)) or started[-1]
    for child in started:
        child.kill()
        child.wait()


def test_a_busy_llama_process_is_reported_without_its_arguments(children, library_stderr, monkeypatch):
    busy = children(_CHILD.format(body=BUSY))
    # a long sample and a low bar, so a loaded machine (the child gets a share of a core) passes too
    found = {e.pid: e for e in contention.busy_engines(sample_s=1.0, min_cores=0.1)}
    assert busy.pid in found
    engine = found[busy.pid]
    assert engine.name == Path(f"/proc/{busy.pid}/comm").read_text().strip()
    monkeypatch.setattr(contention, "busy_engines", lambda: [engine])
    assert contention.warn_if_contended("eval") == [engine]
    err = library_stderr()
    assert f"pid {busy.pid}" in err and "warning" in err and engine.name in err
    assert SECRET not in err  # another process's argv may hold private text: only its short name is shown


def test_idle_llama_process_and_busy_plain_process_are_not_reported(children):
    idle = children(_CHILD.format(body=IDLE))
    plain = children(_CHILD.replace("import sys, time, llama_cpp", "import sys, time").format(body=BUSY))
    pids = {e.pid for e in contention.busy_engines()}
    assert idle.pid not in pids  # loaded but waiting: costs memory, not speed
    assert plain.pid not in pids  # busy, but not llama.cpp
    assert os.getpid() not in pids


def _fake_proc(root: Path, pid: int, maps: str, comm: str, ticks: int) -> None:
    d = root / str(pid)
    d.mkdir(parents=True, exist_ok=True)
    (d / "maps").write_text(maps)
    (d / "comm").write_text(comm + "\n")
    # field 2 is the name in parentheses, which may itself hold spaces and ')'; utime, stime are fields 14, 15
    (d / "stat").write_text(f"{pid} ({comm} x) y) S 1 1 1 0 -1 0 0 0 0 0 {ticks} {ticks} 0 0 20 0 1 0\n")


def test_parsing_and_threshold_on_a_fake_proc(tmp_path, monkeypatch):
    lib = "7f00-7f01 r-xp 0 08:01 1 /venv/llama_cpp/lib/libggml-base.so\n"
    _fake_proc(tmp_path, 101, lib, "llama-server", 0)  # will use 1 core
    _fake_proc(tmp_path, 102, lib, "slow one", 0)  # will use 0.1 core
    _fake_proc(tmp_path, 103, "7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n", "busy", 0)
    (tmp_path / "self").mkdir()  # non-numeric entries are skipped
    hz = os.sysconf("SC_CLK_TCK")
    clock = iter([0.0, 1.0])

    def sleep(_s: float) -> None:  # one second passes, and the fake processes run
        _fake_proc(tmp_path, 101, lib, "llama-server", hz // 2)
        _fake_proc(tmp_path, 102, lib, "slow one", hz // 20)
        _fake_proc(tmp_path, 103, "/usr/lib/libc.so.6\n", "busy", hz)

    monkeypatch.setattr(contention, "PROC", tmp_path)
    monkeypatch.setattr(contention.time, "sleep", sleep)
    monkeypatch.setattr(contention.time, "monotonic", lambda: next(clock))
    found = contention.busy_engines()
    assert [(e.pid, e.name) for e in found] == [(101, "llama-server")]
    assert found[0].cores == pytest.approx(1.0, abs=2 / hz)


def test_no_proc_means_no_warning(tmp_path, monkeypatch, library_stderr):
    monkeypatch.setattr(contention, "PROC", tmp_path / "absent")
    assert contention.warn_if_contended("bench") == []
    assert library_stderr() == ""
