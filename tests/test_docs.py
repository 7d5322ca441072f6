"""The README's commands and example are the ones that actually run."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def fenced(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(block.strip() for block in fenced("bash") if "pytest" in block)
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def test_quick_start_installs_and_runs_the_demo():
    first = fenced("bash")[0].strip()
    assert first.startswith("python3 -m venv .venv") and first.endswith("costeer demo")


@pytest.mark.models
def test_readme_python_example_runs(capsys):
    example = next(block for block in fenced("python") if "CoSteer()" in block)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(example, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "tokens," in out and "tok/s" in out
