"""report.md and its figures, from the rows in results.jsonl."""

from __future__ import annotations

import math
import platform
import re
from collections import Counter
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable

from ..fusion import SteeringParams
from . import plots
from .datasets import Dataset
from .metrics import EMBEDDING_PACKAGE, Metric, quality_metrics
from .stats import RESAMPLES, SIGNIFICANCE, Estimate, PairedComparison, bootstrap_mean, paired_bootstrap

BASELINE = "llm"
SAMPLES = 3
VERSIONED_PACKAGES = (
    "costeer", "numpy", "llama-cpp-python", "torch", "transformers", "rouge-score", "nltk",
    "vaderSentiment", "sentence-transformers", EMBEDDING_PACKAGE, "matplotlib",
)
SPEED = Metric("tokens_per_second", "tokens/s")
ACCURACY = Metric("correct", "accuracy")


@dataclass(frozen=True)
class RunInfo:
    config: dict  # the settings every row of the folder was produced with
    commands: list[str]  # each invocation that wrote to the folder, in order


def ordered_methods(rows: list[dict]) -> list[str]:
    """Methods in order of first appearance, the baseline first."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    return sorted(methods, key=lambda m: m != BASELINE)


def _fmt(value: float, key: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.1f}" if key in ("words", "new_tokens") else f"{value:.3f}"


def _fmt_ci(e: Estimate, key: str) -> str:
    return f"{_fmt(e.mean, key)} [{_fmt(e.low, key)}, {_fmt(e.high, key)}]"


def _fmt_p(p: float) -> str:
    return "n/a" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")


def verdict(c: PairedComparison, metric: Metric) -> str:
    if math.isnan(c.p_value):
        return "too few examples to test"
    if not c.significant:
        return "not significant"
    better = (c.mean_diff > 0) == metric.higher_is_better
    return "**better**" if better else "**worse**"


def _fence(text: str) -> str:
    """A code fence longer than any backtick run inside the text."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}text\n{text}\n{ticks}"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " […]"


def _machines_note(rows: list[dict]) -> list[str]:
    """How many machines made the rows, where more than one may have (evaluation/machine.py)."""
    machines = Counter(r.get("machine") for r in rows)
    unrecorded = machines.pop(None, 0)
    if len(machines) + bool(unrecorded) < 2:
        return []
    made = f"{len(machines)} machine{'s' if len(machines) != 1 else ''} (`machine` in results.jsonl)"
    earlier = f", and {unrecorded} rows from before machines were recorded" if unrecorded else ""
    return [f"Rows were made on {made}{earlier}. Each builds llama.cpp for its own CPU, and two builds can round "
            "a near tie apart, so a greedy answer made on one machine may differ from another's.", ""]


def _versions() -> list[str]:
    lines = [f"python {platform.python_version()} ({platform.platform()})"]
    for name in VERSIONED_PACKAGES:
        try:
            lines.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            lines.append(f"{name} (not installed)")
    return lines


def _figure(folder: Path | None, name: str, caption: str, draw: Callable[[Path], object]) -> list[str]:
    """Draw a figure into `folder` and return its Markdown; without a folder, nothing."""
    if folder is None:
        return []
    draw(folder / name)
    return ["", f"![{caption}]({name})", ""]


def write_report(out: Path, rows: list[dict], dataset: Dataset, run: RunInfo, figures: bool = True) -> Path:
    methods = ordered_methods(rows)
    choice = dataset.multiple_choice
    metrics = [ACCURACY] if choice else quality_metrics(dataset.preference)
    headline = metrics[0]
    by_method = {m: {r["id"]: r for r in rows if r["method"] == m} for m in methods}
    examples = {e.id: e for e in dataset.examples}
    ids = [e.id for e in dataset.examples if any(e.id in by_method[m] for m in methods)]

    def estimate(method: str, key: str) -> Estimate:  # timings: the answers made, not those copied (same_as)
        return bootstrap_mean([r[key] for r in by_method[method].values() if r.get(key) is not None])

    # answer length beside the metrics, unless it is one (or nothing was generated)
    extra = [] if choice or any(x.key == "words" for x in metrics) else ["words"]
    keys = [x.key for x in metrics] + extra + ([] if choice else [SPEED.key])
    table = {m: {k: estimate(m, k) for k in keys} for m in methods}
    config = run.config
    sampling = "greedy" if config["temperature"] == 0 else (
        f"temperature {config['temperature']}, top-p {config['top_p']}, top-k {config['top_k']}, "
        + ("unseeded" if config["seed"] is None else f"seed {config['seed']} + example index")
    )
    made = (f"{len(rows)} choices, each of the options scored as the answer" if choice else
            f"{len(rows)} answers; up to {config['max_new_tokens']} new tokens, {sampling} decoding")
    auto = f"; `auto` = `{config['auto']}`" if "auto" in methods and "auto" in config else ""
    lines = [
        f"# CoSteer evaluation: `{run.config['dataset']}`",
        "",
        f"{len(ids)} example{'' if len(ids) == 1 else 's'}, {len(methods)} methods ({', '.join(f'`{m}`' for m in methods)}"
        f"{auto}), "
        f"{made}. Means with 95% bootstrap confidence intervals (percentile method, {RESAMPLES} resamples).",
        "",
        "## Quality",
        "",
        "| method | n | " + " | ".join([m.label for m in metrics] + extra) + " |",
        "|---|---|" + "---|" * (len(metrics) + len(extra)),
    ]
    for m in methods:
        cells = [_fmt_ci(table[m][k], k) for k in [x.key for x in metrics] + extra]
        lines.append(f"| `{m}` | {len(by_method[m])} | " + " | ".join(cells) + " |")
    drawn = out if figures else None
    lines += _figure(drawn, "quality_bars.png", "Quality by method",
                     lambda path: plots.quality_bars(path, methods, metrics, table)) or [""]
    lines += [*_metric_notes(dataset, config), *_same_as_notes(methods, by_method), ""]
    lines += _paired_section(methods, metrics, by_method)
    lines += _topic_section(methods, headline, by_method, dataset)
    lines += _weight_section(drawn, methods, by_method, table, headline, config)
    if not choice:
        lines += _speed_section(drawn, methods, by_method, table, headline)
        lines += _samples_section(methods, by_method, examples, ids)
    lines += [
        "## How this report was made",
        "",
        "Commands that wrote this folder (a resumed run appends its command):",
        "",
        "```bash",
        *run.commands,
        "```",
        "",
        "Settings shared by every row: " + ", ".join(f"{k} = `{v}`" for k, v in config.items()) + ".",
        "",
        *_machines_note(rows),
        "Package versions:",
        "",
        *[f"- {v}" for v in _versions()],
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _metric_notes(dataset: Dataset, config: dict) -> list[str]:
    if dataset.multiple_choice:
        n = len(dataset.examples[0].options)
        return [
            f"Multiple choice: each method scores every option as the answer to the public request (its "
            "log-likelihood teacher-forced through the method's next-token distribution, the one it would "
            "generate from: for `llm-context` the cloud model reads the preference, for `llm` nothing does) "
            "and chooses the option with the highest mean log-probability per token, a normalisation fixed "
            "before any run. Accuracy is the share of items where that is the option that follows the stated "
            f"preference; chance is {100 / n:.0f}%. Options are scored in llama.cpp batches of tokens "
            "(`CoSteer.score(batched=True)`)."
        ]
    if dataset.preference:
        return [
            f"Preference task `{dataset.preference}`: the device model's prompt adds "
            f"\"Your answer should be as {dataset.preference} as possible\"; the cloud model never sees it. "
            "Words are `\\w+` tokens; distinct-2 is unique bigrams over all bigrams; sentiment is VADER's compound score in [-1, 1]; "
            "rare words is the share of alphabetic words that English uses less than once per 100,000 words "
            "(Zipf frequency < 4 in the `wordfreq` package's English list)."
        ]
    meteor = ("exact, Porter-stem and WordNet-synonym matches" if config["meteor_synonyms"] else
              "exact and Porter-stem matches only: nltk's WordNet data is not installed (no PyPI package ships it), "
              "so the synonym stage matches nothing; compare these METEOR scores with each other, not with published ones")
    return [
        "ROUGE-1 / ROUGE-L: F1 from `rouge-score` with the Porter stemmer. "
        f"METEOR: nltk's, with {meteor}. "
        f"Semantic similarity: cosine of all-MiniLM-L6-v2 embeddings (from the PyPI package `{EMBEDDING_PACKAGE}`, "
        "loaded offline; texts cut at 256 word pieces)."
    ]


def _same_as_notes(methods: list[str], by_method: dict[str, dict[str, dict]]) -> list[str]:
    """Which answers were another method's: where two methods are the same policy on a row
    (`fit` at weight 1 is `mix:1`), the answer was made once and is counted for both."""
    notes = []
    for m in methods:
        sources = Counter(r["same_as"] for r in by_method[m].values() if r.get("same_as"))
        if sources:
            of = ", ".join(f"{n} `{source}`'s" for source, n in sources.most_common())
            notes.append(f"`{m}`: {of} of its {len(by_method[m])} answers, the same policy on those rows "
                         "(same weight, same prompts), so the answer was made once (`same_as` in results.jsonl; "
                         "its speed counts the answers it made).")
    return ["", *notes] if notes else []


def _topic_section(methods: list[str], headline: Metric, by_method: dict[str, dict[str, dict]],
                   dataset: Dataset) -> list[str]:
    """The headline metric per topic (PrefEval's topic files), where the examples have topics."""
    topics = list(dict.fromkeys(e.topic for e in dataset.examples if e.topic))
    if len(topics) < 2:
        return []
    topic_of = {e.id: e.topic for e in dataset.examples}
    lines = ["## By topic", "",
             f"{headline.label} per topic (means over the topic's items; n is the items the first method answered). "
             "A topic holds about 50 items, so a topic's 95% CI is about ±0.13: read these for where "
             "steering helps, not as separate findings.", "",
             "| topic | n | " + " | ".join(f"`{m}`" for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for topic in topics:
        cells, n = [], None
        for m in methods:
            values = [r[headline.key] for i, r in by_method[m].items() if topic_of.get(i) == topic]
            n = len(values) if n is None else n
            cells.append(_fmt(sum(values) / len(values), headline.key) if values else "n/a")
        lines.append(f"| {topic} | {n} | " + " | ".join(cells) + " |")
    return lines + [""]


def _paired_section(methods: list[str], metrics: list[Metric], by_method: dict[str, dict[str, dict]]) -> list[str]:
    if BASELINE not in methods or len(methods) < 2:
        return [f"No paired comparison: `{BASELINE}` (the baseline) is not among the methods.", ""]
    lines = [
        f"## Against `{BASELINE}` (the cloud model alone)",
        "",
        "Paired on the examples both methods answered. Difference = method minus `llm`; "
        "win rate counts ties as half; p is a two-sided paired bootstrap test "
        f"(significant when p < {SIGNIFICANCE}), one test per row with no correction for the number of rows: "
        "with many rows, expect about one in twenty to pass by chance.",
        "",
        "| method | metric | n | difference [95% CI] | win rate (W/T/L) | p | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    unclear: list[str] = []
    base = by_method[BASELINE]
    for m in methods:
        if m == BASELINE:
            continue
        common = [i for i in by_method[m] if i in base]
        for metric in metrics:
            c = paired_bootstrap([by_method[m][i][metric.key] for i in common], [base[i][metric.key] for i in common],
                                 metric.higher_is_better)
            v = verdict(c, metric)
            if not c.significant:
                unclear.append(f"`{m}` on {metric.label}")
            lines.append(
                f"| `{m}` | {metric.label} | {c.n} | {_fmt(c.mean_diff, metric.key)} [{_fmt(c.low, metric.key)}, "
                f"{_fmt(c.high, metric.key)}] | {_fmt(c.win_rate)} ({c.wins}/{c.ties}/{c.losses}) | {_fmt_p(c.p_value)} | {v} |"
            )
    lines.append("")
    if unclear:
        lines += [f"**Not significantly different from `{BASELINE}`** (p >= {SIGNIFICANCE} or too few examples): "
                  + ", ".join(unclear) + ". These differences may be noise.", ""]
    return lines


def _weight_section(figures: Path | None, methods, by_method, table, headline: Metric, config: dict) -> list[str]:
    """Where CoSteer's c sits on the curve of B + w*delta (llm is w = 0, mix:w are the sweep)."""
    sweep = [(0.0, BASELINE, table[BASELINE][headline.key])] if BASELINE in methods else []
    sweep += [(float(m.split(":", 1)[1]), m, table[m][headline.key]) for m in methods if m.startswith("mix:")]
    marked = []
    for m in methods:
        c = next(iter(by_method[m].values())).get("steering_coefficient")
        if c is not None and not m.startswith("mix:"):
            marked.append((float(c), m, table[m][headline.key]))
    if not any(m.startswith("mix:") for m in methods):
        return []
    paper_c = SteeringParams().coefficient
    lines = [
        "## Steering weight",
        "",
        "CoSteer's FTRL update equals fixed-weight logit arithmetic `log_softmax(B + w * delta)` with one "
        f"particular weight, w = c(T, alpha, beta, lambda, eta) = {paper_c:.3f} at the paper's defaults "
        f"(this run: T={config['iterations']}, alpha={config['alpha']}, beta={config['beta']}, "
        f"lambda={config['lambda']}, eta={config['eta']}). `mix:w` runs the same fusion at a chosen w; "
        "`llm` is w = 0. The dashed line is the paper's setting.",
        "",
        f"| w | method | {headline.label} [95% CI] |",
        "|---|---|---|",
    ]
    for w, m, e in sorted(sweep + marked):
        lines.append(f"| {w:.3f} | `{m}` | {_fmt_ci(e, headline.key)} |")
    return lines + (_figure(figures, "weight_curve.png", "Quality vs steering weight",
                            lambda path: plots.weight_curve(path, sweep, marked, paper_c, headline)) or [""])


def _speed_section(figures: Path | None, methods, by_method, table, headline: Metric) -> list[str]:
    def mean(m: str, key: str) -> float:
        values = [r[key] for r in by_method[m].values() if r.get(key) is not None]
        return sum(values) / len(values) if values else math.nan

    lines = [
        "## Speed",
        "",
        "Means per answer, on the machine that ran each row (a resumed run may mix machines or loads).",
        "",
        "| method | new tokens | tokens/s [95% CI] | time to first token (s) | prefill (s) |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        lines.append(f"| `{m}` | {_fmt(mean(m, 'new_tokens'), 'new_tokens')} | {_fmt_ci(table[m][SPEED.key], '')} | "
                     f"{_fmt(mean(m, 'time_to_first_token_s'))} | {_fmt(mean(m, 'prefill_s'))} |")
    return lines + (_figure(figures, "quality_vs_speed.png", "Quality vs speed", lambda path: plots.quality_vs_speed(
        path, methods, {m: table[m][SPEED.key] for m in methods}, {m: table[m][headline.key] for m in methods},
        headline)) or [""])


def _samples_section(methods, by_method, examples, ids: list[str]) -> list[str]:
    complete = [i for i in ids if all(i in by_method[m] for m in methods)][:SAMPLES]
    if not complete:
        return []
    lines = ["## Sample outputs", "", "The public request only: private contexts are never copied into this report.", ""]
    for i in complete:
        example = examples[i]
        lines += [f"### `{i}`", "", "Request:", "", _fence(_clip(example.task, 400)), ""]
        if example.reference is not None:
            lines += ["Reference:", "", _fence(_clip(example.reference, 500)), ""]
        for m in methods:
            lines += [f"`{m}`:", "", _fence(_clip(by_method[m][i]["text"], 600)), ""]
    return lines
