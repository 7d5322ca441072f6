"""The README's commands and example are the ones that actually run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
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


# --- the manual (docs/, built with MkDocs) -------------------------------------------

DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def test_readme_links_every_docs_page_and_each_link_resolves():
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    local = [t for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]
    for target in local:
        assert (ROOT / target.split("#")[0]).exists(), f"README links to a missing file: {target}"
    linked = {t.split("#")[0] for t in local}
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in linked, f"README does not link docs/{page.name}"


def _build_site(folder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """`mkdocs build --strict` of the manual into folder/site: its outcome, and the site."""
    site = folder / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
         "--site-dir", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    return result, site


@pytest.mark.early.with_args(_build_site)  # begun when the session starts (support/early.py)
def test_mkdocs_builds_strict_and_readme_anchors_exist(early_result):
    import importlib.util

    if importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None:
        pytest.skip("mkdocs and mkdocs-material are not installed (they are in the test extra: pip install '.[test]')")
    result, site = early_result()
    assert result.returncode == 0, result.stdout + result.stderr
    # mkdocs checks links between pages; the README's links into docs/ are checked here
    for page, anchor in re.findall(r"\]\(docs/([\w-]+)\.md#([^)\s]+)\)", README):
        html = (site / ("" if page == "index" else page) / "index.html").read_text(encoding="utf-8")
        assert f'id="{anchor}"' in html, f"README links docs/{page}.md#{anchor}, which has no such heading"


# Options the manual names that belong to programs other than costeer. Nothing checks
# them, so the list stays short and says whose each is. An option costeer lacks is
# fixed in the docs, never added here.
OTHER_PROGRAMS_OPTIONS = {
    "--max-logprobs": "vLLM's server: its cap on returned logprobs (deployment.md)",
    "--max-model-len": "vLLM's server, passed on by scripts/engines.py serve (deployment.md)",
    "--gpu-memory-utilization": "vLLM's server, passed on by scripts/engines.py serve (deployment.md)",
    "--no-repack": "llama-server: scripts/engines.py passes it on AMX CPUs (deployment.md)",
    "--phases": "schemathesis's `st run`, the fuzz of costeer serve (protocol.md)",
    "--strict": "mkdocs build's: how to build this manual (index.md)",
}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
SCRIPT = re.compile(r"^(?:scripts|benchmarks)/[\w-]+\.py$")


def _costeer_options() -> dict[str, set[str]]:
    import argparse

    from costeer.cli import build_parser

    def options(parser: argparse.ArgumentParser) -> set[str]:
        found = set()
        for action in parser._actions:
            found.update(action.option_strings)
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    found |= options(sub)
        return found

    root = build_parser()
    sub_action = next(a for a in root._actions if isinstance(a, argparse._SubParsersAction))
    by_command = {name: options(sub) for name, sub in sub_action.choices.items()}
    by_command[""] = {o for a in root._actions for o in a.option_strings}  # costeer's own (--version, --help)
    return by_command


def _commands(text: str) -> tuple[list[str], str]:
    """The command lines in fenced blocks and inline code spans, and the prose left."""
    commands, blocks = [], []

    def fence(match: re.Match) -> str:
        if match.group(1) not in ("", "bash", "sh", "console"):
            blocks.append(match.group(2))  # text, a diagram, code: its options are checked as prose
            return "\n"
        body = match.group(2).replace("\\\n", " ")
        for line in body.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            commands.extend(re.split(r"&&|\|\||[;|]", line))
        return "\n"

    text = re.sub(r"^```([^\n]*)\n(.*?)^```", fence, text, flags=re.S | re.M)

    def span(match: re.Match) -> str:
        commands.extend(re.split(r"&&|\|\||;", match.group(1)))
        return " "

    prose = re.sub(r"`([^`]+)`", span, text)
    return commands, "\n".join([prose, *blocks])


def test_every_option_in_the_docs_exists():
    by_command = _costeer_options()
    every = set().union(*by_command.values())
    assert not every & OTHER_PROGRAMS_OPTIONS.keys(), "the allow-list names a costeer option"
    problems, used = [], set()
    for path in DOC_FILES:
        name = path.relative_to(ROOT)
        commands, prose = _commands(path.read_text(encoding="utf-8"))
        for command in commands:
            words = command.split()
            owner = None  # costeer's subcommand, or a script of this repository, that the options go to
            for i, word in enumerate(words):
                if word in ("costeer", ".venv/bin/costeer") and i + 1 < len(words) and words[i + 1] in by_command:
                    owner = words[i + 1]
                    break
                if SCRIPT.match(word) and (ROOT / word).exists():
                    owner = word
                    break
            for option in OPTION.findall(command):
                if option in OTHER_PROGRAMS_OPTIONS:
                    used.add(option)
                elif owner in by_command:
                    if option not in by_command[owner]:
                        problems.append(f"{name}: `costeer {owner}` has no {option}: {command.strip()}")
                elif owner is not None:
                    if f'"{option}"' not in (ROOT / owner).read_text(encoding="utf-8"):
                        problems.append(f"{name}: {owner} has no {option}: {command.strip()}")
                elif option not in every:
                    problems.append(f"{name}: no costeer command has {option}: {command.strip()}")
        for option in OPTION.findall(prose):
            if option in OTHER_PROGRAMS_OPTIONS:
                used.add(option)
            elif option not in every:
                problems.append(f"{name}: no costeer command has {option} (in prose)")
    assert not problems, "\n".join(problems)
    assert used == OTHER_PROGRAMS_OPTIONS.keys(), f"allow-listed but named nowhere: {OTHER_PROGRAMS_OPTIONS.keys() - used}"
