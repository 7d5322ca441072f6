"""The evaluation loop end to end on tiny Hugging Face models (real forward passes, seconds):
rows, resume, extension, refusal of mixed settings, determinism, the report."""

from __future__ import annotations

import json

import pytest

from costeer import SteeringParams, UserError
from costeer.evaluation.runner import RESULTS, RUN_FILE, EvalSettings, run_eval
from support.cogenesis import CANARY, write_split
from support.tiny_hf import TORCH_IN_PROCESS

pytestmark = TORCH_IN_PROCESS  # tiny_costeer

ROW_FIELDS = {"id", "method", "text", "rouge1", "rougeL", "meteor", "semantic", "words", "new_tokens", "elapsed_s",
              "tokens_per_second", "time_to_first_token_s"}


def keys(path) -> list[tuple[str, str]]:
    return [(r["id"], r["method"]) for r in map(json.loads, path.read_text().splitlines())]


def test_a_run_resumes_extends_and_refuses_other_settings(tmp_path, tiny_costeer):
    data = write_split(tmp_path / "data", n=3)
    out = tmp_path / "out"
    methods = ["llm", "costeer", "mix:0.5", "mix:2.0", "cos"]
    settings = dict(dataset=str(data), out=out, methods=methods, max_new_tokens=6)

    report = run_eval(EvalSettings(**settings, limit=2), tiny_costeer)
    results = out / RESULTS
    first = results.read_bytes()
    rows = [json.loads(line) for line in first.splitlines()]
    assert keys(results) == [(f"t{i}", m) for i in range(2) for m in ["llm", "costeer", "mix:0.5", "mix:2", "cos"]]
    assert all(ROW_FIELDS <= row.keys() for row in rows)
    assert {r["method"]: r["steering_coefficient"] for r in rows if r["id"] == "t0"} == {
        "llm": None, "costeer": pytest.approx(SteeringParams().coefficient), "mix:0.5": 0.5, "mix:2": 2.0, "cos": None}

    text = report.read_text()
    for heading in ("## Quality", "## Against `llm`", "## Steering weight", "## Speed", "## Sample outputs",
                    "## How this report was made"):
        assert heading in text
    assert "w = c(T, alpha, beta, lambda, eta) = 1.783" in text and "| 1.783 | `costeer` |" in text
    assert "not significant" in text or "too few examples" in text  # two examples cannot show a difference
    assert "costeer eval --dataset" in text and "rouge-score 0.1.2" in text
    for png in ("quality_bars.png", "quality_vs_speed.png", "weight_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text.count("![") == 3  # each figure linked
    assert CANARY not in text and CANARY not in first.decode()  # the private context stays out of both

    run_eval(EvalSettings(**settings, limit=2, figures=False), tiny_costeer)  # nothing to do: nothing written
    assert results.read_bytes() == first
    assert len(json.loads((out / RUN_FILE).read_text())["commands"]) == 1

    run_eval(EvalSettings(**settings, figures=False), tiny_costeer)  # all 3 examples: only t2 is new
    assert "![" not in (out / "report.md").read_text()  # --no-figures: no links to figures it did not draw
    assert results.read_bytes().startswith(first)
    assert keys(results)[10:] == [("t2", m) for m in ["llm", "costeer", "mix:0.5", "mix:2", "cos"]]
    assert len(json.loads((out / RUN_FILE).read_text())["commands"]) == 2

    with pytest.raises(UserError, match=r"other settings \(max_new_tokens 6 -> 7\)"):
        run_eval(EvalSettings(**(settings | {"max_new_tokens": 7}), figures=False), tiny_costeer)
    assert len(keys(results)) == 15


def test_greedy_and_seeded_sampling_are_reproducible(tmp_path, tiny_costeer):
    texts = []
    for run, temperature, seed in ((0, 0.0, None), (1, 0.0, None), (2, 1.0, 7), (3, 1.0, 7)):
        out = tmp_path / f"run{run}"
        run_eval(EvalSettings("preference:creative", out, ["llm", "costeer"], limit=2, max_new_tokens=6, figures=False,
                              temperature=temperature, seed=seed), tiny_costeer)
        texts.append([json.loads(line)["text"] for line in (out / RESULTS).read_text().splitlines()])
    assert texts[0] == texts[1] and texts[2] == texts[3]
    report = (tmp_path / "run2" / "report.md").read_text()
    assert "distinct-2" in report and "rare words (Zipf < 4)" in report and "seed 7 + example index" in report


def test_user_mistakes_fail_before_any_model_runs(tmp_path):
    for settings, message in (
        (EvalSettings("preference:concise", tmp_path / "a", ["llm", "nope"]), "unknown method 'nope'"),
        (EvalSettings("preference:concise", tmp_path / "b", []), "no methods"),
        (EvalSettings("preference:concise", tmp_path / "c", ["llm"], top_p=2.0), "top-p"),
        (EvalSettings(str(tmp_path / "missing"), tmp_path / "d", ["llm"]), "dataset not found"),
    ):
        with pytest.raises(UserError, match=message):
            run_eval(settings)  # no CoSteer given: one would be loaded only for work to do
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        run_eval(EvalSettings("preference:concise", tmp_path / "file", ["llm"]))


def test_a_report_names_its_dataset_relative_to_here_and_old_absolute_runs_resume(tmp_path, tiny_costeer, monkeypatch):
    data = write_split(tmp_path / "data", n=2)
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    settings = dict(dataset=str(data), out="out", methods=["llm"], max_new_tokens=4)  # the dataset: an absolute path
    run_eval(EvalSettings(**settings, limit=1, figures=False), tiny_costeer)
    run = json.loads((out / RUN_FILE).read_text())
    assert run["config"]["dataset"] == "data/ctx_dev.json"
    # a folder written before this fix recorded the absolute path: it resumes, and says it the new way
    run["config"]["dataset"] = str(data)
    run["commands"] = [c.replace("data/ctx_dev.json", str(data)) for c in run["commands"]]
    (out / RUN_FILE).write_text(json.dumps(run))
    report = run_eval(EvalSettings(**settings, figures=False), tiny_costeer).read_text()
    assert str(tmp_path) not in report and str(tmp_path) not in (out / RUN_FILE).read_text()
    assert "# CoSteer evaluation: `data/ctx_dev.json`" in report
    assert len(keys(out / RESULTS)) == 2


def test_a_folder_keeps_what_auto_stood_for_and_refuses_auto_answers_of_another(tmp_path, tiny_costeer, monkeypatch):
    from costeer.evaluation import runner
    from costeer.methods import AUTO_METHOD

    data, out = write_split(tmp_path / "data", n=2), tmp_path / "out"
    settings = dict(dataset=str(data), out=out, max_new_tokens=4)
    report = run_eval(EvalSettings(**settings, methods=["llm", "auto"], limit=1, figures=False), tiny_costeer)
    assert json.loads((out / RUN_FILE).read_text())["config"]["auto"] == AUTO_METHOD
    assert f"`auto` = `{AUTO_METHOD}`" in report.read_text()
    monkeypatch.setattr(runner, "AUTO_METHOD", "mix:2")  # a new auto is chosen
    with pytest.raises(UserError, match=f"`auto` answers from when auto was {AUTO_METHOD}; auto is now mix:2"):
        run_eval(EvalSettings(**settings, methods=["llm", "auto"], figures=False), tiny_costeer)
    run_eval(EvalSettings(**settings, methods=["llm", "mix:2"], figures=False), tiny_costeer)  # named methods go on
    assert json.loads((out / RUN_FILE).read_text())["config"]["auto"] == AUTO_METHOD  # still on record
