"""evaluation/compare.py (scripts/compare_runs.py, scripts/choose_auto.py): runs are
paired on the rows they share, `--exclude` leaves rows out, the `auto` rule ranks the
candidates and never the baseline or the privacy-violating bound; bad input is one
UserError."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from costeer.errors import UserError
from costeer.evaluation.compare import compare_report, load_answers, methods_of

ROOT = Path(__file__).resolve().parents[2]
METRICS = ("rougeL", "rouge1", "meteor", "semantic")


def _run(folder: Path, scores: dict[str, list[float]]) -> Path:
    """A `costeer eval` folder: method -> one score per row (every metric that score)."""
    folder.mkdir(parents=True)
    rows = [{"id": f"t{i}", "method": method, "tokens_per_second": 10.0, **{m: score for m in METRICS}}
            for method, per_row in scores.items() for i, score in enumerate(per_row)]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture
def runs(tmp_path):
    levers = _run(tmp_path / "levers", {"llm": [0.1, 0.2, 0.3, 0.4], "mix:1": [0.3, 0.4, 0.5, 0.6],
                                        "mix:3": [0.0, 0.1, 0.2, 0.3], "llm-context": [0.2, 0.3, 0.4, 0.5]})
    other = _run(tmp_path / "other", {"costeer": [0.1, 0.2, 0.3]})  # three rows of the four
    return levers, other


def test_runs_are_read_by_spec_with_labels_and_methods_in_order(runs):
    levers, _ = runs
    assert methods_of(levers) == ["llm", "mix:1", "mix:3", "llm-context"]
    label, answers = load_answers(f"{levers}:mix:1")  # a method may hold a colon
    assert label == "levers:mix:1" and sorted(answers) == ["t0", "t1", "t2", "t3"]
    assert load_answers(f"{levers}:mix:1=auto")[0] == "auto"
    for bad in (str(levers), f"{levers.parent / 'none'}:llm", ":llm"):
        with pytest.raises(UserError, match="expected RUN_DIR:METHOD"):
            load_answers(bad)


def test_compare_pairs_on_shared_rows_and_leaves_out_excluded_ones(runs):
    levers, other = runs
    text = compare_report([f"{levers}:mix:1=auto", f"{levers}:llm=llm"])
    lines = text.splitlines()
    assert lines[0] == "4 examples in common" and "| auto | 0.450 " in text
    assert lines[-1].startswith("| llm | +0.200 [+0.200, +0.200] p=")  # every row +0.2: the CI is a point
    assert compare_report([f"{levers}:mix:1", f"{other}:costeer"]).startswith("3 examples in common\n")
    assert compare_report([f"{levers}:mix:1", f"{levers}:llm"], exclude=[f"{other}:costeer"]).startswith(
        "1 examples in common, 3 left out\n")
    with pytest.raises(UserError, match="share no examples"):
        compare_report([f"{levers}:mix:1", f"{levers}:llm"], exclude=[f"{levers}:llm"])


def test_the_scripts_print_the_reports_and_name_themselves_in_errors(runs):
    levers, _ = runs

    def script(name: str, *args: str) -> Future:
        """The script run in a process of its own, beside the others (they read, never write)."""
        return pool.submit(subprocess.run, [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True,
                           text=True, timeout=120)

    with ThreadPoolExecutor(4) as pool:
        compared = script("compare_runs.py", f"{levers}:mix:1=auto", f"{levers}:llm=llm")
        one_task = script("choose_auto.py", "--candidates", "mix:1", "--task", f"ctx={levers}")
        no_folder = script("choose_auto.py", "--candidates", "mix:1", "--task", "ctx")
        bad_spec = script("compare_runs.py", "nowhere:llm", f"{levers}:llm")
    done = compared.result()
    assert done.returncode == 0 and done.stdout == compare_report([f"{levers}:mix:1=auto", f"{levers}:llm=llm"]) + "\n"
    done = one_task.result()
    assert done.returncode == 1 and done.stderr.startswith("choose_auto: the rule reads every task: give paper, ")
    done = no_folder.result()
    assert done.returncode == 1 and done.stderr == "choose_auto: expected NAME=DIR[,DIR...], got 'ctx'\n"
    done = bad_spec.result()
    assert done.returncode == 1 and done.stderr.startswith("compare_runs: expected RUN_DIR:METHOD")
