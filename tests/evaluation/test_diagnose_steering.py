"""evaluation/diagnose.py (scripts/diagnose_steering.py): copying is measured against the
private context, a run's methods are found in its results, and rows no method set shares
end in a clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from costeer.errors import UserError
from costeer.evaluation.compare import load_answers, methods_of
from costeer.evaluation.datasets import load_dataset
from costeer.evaluation.diagnose import copy_rate, per_answer

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "cogenesis"

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/cogenesis")


def test_copy_rate_counts_only_four_grams_the_private_context_adds():
    private = "my grandmother's lemon cake recipe won the county fair twice. Write a toast."
    public = "Write a toast."
    assert copy_rate("my grandmother's lemon cake recipe won", private, public) == 1.0
    assert copy_rate("Write a toast. Write a toast.", private, public) == 0.0  # public words are no copy
    assert copy_rate("lemon cake", private, public) == 0.0  # under four words: nothing to copy
    # of its five 4-grams only "lemon cake recipe won" is in the private text
    assert copy_rate("a lemon cake recipe won prizes at fairs", private, public) == pytest.approx(1 / 5)


def _run(tmp_path: Path, rows: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run


def _row(example, method: str, text: str) -> dict:
    return {"id": example.id, "method": method, "text": text, "words": len(text.split()),
            "finish_reason": "length", "rougeL": 0.1}


def test_a_run_is_read_with_its_own_methods_in_order(tmp_path):
    examples = load_dataset(str(DATA)).examples[:2]
    history = examples[0].private[-1]["content"].split()[-40:-30]  # ten words of the private prompt
    rows = [_row(e, m, " ".join(history) if m == "mix:1" else "plain words of the cloud alone")
            for e in examples for m in ("llm", "mix:1")]
    run = _run(tmp_path, rows)
    assert methods_of(run) == ["llm", "mix:1"]
    # the script, as a user runs it: --run reads the folder's methods in order
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose_steering.py"), "--run", str(run),
                             "--dataset", str(DATA)], capture_output=True, text=True, timeout=120)
    out = script.stdout
    assert script.returncode == 0 and script.stderr == ""
    assert out == per_answer([load_answers(f"{run}:{m}={m}") for m in ("llm", "mix:1")], str(DATA)) + "\n"
    assert "## Per answer (2 rows)" in out
    table = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert " 0.000 " in table["llm"] and " 0.000 " not in table["mix:1"]


def test_no_shared_rows_is_a_clear_error(tmp_path):
    example = load_dataset(str(DATA)).examples[0]
    run = _run(tmp_path, [_row(example, "llm", "some answer words here")])
    answers = [load_answers(f"{run}:{m}={m}") for m in ("llm", "costeer")]
    with pytest.raises(UserError, match="none at all by costeer"):
        per_answer(answers, str(DATA))


def test_a_task_without_references_has_no_rouge_column_and_a_choice_run_is_a_clear_error(tmp_path):
    """Preference tasks have no reference answer (no ROUGE-L in their rows); multiple-choice
    rows have no text: the first gets the table without ROUGE-L, the second one line."""
    examples = load_dataset("preference:concise").examples[:2]
    rows = [{k: v for k, v in _row(e, m, "a short plain answer of six words").items() if k != "rougeL"}
            for e in examples for m in ("llm", "fit:0.5")]
    run = _run(tmp_path, rows)
    out = per_answer([load_answers(f"{run}:{m}={m}") for m in ("llm", "fit:0.5")], "preference:concise")
    assert "| method | 4-gram copy from the context | words | hit the token limit |\n" in out
    assert "ROUGE-L" not in out and "| fit:0.5 | 0.000 | 7 | 100% |" in out

    chosen = tmp_path / "mcq"
    chosen.mkdir()
    (chosen / "results.jsonl").write_text(
        "".join(json.dumps({"id": e.id, "method": "llm", "choice": 0, "correct": 1.0}) + "\n" for e in examples))
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnose_steering.py"), "--run", str(chosen),
                             "--dataset", "preference:concise"], capture_output=True, text=True, timeout=120)
    assert script.returncode == 1 and "Traceback" not in script.stderr
    assert script.stderr.strip() == "diagnose_steering: llm wrote no answers (a multiple-choice run?): " \
                                    "the diagnosis reads generated text"
