"""CoGenesis-format splits written on the spot, for the evaluation's tests."""

import json
from pathlib import Path

CANARY = "canary-5521"


def write_split(folder: Path, name: str = "dev", n: int = 3, **overrides) -> Path:
    """A CoGenesis-format split: ctx_NAME.json (tasks with a private context) and ctx_NAME_wo.json."""
    folder.mkdir(parents=True, exist_ok=True)
    with_ctx = [{"tid": f"t{i}", "conversations": [
        {"from": "user", "value": f"Profile: {CANARY} likes owls.\n\nTask {i}: write a note."},
        {"from": "assistant", "value": f"Reference {i}."}]} for i in range(n)]
    without = [{"tid": f"t{i}", "conversations": [
        {"from": "user", "value": f"Task {i}: write a note."},
        {"from": "assistant", "value": f"Reference {i}."}]} for i in range(n)]
    with_ctx = overrides.get("with_ctx", with_ctx)
    without = overrides.get("without", without)
    (folder / f"ctx_{name}.json").write_text(json.dumps(with_ctx))
    (folder / f"ctx_{name}_wo.json").write_text(json.dumps(without))
    return folder / f"ctx_{name}.json"


def write_prefeval(folder: Path, topics: dict[str, int] | None = None) -> Path:
    """A PrefEval mcq_options folder: topic files of items, the right option first."""
    folder.mkdir(parents=True, exist_ok=True)
    for topic, n in (topics or {"travel": 2, "pets": 1}).items():
        items = [{"preference": f"I ({CANARY}) never eat fish, item {i}.", "question": f"Where should I eat, {topic} {i}?",
                  "explanation": "fish", "classification_task_options": [
                      "Steak.", "Sushi.", "Fish grill.", "Oysters."]}
                 for i in range(n)]
        (folder / f"{topic}.json").write_text(json.dumps(items))
    return folder
