"""scripts/diagnose_steering.py: copying is measured against the private context, a run's
methods are found in its results, and rows no method set shares end in a clear error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cogenesis"
sys.path.insert(0, str(ROOT / "scripts"))  # the script imports compare_runs as a sibling

import diagnose_steering as diag  # noqa: E402

from costeer.evaluation.datasets import load_dataset  # noqa: E402

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/cogenesis")


def test_copy_rate_counts_only_four_grams_the_private_context_adds():
    private = "my grandmother's lemon cake recipe won the county fair twice. Write a toast."
    public = "Write a toast."
    assert diag.copy_rate("my grandmother's lemon cake recipe won", private, public) == 1.0
    assert diag.copy_rate("Write a toast. Write a toast.", private, public) == 0.0  # public words are no copy
    assert diag.copy_rate("lemon cake", private, public) == 0.0  # under four words: nothing to copy
    # of its five 4-grams only "lemon cake recipe won" is in the private text
    assert diag.copy_rate("a lemon cake recipe won prizes at fairs", private, public) == pytest.approx(1 / 5)


def _run(tmp_path: Path, rows: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return run


def _row(example, method: str, text: str) -> dict:
    return {"id": example.id, "method": method, "text": text, "words": len(text.split()),
            "finish_reason": "length", "rougeL": 0.1}


def test_a_run_is_read_with_its_own_methods_in_order(tmp_path, monkeypatch, capsys):
    examples = load_dataset(str(DATA)).examples[:2]
    history = examples[0].private[-1]["content"].split()[-40:-30]  # ten words of the private prompt
    rows = [_row(e, m, " ".join(history) if m == "mix:1" else "plain words of the cloud alone")
            for e in examples for m in ("llm", "mix:1")]
    run = _run(tmp_path, rows)
    assert diag.methods_of(run) == ["llm", "mix:1"]
    monkeypatch.setattr(sys, "argv", ["diagnose_steering.py", "--run", str(run), "--dataset", str(DATA)])
    assert diag.main() == 0
    out = capsys.readouterr().out
    assert "## Per answer (2 rows)" in out
    table = {line.split(" | ")[0].strip("| "): line for line in out.splitlines() if line.startswith("| ")}
    assert " 0.000 " in table["llm"] and " 0.000 " not in table["mix:1"]


def test_no_shared_rows_is_a_clear_error(tmp_path, monkeypatch):
    example = load_dataset(str(DATA)).examples[0]
    run = _run(tmp_path, [_row(example, "llm", "some answer words here")])
    monkeypatch.setattr(sys, "argv", ["diagnose_steering.py", "--run", str(run), "--methods", "llm,costeer",
                                      "--dataset", str(DATA)])
    with pytest.raises(SystemExit, match="none at all by costeer"):
        diag.main()
