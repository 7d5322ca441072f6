"""CoGenesis splits with the device prompt laid out differently, to test whether the
layout, not the private content, drives the paper's over-steering (what
scripts/layout_variants.py writes).

The private prompt is an instruction paragraph, then sections (`## User Profile`,
`## User Writing History` and `## Task` in `ctx`; `## History Paper Abstracts` and
`## Task` in `paper`); the public prompt is the task alone. Rows keep their tids and
references, so answers pair with the original runs.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Iterator

from ..errors import UserError

SECTION = re.compile(r"^## (.+)$", re.M)
# Each changes one thing. no-instruction: the private prompt without its instruction
# paragraph; no-history: without the history sections (a profile kept); shared-instruction:
# the public prompt gets the instruction too (it is not private), so the delta holds the
# profile and history alone (`llm` must be re-run on it: its public prompt differs).
VARIANTS = ("no-instruction", "no-history", "shared-instruction")


def sections(prompt: str) -> tuple[str, dict[str, str]]:
    """(the text before the first `## ` header, {header: body}) of a private prompt."""
    marks = list(SECTION.finditer(prompt))
    if not marks:
        raise ValueError("no '## ' sections in the private prompt")
    head = prompt[: marks[0].start()].strip()
    bodies = {m.group(1).strip(): prompt[m.end(): (marks[k + 1].start() if k + 1 < len(marks) else len(prompt))].strip()
              for k, m in enumerate(marks)}
    return head, bodies


def render(head: str, bodies: dict[str, str]) -> str:
    parts = [head] if head else []
    parts += [f"## {name}\n{body}" for name, body in bodies.items()]
    return "\n\n".join(parts) + "\n"


def variant(name: str, with_row: dict, without_row: dict) -> tuple[dict, dict]:
    """One CoGenesis row pair (private, public) laid out as variant `name`; the inputs are not changed."""
    w, wo = copy.deepcopy(with_row), copy.deepcopy(without_row)
    head, bodies = sections(w["conversations"][0]["value"])
    if name == "no-instruction":
        w["conversations"][0]["value"] = render("", bodies)
    elif name == "no-history":
        bodies = {k: v for k, v in bodies.items() if "History" not in k}
        w["conversations"][0]["value"] = render(head, bodies)
    elif name == "shared-instruction":
        wo["conversations"][0]["value"] = render(head, {"Task": wo["conversations"][0]["value"]})
    else:
        raise ValueError(f"unknown variant {name!r}")
    return w, wo


def write_variants(data: Path, out: Path, limit: int) -> Iterator[tuple[Path, int]]:
    """Write OUT/VARIANT/X.json and X_wo.json from the first `limit` rows of the split
    DATA (X.json beside X_wo.json, or a folder with ctx_dev.json); yields each folder
    and its row count as it is written."""
    split = data / "ctx_dev.json" if data.is_dir() else data
    without = split.with_name(f"{split.stem}_wo.json")
    if not (split.is_file() and without.is_file()):
        raise UserError(f"no CoGenesis split at {data}: give X.json with X_wo.json beside it, "
                        "or a folder with ctx_dev.json and ctx_dev_wo.json")
    with_rows = json.loads(split.read_text(encoding="utf-8"))[:limit]
    without_rows = json.loads(without.read_text(encoding="utf-8"))[:limit]
    for name in VARIANTS:
        pairs = [variant(name, w, wo) for w, wo in zip(with_rows, without_rows)]
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for file, rows in ((split.name, [p[0] for p in pairs]), (without.name, [p[1] for p in pairs])):
            (folder / file).write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
        yield folder, len(pairs)
