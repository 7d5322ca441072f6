"""Where a steering weight goes wrong on CoGenesis, per answer and per token (what
scripts/diagnose_steering.py prints; Markdown text, returned for the caller to print).

Per answer: copying (the share of an answer's word 4-grams found in the private context
but not in the public request), length, and how the ROUGE-L gain over `llm` moves with
each. Per token: how often a method (the paper's `costeer` unless told) changed the
cloud's own choice, by the cloud's confidence, and the size of the steering term (c*delta
for `costeer`) at the chosen token.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from ..errors import UserError
from .compare import Answers
from .datasets import load_dataset

WORD = re.compile(r"\w+", re.UNICODE)


def grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = WORD.findall(text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def copy_rate(answer: str, private: str, public: str) -> float:
    mine = grams(answer)
    if not mine:
        return 0.0
    return len(mine & (grams(private) - grams(public))) / len(mine)  # each text split once


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(float) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 else float("nan")


def per_answer(answers: Sequence[tuple[str, Answers]], dataset_spec: str) -> str:
    """`answers`: (label, {row id: eval row}) per method; compared on the rows all share.
    Copying is measured against `dataset_spec`'s private prompt, so runs on a variant
    of the data (evaluation/layouts.py) are judged against the original context."""
    data = {e.id: e for e in load_dataset(dataset_spec).examples}
    ids = [i for i in data if all(i in rows for _, rows in answers)]
    if not ids:
        empty = [label for label, rows in answers if not rows.keys() & data.keys()]
        raise UserError(f"no row of {dataset_spec} is answered by every method"
                        + (f"; none at all by {', '.join(empty)}" if empty else ""))
    unwritten = [label for label, rows in answers if any("text" not in rows[i] for i in ids)]
    if unwritten:  # a multiple-choice run scores given options: no answer of its own to read
        raise UserError(f"{', '.join(unwritten)} wrote no answers (a multiple-choice run?): "
                        "the diagnosis reads generated text")
    scored = all("rougeL" in rows[i] for _, rows in answers for i in ids)  # not on tasks without a reference
    lines = [f"## Per answer ({len(ids)} rows)\n",
             "| method | 4-gram copy from the context | words | hit the token limit |" + (" ROUGE-L |" if scored else ""),
             "|---|---|---|---|" + ("---|" if scored else "")]
    copies: dict[str, list[float]] = {}
    for label, rows in answers:
        copies[label] = [copy_rate(rows[i]["text"], data[i].private[-1]["content"], data[i].public[-1]["content"])
                         for i in ids]
        words = [rows[i]["words"] for i in ids]
        limit = np.mean([rows[i]["finish_reason"] == "length" for i in ids])
        lines.append(f"| {label} | {np.mean(copies[label]):.3f} | {np.mean(words):.0f} | {limit:.0%} |"
                     + (f" {np.mean([rows[i]['rougeL'] for i in ids]):.3f} |" if scored else ""))
    base = dict(answers).get("llm")
    if base is not None and scored:
        lines += ["\nSpearman's rho over answers, ROUGE-L gain over `llm` against:\n",
                  "| method | its copy rate | its length change |",
                  "|---|---|---|"]
        for label, rows in answers:
            if label == "llm":
                continue
            gain = [rows[i]["rougeL"] - base[i]["rougeL"] for i in ids]
            longer = [rows[i]["words"] - base[i]["words"] for i in ids]
            lines.append(f"| {label} | {spearman(gain, copies[label]):+.2f} | {spearman(gain, longer):+.2f} |")
    return "\n".join(lines)


def per_token(dataset_spec: str, n_rows: int, max_new_tokens: int, costeer=None, method: str = "costeer") -> str:
    """Decode the first `n_rows` again with `method` (greedy; default the paper's
    `costeer`), every step explained (explain.py). `costeer`: a CoSteer to take the two
    models from (default: the default models)."""
    from ..api import CoSteer

    steps: list[tuple[float, bool, float]] = []  # cloud's top probability, flipped, steering term at the pick
    cs = costeer if costeer is not None else CoSteer(quiet=True, context_cache=False)
    for example in load_dataset(dataset_spec).examples[:n_rows]:
        g = cs.generate_from_messages(example.public, example.private, method=method,
                                      max_new_tokens=max_new_tokens, explain=True)
        steps += [(s.cloud_probability, s.changed, s.steering) for s in g.steps]
    p = np.array([s[0] for s in steps])
    flip = np.array([s[1] for s in steps])
    cd = np.array([s[2] for s in steps])
    lines = [f"\n## Per token ({len(steps)} steps of `{method}` on {n_rows} rows)\n",
             "| cloud's top probability | steps | flipped by steering | median steering term at a flip |",
             "|---|---|---|---|"]
    for lo, hi in ((0, 0.5), (0.5, 0.9), (0.9, 0.99), (0.99, 1.01)):
        sel = (p >= lo) & (p < hi)
        flips = sel & flip
        med = f"{np.median(cd[flips]):+.2f}" if flips.any() else "-"
        lines.append(f"| [{lo}, {min(hi, 1)}) | {sel.sum()} ({sel.mean():.0%}) | "
                     f"{flips.sum()} ({flips.sum() / max(sel.sum(), 1):.0%}) | {med} |")
    lines.append(f"\nFlips: {flip.sum()} of {len(steps)} steps ({flip.mean():.1%}); "
                 f"{(flip & (p >= 0.9)).sum()} of them where the cloud was at least 90% sure; "
                 f"{(flip & (cd > 3)).sum()} chose a token the steering term made e^3 = 20x likelier or more.")
    return "\n".join(lines)
