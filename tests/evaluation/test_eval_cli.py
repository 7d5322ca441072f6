"""`costeer eval` as a user runs it: a subprocess on the real default models, rerun,
and killed mid-way then resumed."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter

import pytest

from support.cogenesis import CANARY, write_split
from support.commands import costeer, costeer_command


def row_keys(path) -> list[tuple[str, str]]:
    return [(r["id"], r["method"]) for r in map(json.loads, path.read_text().splitlines())]


@pytest.mark.parametrize("args, message", [
    ([], "--dataset"),
    (["--dataset", "preference:concise"], "--out"),
    (["--dataset", "preference:funny", "--out", "x"], "unknown preference 'funny'"),
    (["--dataset", "preference:concise", "--out", "x", "--methods", "llm,magic"], "unknown method 'magic'"),
    (["--dataset", "preference:concise", "--out", "x", "--methods", "mix:lots"], "expected a finite number"),
    (["--dataset", "preference:concise", "--out", "x", "--limit", "0"], "--limit"),
    (["--dataset", "/nonexistent/cogenesis", "--out", "x"], "dataset not found"),
])
def test_eval_mistakes_exit_2_with_one_line(tmp_path, args, message, costeer_in_process):
    args = [str(tmp_path / a) if a == "x" else a for a in args]
    result = costeer_in_process("eval", *args)  # in this process: the subprocess tests below cross its boundary
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.models
def test_eval_on_the_default_models_then_a_rerun_writes_nothing(tmp_path):
    data = write_split(tmp_path / "data", n=3)
    out = tmp_path / "out"
    args = ("--dataset", str(data.parent), "--out", str(out), "--methods", "llm,costeer", "--limit", "2",
            "--max-new-tokens", "8")
    first = costeer("eval", *args)
    assert first.returncode == 0, first.stderr
    assert "costeer eval" in first.stderr and "4/4" in first.stderr  # the progress bar, on stderr
    results = out / "results.jsonl"
    assert row_keys(results) == [("t0", "llm"), ("t0", "costeer"), ("t1", "llm"), ("t1", "costeer")]
    for row in map(json.loads, results.read_text().splitlines()):
        assert 0 < row["new_tokens"] <= 8 and row["tokens_per_second"] > 0 and row["time_to_first_token_s"] > 0
        assert 0 <= row["rougeL"] <= 1 and 0 <= row["meteor"] <= 1 and -1 <= row["semantic"] <= 1
    report = (out / "report.md").read_text()
    assert "| `costeer` | 2 |" in report and first.stdout.strip() == f"report: {out / 'report.md'}"
    # the answers themselves may repeat what the private context says (steering copies it at
    # times: the default pair's costeer answer to t0 opens "Profile canary-5521"); nothing
    # else in the report or the results may
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    answers = {row["text"] for row in rows}
    scrubbed = report
    for text in sorted(answers, key=len, reverse=True):
        scrubbed = scrubbed.replace(text, "")
    assert CANARY not in scrubbed
    assert all(CANARY not in json.dumps({k: v for k, v in row.items() if k != "text"}) for row in rows)

    before = results.read_bytes()
    again = costeer("eval", *args)
    assert again.returncode == 0, again.stderr
    assert "4 of 4 answers were already" in again.stderr
    assert results.read_bytes() == before


@pytest.mark.models
def test_a_killed_run_resumes_with_every_row_exactly_once(tmp_path):
    out = tmp_path / "out"
    args = ("--dataset", "preference:concise", "--out", str(out), "--methods", "llm,cos", "--limit", "2",
            "--max-new-tokens", "8")
    results = out / "results.jsonl"
    proc = subprocess.Popen(costeer_command("eval", *args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while not (results.exists() and results.read_bytes().count(b"\n") >= 1):
            assert proc.poll() is None, "the run ended before its first row"
            assert time.monotonic() < deadline, "no row within 300 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    at_kill = results.read_bytes()
    done = at_kill.count(b"\n")
    assert 1 <= done < 4, "the kill must land mid-run for this test to mean anything"

    resumed = costeer("eval", *args)
    assert resumed.returncode == 0, resumed.stderr
    assert f"{done} of 4 answers were already" in resumed.stderr
    keys = row_keys(results)
    assert Counter(keys) == Counter({(f"concise-{i:02d}", m): 1 for i in range(2) for m in ("llm", "cos")})
    complete = at_kill[: at_kill.rfind(b"\n") + 1]
    assert results.read_bytes().startswith(complete)  # finished rows were kept, not redone
