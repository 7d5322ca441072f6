"""The `auto` rule (evaluation/choose.py) on made-up runs whose answers are known: the
standardised gains, the four families weighed equally, and each reason to reject."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from costeer.errors import UserError
from costeer.evaluation.choose import TASK_METRICS, choice_report, choose, standardised_gain
from costeer.evaluation.metrics import rare_word_share
from support.cogenesis import CANARY, write_split

ROOT = Path(__file__).resolve().parents[2]
BASE = [0.2, 0.4, 0.3, 0.5, 0.1, 0.6]  # llm's value on each of six rows, every metric
LIFT = [0.1, 0.2, 0.3, 0.1, 0.2, 0.3]  # a gain with mean 0.2 and sd 0.0894: d = 2.236


def write_task(folder: Path, task: str, values: dict[str, list[float]], texts: dict[str, str] | None = None,
               dataset: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, per_row in values.items():
        for i, v in enumerate(per_row):
            row = {"id": f"t{i}", "method": method, **{m.key: v for m in TASK_METRICS[task]}}
            if texts is not None:
                row["text"] = texts.get(method, "a plain answer about nothing in particular at all")
            rows.append(row)
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "run.json").write_text(json.dumps({"config": {"dataset": dataset}, "commands": []}))
    return folder


def lifted(sign: float = 1.0) -> list[float]:
    return [b + sign * d for b, d in zip(BASE, LIFT)]


@pytest.fixture
def runs(tmp_path):
    """Candidates: `broad` gains on every task; `prefs` on the preference tasks only; `ctx_only`
    on ctx only; `harmful` gains on ctx but loses on prefeval; `copier` gains everywhere but
    repeats the private context on ctx."""
    split = write_split(tmp_path / "data", n=6)
    def values(task: str) -> dict[str, list[float]]:
        preference = task in ("concise", "verbose", "uplifting", "creative")
        down = not TASK_METRICS[task][0].higher_is_better  # concise: fewer words is the gain
        gain = lifted(-1.0 if down else 1.0)
        return {"llm": BASE, "broad": gain, "prefs": gain if preference else BASE,
                "ctx_only": gain if task == "ctx" else BASE,
                "harmful": gain if task == "ctx" else (lifted(-1.0) if task == "prefeval" else BASE),
                "copier": gain, "llm-context": gain}
    copied = {"copier": f"profile {CANARY} likes owls and more, profile {CANARY} likes owls"}
    out = {}
    for task in TASK_METRICS:
        texts = copied if task == "ctx" else None
        out[task] = [write_task(tmp_path / task, task, values(task), texts, str(split) if task == "ctx" else "")]
    return out


def test_standardised_gain_is_mean_over_sd_and_signed():
    assert standardised_gain(np.array(LIFT)) == pytest.approx(0.2 / np.std(LIFT, ddof=1))
    assert standardised_gain(np.zeros(4)) == 0.0 and standardised_gain(np.full(3, -0.1)) == -10.0
    assert standardised_gain(np.array([5.0, 5.0 + 1e-9])) == 10.0  # capped: it never varies, near enough


def test_families_weigh_equally_and_every_reason_to_reject_holds(runs):
    verdicts = {v.method: v for v in choose(runs, ["prefs", "ctx_only", "broad", "harmful", "copier"])}
    d = 0.2 / np.std(LIFT, ddof=1)
    assert verdicts["broad"].score == pytest.approx(d) and not verdicts["broad"].rejected
    # the four preference tasks are one family of four: as much as ctx alone, not four times it
    assert verdicts["prefs"].score == pytest.approx(d / 4) == pytest.approx(verdicts["ctx_only"].score)
    assert verdicts["harmful"].rejected == ["worse than llm on prefeval accuracy"]
    assert verdicts["copier"].copy > verdicts["llm-context"].copy
    assert verdicts["copier"].rejected and "copies more of the context than llm-context" in verdicts["copier"].rejected[0]
    order = [v.method for v in choose(runs, ["prefs", "ctx_only", "broad", "harmful", "copier"])]
    assert order[0] == "broad" and order[-1] == "llm-context" and set(order[-3:-1]) == {"harmful", "copier"}


def test_the_report_names_the_pick_and_the_script_prints_it(runs):
    text = choice_report(runs, ["prefs", "broad", "harmful"])
    assert text.splitlines()[2].startswith("| 1 | `broad` |") and "Pick: `broad`." in text
    assert "| - | `harmful` |" in text and "| - | `llm-context` |" in text
    args = [a for task, folders in runs.items() for a in ("--task", f"{task}={folders[0]}")]
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "choose_auto.py"), "--candidates",
                           "prefs,broad,harmful", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == text + "\n"


def test_the_rule_needs_every_task_and_real_candidates(runs):
    with pytest.raises(UserError, match="give paper"):
        choose({"ctx": runs["ctx"]}, ["broad"])
    with pytest.raises(UserError, match="candidates exclude"):
        choose(runs, ["broad", "llm-context"])
    with pytest.raises(UserError, match="no rows where both llm and nothing"):
        choose(runs, ["nothing"])


def test_rows_written_before_a_metric_existed_get_it_from_their_text(runs):
    """`rare_words` (creative) came after the first preference runs: their rows carry text only."""
    folder = runs["creative"][0]
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    old = "a vivid, luminous, iridescent answer"
    rows = [{k: v for k, v in r.items() if k != "rare_words"} | {"text": old} if r["method"] == "llm" else r
            for r in rows]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    gain = next(g for g in choose(runs, ["broad"])[0].gains if g.task == "creative")
    assert gain.mean_diff == pytest.approx(np.mean(lifted()) - rare_word_share(old)) and rare_word_share(old) > 0
