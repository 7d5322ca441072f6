"""Evaluation datasets: CoGenesis-format splits and the packaged preference tasks.

CoGenesis format (its `ctx` and `paper` tasks): `X.json` holds rows `{"tid", "conversations":
[user turn WITH the private context, ..., assistant reference]}` and its sibling `X_wo.json`
the same tasks, in the same tid order, WITHOUT the context. The device model reads the
first, the cloud model the second.

Preference tasks (`preference:KIND`, as in the paper): public instructions shipped in
`preference_prompts.json`; the private context is "Your answer should be as KIND as
possible", appended to the instruction in the device model's prompt only.

PrefEval multiple choice (`prefeval-mcq:DIR`, Zhao et al., ICLR 2025): a folder of topic files,
each a list of items with a stated `preference` (the private context), a `question` (the
public request) and four `classification_task_options`, of which the first follows the
preference. Methods do not generate here: each option is scored as the answer
(`CoSteer.score`) and the likeliest per token is the method's choice.

Error messages name files and row numbers, never row contents (they are private).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..backends.base import ChatMessage
from ..errors import UserError
from ..prompts import PAPER_SYSTEM_PROMPT, build_prompts

PREFERENCE_FILE = Path(__file__).with_name("preference_prompts.json")
PREFERENCE_PREFIX = "preference:"
CHOICE_PREFIX = "prefeval-mcq:"
_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}


@dataclass(frozen=True)
class Example:
    id: str
    public: list[ChatMessage]  # what the cloud model sees
    private: list[ChatMessage]  # what the device model sees (with the private context)
    reference: str | None  # the reference answer; None for preference tasks
    task: str  # the public request, for the report's samples
    options: tuple[str, ...] = ()  # multiple choice: the candidate answers, the right one first
    topic: str = ""  # PrefEval: the topic file it came from (the report breaks accuracy down by it)


@dataclass(frozen=True)
class Dataset:
    name: str  # canonical: the with-context file's absolute path, or preference:KIND
    preference: str | None  # the preference kind, None for reference-based datasets
    examples: list[Example]

    @property
    def multiple_choice(self) -> bool:
        return bool(self.examples) and bool(self.examples[0].options)


def load_dataset(spec: str) -> Dataset:
    """A CoGenesis folder or X.json file (beside X_wo.json), `preference:KIND`, or
    `prefeval-mcq:DIR`."""
    if spec.startswith(PREFERENCE_PREFIX):
        return load_preference(spec[len(PREFERENCE_PREFIX) :])
    if spec.startswith(CHOICE_PREFIX):
        return load_prefeval_mcq(Path(spec[len(CHOICE_PREFIX) :]))
    return load_cogenesis(Path(spec))


def load_prefeval_mcq(folder: Path) -> Dataset:
    """Every topic file in `folder`, in name order; item i of topic T is `T-i`. The private
    prompt is the public one with the preference added as costeer adds any context."""
    if not folder.is_dir():
        raise UserError(f"{CHOICE_PREFIX} needs a folder of PrefEval topic files (mcq_options), got {folder}")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise UserError(f"no PrefEval topic files (*.json) in {folder}")
    examples = []
    for path in files:
        for i, item in enumerate(_read_rows(path)):
            fields = (item.get("preference"), item.get("question"), item.get("classification_task_options")) \
                if isinstance(item, dict) else (None, None, None)
            preference, question, options = fields
            if not (isinstance(preference, str) and isinstance(question, str) and isinstance(options, list)
                    and len(options) >= 2 and all(isinstance(o, str) and o.strip() for o in options)):
                raise UserError(f"{path.name} item {i}: needs 'preference', 'question' and two or more non-empty "
                                "'classification_task_options'")
            pair = build_prompts(question, preference)
            examples.append(Example(f"{path.stem}-{i:03d}", list(pair.public), list(pair.private), None, question,
                                    tuple(options), topic=path.stem))
    return Dataset(f"{CHOICE_PREFIX}{folder.resolve()}", None, examples)


def preference_kinds() -> list[str]:
    return list(_preference_data()["preferences"])


def _preference_data() -> dict:
    return json.loads(PREFERENCE_FILE.read_text(encoding="utf-8"))


def load_preference(kind: str) -> Dataset:
    data = _preference_data()
    if kind not in data["preferences"]:
        raise UserError(f"unknown preference {kind!r}: choose one of {', '.join(data['preferences'])}")
    context = data["private_context"].format(preference=kind)
    system = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}]
    examples = [
        Example(
            id=f"{kind}-{i:02d}",
            public=system + [{"role": "user", "content": instruction}],
            private=system + [{"role": "user", "content": f"{instruction}\n\n{context}"}],
            reference=None,
            task=instruction,
        )
        for i, instruction in enumerate(data["instructions"])
    ]
    return Dataset(f"{PREFERENCE_PREFIX}{kind}", kind, examples)


def resolve_cogenesis(path: Path) -> tuple[Path, Path]:
    """(with-context file, without-context file) for a folder or either file of a split."""
    if path.is_dir():
        splits = sorted(p for p in path.glob("*.json")
                        if not p.stem.endswith("_wo") and p.with_name(f"{p.stem}_wo.json").is_file())
        if not splits:
            raise UserError(f"no CoGenesis split (X.json with X_wo.json beside it) in {path}")
        if len(splits) > 1:
            raise UserError(f"{path} holds several splits ({', '.join(p.name for p in splits)}): pass one file")
        path = splits[0]
    elif not path.is_file():
        raise UserError(f"dataset not found: {path} (a CoGenesis folder or X.json, preference:KIND or "
                        f"{CHOICE_PREFIX}DIR)")
    if path.stem.endswith("_wo"):
        path = path.with_name(path.stem[: -len("_wo")] + path.suffix)
    without = path.with_name(f"{path.stem}_wo{path.suffix}")
    for p in (path, without):
        if not p.is_file():
            raise UserError(f"CoGenesis split incomplete: {p} not found")
    return path.resolve(), without.resolve()


def load_cogenesis(path: Path) -> Dataset:
    with_path, without_path = resolve_cogenesis(path)
    with_rows, without_rows = _read_rows(with_path), _read_rows(without_path)
    if len(with_rows) != len(without_rows):
        raise UserError(f"{with_path.name} has {len(with_rows)} rows but {without_path.name} has {len(without_rows)}")
    examples = []
    seen: set[str] = set()
    for i, (w, wo) in enumerate(zip(with_rows, without_rows)):
        tid = _tid(w, with_path, i)
        if _tid(wo, without_path, i) != tid:
            raise UserError(f"row {i}: tid differs between {with_path.name} and {without_path.name}")
        if tid in seen:
            raise UserError(f"{with_path.name} row {i}: duplicate tid {tid!r}")
        seen.add(tid)
        private, reference = _conversation(w, with_path, i)
        public, _ = _conversation(wo, without_path, i)
        examples.append(Example(tid, public, private, reference, public[-1]["content"]))
    return Dataset(str(with_path), None, examples)


def _read_rows(path: Path) -> list:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        where = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise UserError(f"{path} is not valid UTF-8 JSON{where}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}: expected a JSON list of rows")
    return rows


def _tid(row: object, path: Path, i: int) -> str:
    if not isinstance(row, dict) or "tid" not in row:
        raise UserError(f"{path.name} row {i}: no 'tid'")
    return str(row["tid"])


def _conversation(row: dict, path: Path, i: int) -> tuple[list[ChatMessage], str]:
    """(system prompt + turns up to the last user turn, the final assistant turn as reference)."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or len(turns) < 2:
        raise UserError(f"{path.name} row {i}: 'conversations' must hold a user turn and the assistant reference")
    messages: list[ChatMessage] = []
    for turn in turns:
        role = _ROLES.get(turn.get("from")) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get("value"), str):
            raise UserError(f"{path.name} row {i}: each turn needs 'from' (user/assistant) and a text 'value'")
        messages.append({"role": role, "content": turn["value"]})
    if messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise UserError(f"{path.name} row {i}: the conversation must end with a user turn and the assistant reference")
    system = [] if messages[0]["role"] == "system" else [{"role": "system", "content": PAPER_SYSTEM_PROMPT}]
    return system + messages[:-1], messages[-1]["content"]
