"""The `costeer` command as a user runs it: real subprocesses, real models. Mistakes run
cli.main in this process (conftest.costeer_in_process: a Python start less each), except
the one found only after the real models load, which runs in a real process: the entry
point, the exit status and Python's own logging defaults, as a shell meets them (begun
when the session starts: support/early.py)."""

from __future__ import annotations

import json

import pytest

from support.commands import costeer
from support.example_profile import BIRTHDAY_PROMPT, EXAMPLE_PROFILE, facts_in

EMPTY_PROMPT = ["generate", "--prompt", "   "]  # refused only after both default models have loaded


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--prompt", "hi", "--context", "/nonexistent/profile.md"], "context file not found"),
        (["generate", "--prompt", "hi", "--method", "magic"], "unknown method"),
        (["generate", "--prompt", "hi", "--method", "mix:abc"], "finite number"),
        (["generate", "--prompt", "hi", "--iterations", "0"], "iterations"),
        (["generate", "--prompt", "hi", "--lambda", "0"], "lambda"),
        (["generate", "--prompt", "hi", "--eta", "-1"], "eta"),
        (["generate", "--prompt", "hi", "--alpha", "nan"], "finite"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "max-new-tokens"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "hi", "--top-p", "2"], "top-p"),
        (["generate", "--prompt", "hi", "--llm", "/nonexistent/model.gguf"], "model not found"),
        pytest.param(EMPTY_PROMPT, "prompt is empty",
                     marks=pytest.mark.early.with_args(lambda _folder: costeer(*EMPTY_PROMPT, timeout=120))),
        (["generate"], "--prompt"),
        (["score", "--prompt", "hi"], "nothing to score"),
        (["score", "--prompt", "hi", "--answer", "x", "--methods", "magic"], "unknown method"),
        (["score", "--prompt", "hi", "--answer", "x", "--methods", " , "], "--methods is empty"),
        (["score", "--prompt", "hi", "--answer-file", "/nonexistent/answer.txt"], "cannot read"),
        (["score", "--prompt", "hi", "--answer", "x", "--iterations", "0"], "iterations"),
        (["fly"], "invalid choice"),
        (["bench", "--rtt-ms", "fast"], "--rtt-ms"),
        (["bench", "--rtt-ms", "-5"], "--rtt-ms"),
        (["bench", "--lookahead", "9,9"], "depth must be"),
        (["bench", "--lookahead", "3,1,2"], "MIN_P"),
        (["bench", "--lookahead", "auto"], "DEPTH,WIDTH"),
        (["generate", "--prompt", "hi", "--lookahead", "2,4"], "remote cloud"),
    ],
)
def test_user_mistakes_exit_nonzero_with_one_line_and_no_traceback(args, message, costeer_in_process, request,
                                                                  early_result):
    in_a_process = request.node.get_closest_marker("early") is not None  # a real process: `costeer ARGS`
    result = early_result() if in_a_process else costeer_in_process(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


@pytest.mark.parametrize("content, message", [(b"", "is empty"), (b"  \n\t\n", "is empty"),
                                              (b"\x7fELF\x02\x01\x00\x00secret", "binary"),
                                              (b"caf\xe9 secret", "not UTF-8"), (None, "the limit is")])
def test_bad_context_files_are_one_line_errors_that_quote_nothing(tmp_path, content, message, costeer_in_process):
    path = tmp_path / "notes.txt"
    if content is None:  # a huge file, sparse: refused before it is read
        with open(path, "wb") as f:
            f.truncate(17 * 1024 * 1024)
    else:
        path.write_bytes(content)
    result = costeer_in_process("generate", "--prompt", "hi", "--context", str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "secret" not in result.stderr, result.stderr


def test_invalid_json_context_names_the_position_but_not_the_content(tmp_path, costeer_in_process):
    secret = tmp_path / "notes.json"
    secret.write_text('{"diary": "my secret canary-7731 text", }', encoding="utf-8")
    result = costeer_in_process("generate", "--prompt", "hi", "--context", str(secret))
    assert result.returncode == 2 and "not valid JSON (line 1" in result.stderr
    assert "canary-7731" not in result.stderr


@pytest.mark.models
def test_generate_json_is_one_object_with_the_documented_fields():
    result = costeer("generate", "--prompt", BIRTHDAY_PROMPT, "--context", str(EXAMPLE_PROFILE),
                     "--max-new-tokens", "80", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # exactly one JSON document on stdout
    for key in ("text", "method", "new_tokens", "elapsed_s", "tokens_per_second"):
        assert key in out
    assert out["method"] == "costeer" and 0 < out["new_tokens"] <= 80 and out["tokens_per_second"] > 0
    assert len(facts_in(out["text"])) >= 2, out["text"]


@pytest.mark.models
def test_generate_streams_plain_text_and_reports_speed_on_stderr(tmp_path):
    notes = tmp_path / "me.json"
    notes.write_text(json.dumps({"name": "Thaddeus", "city": "Tromsø"}), encoding="utf-8")
    result = costeer("generate", "--prompt", "Say hello to me by name.", "--context", str(notes),
                     "--context-text", "I love ice sculpting.", "--max-new-tokens", "12", "--method", "slm-context")
    assert result.returncode == 0, result.stderr
    assert "Thaddeus" in result.stdout
    assert "tok/s" in result.stderr


@pytest.mark.models
@pytest.mark.parametrize("url, message", [
    ("http://127.0.0.1:9", "cannot reach the cloud"),
    ("ftp://example", "cloud URL must be"),
])
def test_unreachable_or_malformed_cloud_is_a_one_line_error(url, message):
    result = costeer("generate", "--prompt", "hi", "--cloud", url, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr


def test_bench_takes_its_data_folder_from_the_caller_only(monkeypatch, capsys, tmp_path):
    from pathlib import Path

    from costeer import cli

    monkeypatch.delenv("COSTEER_DATA", raising=False)
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("costeer: error: ") and "--data DIR" in err
    monkeypatch.setenv("COSTEER_DATA", str(tmp_path))
    assert cli._bench_data(None) == tmp_path / "cogenesis" and cli._bench_data("mine") == Path("mine")
