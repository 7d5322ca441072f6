"""report.md from rows with known effects: the verdicts, the weight sweep, the samples."""

from __future__ import annotations

import numpy as np

from costeer.evaluation.datasets import load_dataset
from costeer.evaluation.report import RunInfo, write_report
from costeer.evaluation.runner import EvalSettings
from support.cogenesis import write_split

# method -> (shift of every metric against llm, steering coefficient)
EFFECTS = {"llm": (0.0, None), "costeer": (0.05, 1.7832568430850784), "mix:1": (0.0, 1.0), "mix:3": (-0.05, 3.0),
           "cos": (0.0, None)}


def rows_for(dataset) -> list[dict]:
    rng = np.random.default_rng(0)
    n = len(dataset.examples)
    noise = {m: rng.normal(0, 0.05 if m in ("mix:1", "cos") else 0.005, n) for m in EFFECTS}
    noise = {m: x - x.mean() for m, x in noise.items()}  # the effect is exactly the shift
    rows = []
    for i, e in enumerate(dataset.examples):
        base = rng.uniform(0.1, 0.3)
        for method, (shift, c) in EFFECTS.items():
            v = base + shift + noise[method][i]
            rows.append({
                "id": e.id, "method": method, "text": f"```\n{method} answer\n````", "rouge1": v, "rougeL": v,
                "meteor": v, "semantic": v, "words": 50.0, "new_tokens": 60, "elapsed_s": 5.0,
                "tokens_per_second": 12.0, "time_to_first_token_s": 0.3, "prefill_s": 0.2, "steering_coefficient": c,
            })
    return rows


def test_report_states_significance_in_words_and_places_costeer_on_the_weight_curve(tmp_path):
    dataset = load_dataset(str(write_split(tmp_path / "data", n=40)))
    settings = EvalSettings(dataset.name, tmp_path, list(EFFECTS))
    text = write_report(tmp_path, rows_for(dataset), dataset, RunInfo(settings.fingerprint(), [settings.as_command()])
                        ).read_text()

    paired = text.split("## Against `llm`")[1].split("## Steering weight")[0]

    def verdicts(method: str) -> set[str]:
        return {line.rsplit("|", 2)[-2].strip() for line in paired.splitlines() if line.startswith(f"| `{method}` | ")}

    assert verdicts("costeer") == {"**better**"}
    assert verdicts("mix:3") == {"**worse**"}
    assert verdicts("mix:1") == verdicts("cos") == {"not significant"}
    assert "**Not significantly different from `llm`**" in text and "`cos` on ROUGE-L" in text
    assert "`costeer` on" not in paired.split("**Not significantly different")[1]
    # the sweep: llm at 0, mix points, costeer at its coefficient, in order of w
    weights = [line.split("|")[1:3] for line in text.split("## Steering weight")[1].split("## Speed")[0].splitlines()
               if line.startswith("| ") and "`" in line]
    assert [(w.strip(), m.strip()) for w, m in weights] == [
        ("0.000", "`llm`"), ("1.000", "`mix:1`"), ("1.783", "`costeer`"), ("3.000", "`mix:3`")]
    assert "(40 examples" not in text and "40 examples, 5 methods" in text
    # a sample whose text holds backtick runs still sits in one fence
    assert "`````text\n```\nllm answer\n````\n`````" in text


def test_the_report_says_when_rows_came_from_several_machines(tmp_path):
    dataset = load_dataset(str(write_split(tmp_path / "data", n=4)))
    settings = EvalSettings(dataset.name, tmp_path, list(EFFECTS))
    run = RunInfo(settings.fingerprint(), [settings.as_command()])
    rows = rows_for(dataset)

    def note(rows: list[dict]) -> str:
        text = write_report(tmp_path, rows, dataset, run, figures=False).read_text()
        return next((line for line in text.splitlines() if line.startswith("Rows were made on")), "")

    assert note([r | {"machine": "aaaa0000"} for r in rows]) == ""  # one machine: nothing to say
    two = [r | {"machine": "aaaa0000" if i % 2 else "bbbb1111"} for i, r in enumerate(rows)]
    assert note(two).startswith("Rows were made on 2 machines (`machine` in results.jsonl).")
    older = [r | {"machine": "aaaa0000"} for r in rows[:5]] + rows[5:]
    assert note(older).startswith(f"Rows were made on 1 machine (`machine` in results.jsonl), and {len(rows) - 5} rows "
                                  "from before machines were recorded.")
