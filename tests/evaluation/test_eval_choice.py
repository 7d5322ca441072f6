"""`costeer eval --dataset prefeval-mcq:DIR` end to end on tiny Hugging Face models: every
option scored under every method, the choice and its accuracy, resume, and the report."""

from __future__ import annotations

import json


from costeer.evaluation.datasets import load_dataset
from costeer.evaluation.runner import RESULTS, RUN_FILE, EvalSettings, run_eval
from support.cogenesis import CANARY, write_prefeval
from support.tiny_hf import TORCH_IN_PROCESS

pytestmark = TORCH_IN_PROCESS  # tiny_costeer


def test_each_method_picks_the_option_likeliest_per_token_and_the_report_gives_accuracy(tmp_path, tiny_costeer):
    data = write_prefeval(tmp_path / "mcq")
    out = tmp_path / "out"
    methods = ["llm", "costeer", "mix:4", "llm-context"]
    report = run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=methods, limit=2, figures=False), tiny_costeer)
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert [(r["id"], r["method"]) for r in rows] == [(i, m) for i in ("pets-000", "travel-000") for m in methods]
    examples = {e.id: e for e in load_dataset(f"prefeval-mcq:{data}").examples}
    scored = {i: tiny_costeer.score_from_messages(examples[i].public, examples[i].private, examples[i].options, methods)
              for i in ("pets-000", "travel-000")}
    for row in rows:
        expected = scored[row["id"]][row["method"]]
        assert row["option_mean_logprobs"] == [s.mean for s in expected]  # no batching on this backend: exact
        assert row["choice"] == max(range(4), key=lambda i: expected[i].mean) and row["tied"] == 1
        assert row["correct"] == float(row["choice"] == 0)
        assert row["option_tokens"] == [len(s.token_ids) for s in expected]
    # steering moves the scores; the cloud alone does not see the preference
    by = {(r["id"], r["method"]): r["option_mean_logprobs"] for r in rows}
    assert by[("pets-000", "costeer")] != by[("pets-000", "llm")] != by[("pets-000", "llm-context")]

    text = report.read_text()
    assert "| method | n | accuracy |" in text and "chance is 25%" in text and "## Against `llm`" in text
    assert "## Speed" not in text and "## Sample outputs" not in text  # nothing was generated
    assert CANARY not in text and CANARY not in (out / RESULTS).read_text()
    config = json.loads((out / RUN_FILE).read_text())["config"]
    assert config["dataset"].startswith("prefeval-mcq:") and "highest mean log-probability" in config["choice"]

    run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=methods, figures=False), tiny_costeer)  # resume: 1 more
    rows = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()]
    assert len(rows) == 12 and {r["id"] for r in rows[8:]} == {"travel-001"}
    by_topic = (out / "report.md").read_text().split("## By topic")[1].split("##")[0]
    for topic, n in (("pets", 1), ("travel", 2)):  # the topic files, in name order
        cells = [sum(r["correct"] for r in rows if r["method"] == m and r["id"].startswith(topic)) / n for m in methods]
        assert f"| {topic} | {n} | " + " | ".join(f"{c:.3f}" for c in cells) + " |" in by_topic


def test_options_a_method_rules_out_tie_and_count_as_a_draw_not_a_win(tmp_path, tiny_costeer):
    """costeer-plausible gives tokens outside the cloud's plausible set no probability: options
    that hold one all score -inf, and the first (right) option must not win the tie."""
    data = write_prefeval(tmp_path / "mcq", {"pets": 1})
    out = tmp_path / "out"
    run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=["llm", "costeer-plausible"], figures=False), tiny_costeer)
    row = [json.loads(line) for line in (out / RESULTS).read_text().splitlines()][1]
    means = row["option_mean_logprobs"]
    assert row["tied"] == sum(m == max(means) for m in means) >= 2 and max(means) == float("-inf")
    assert row["correct"] == 1 / row["tied"]
