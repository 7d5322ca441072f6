"""The library's notices and warnings go through `logging` (logger "costeer"); only the CLI
prints. Used from Python with no logging set up, warnings still reach stderr, word for
word; under `costeer`, INFO and above do, in the text the library once printed."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from costeer.cli import _library_messages_on_stderr

HTTP_KEY_WARNING = ("costeer: warning: the API key goes to 10.0.0.7 over plain http://, readable by anyone on the "
                    "network path; use https://\n")


def _a_program_warned(_folder) -> subprocess.CompletedProcess:
    """A Python program that sets up no logging, made to warn by the library."""
    code = "from costeer.transport.wire import WireClient; WireClient('http://10.0.0.7', api_key='k' * 16).close()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.early.with_args(_a_program_warned)  # begun when the session starts (support/early.py)
def test_python_without_logging_set_up_shows_library_warnings_on_stderr_verbatim(early_result):
    # a real process: under pytest the root logger has handlers, so the last resort never runs
    done = early_result()
    assert done.returncode == 0 and done.stdout == "" and done.stderr == HTTP_KEY_WARNING


def test_the_cli_prints_info_and_warnings_once_each_as_plain_lines_and_then_lets_go(capsys):
    logger = logging.getLogger("costeer")
    before = (list(logger.handlers), logger.level)
    with _library_messages_on_stderr():
        logging.getLogger("costeer.evaluation.runner").info("costeer eval: 1 of 2 answers were already in x; wrote 1")
        logging.getLogger("costeer.transport.wire").warning("costeer: warning: %s", "careful")
        logging.getLogger("costeer.api").debug("not shown")
    assert capsys.readouterr().err == "costeer eval: 1 of 2 answers were already in x; wrote 1\ncosteer: warning: careful\n"
    assert (list(logger.handlers), logger.level) == before
    logging.getLogger("costeer.bench.speed").info("[bench 00:00:00] after the command: not shown")
    assert capsys.readouterr().err == ""
