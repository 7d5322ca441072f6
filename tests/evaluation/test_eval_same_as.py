"""`costeer eval` answers once for methods that are the same policy on a row (`fit` at
weight 1 is `mix:1`; `auto` is the method it names): the copy must be exactly what the
method would have made, and the report must say which answers were copied."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from costeer import CoSteer
from costeer.config import GenerationRequest
from costeer.evaluation.datasets import load_dataset
from costeer.evaluation.machine import machine_fingerprint
from costeer.evaluation.runner import RESULTS, TIMING_FIELDS, EvalSettings, run_eval
from costeer.fusion import SteeringParams
from costeer.methods import AUTO_METHOD, FIT_LONG, FIT_SHORT, make_policy
from support.cogenesis import write_prefeval, write_split
from support.fakes import NumpyModel
from support.tiny_hf import TORCH_IN_PROCESS

pytestmark = TORCH_IN_PROCESS  # the scorer's embedding model

LONG = "Profile: likes owls, rivers and long walks by the fjord in winter. " * 12  # > FIT_LONG[0] bytes
SHORT = "Likes owls."


@pytest.fixture(scope="module")
def numpy_costeer():
    """Byte-level NumPy models: a context's length in device tokens is its length in bytes."""
    cs = CoSteer(NumpyModel(1, "numpy-cloud"), NumpyModel(2, "numpy-device"), quiet=True)
    yield cs
    cs.close()


def split(folder):
    def row(i: int, context: str) -> dict:
        return {"tid": f"t{i}", "conversations": [{"from": "user", "value": f"{context}\n\nTask {i}: write a note."},
                                                 {"from": "assistant", "value": f"Reference {i}."}]}
    without = [{"tid": f"t{i}", "conversations": [{"from": "user", "value": f"Task {i}: write a note."},
                                                  {"from": "assistant", "value": f"Reference {i}."}]} for i in range(2)]
    return write_split(folder, n=2, with_ctx=[row(0, LONG), row(1, SHORT)], without=without)


def rows_of(out) -> dict[tuple[str, str], dict]:
    return {(r["id"], r["method"]): r for r in map(json.loads, (out / RESULTS).read_text().splitlines())}


def test_the_weight_decides_which_policies_are_the_same():
    params = SteeringParams()
    mix1, fit, fit_half, unsure = (make_policy(m, params) for m in ("mix:1", "fit", "fit:0.5", "unsure:1"))
    for added, same_fit_mix1, same_fits in ((FIT_LONG[0] + 300, True, False), (FIT_SHORT[0] // 2, False, True)):
        for p in (mix1, fit, fit_half, unsure):
            p.started([40, 40 + added, 40])
        assert (fit.decoding_key() == mix1.decoding_key()) is same_fit_mix1
        assert (fit.decoding_key() == fit_half.decoding_key()) is same_fits
    assert unsure.decoding_key() is None  # reshapes the step: no claim, though its weight is 1
    for method in ("bounded:1", "ada", "specsteer", "costeer-plausible", "cos"):
        assert make_policy(method, params).decoding_key() is None, method
    loop, closed = make_policy("costeer", params, "loop"), make_policy("costeer", params)
    assert loop.decoding_key() != closed.decoding_key()  # the loop reads every FTRL parameter
    assert make_policy("costeer", params).decoding_key() == make_policy(f"mix:{params.coefficient!r}", params).decoding_key()


def test_copied_answers_are_the_answers_the_method_makes(tmp_path, numpy_costeer):
    data, out = split(tmp_path / "data"), tmp_path / "out"
    methods = ["llm", "mix:1", "fit", "fit:0.5", "auto"]
    report = run_eval(EvalSettings(dataset=str(data), out=out, methods=methods, max_new_tokens=12, figures=False),
                      numpy_costeer).read_text()
    rows = rows_of(out)
    copies = {key: r["same_as"] for key, r in rows.items() if "same_as" in r}
    assert {k: v for k, v in copies.items() if k[1] != "auto"} == {("t0", "fit"): "mix:1", ("t1", "fit:0.5"): "fit"}
    if AUTO_METHOD in methods:  # `auto` is the method it names (the check below regenerates it in any case)
        assert all(copies[t, "auto"] == rows[t, AUTO_METHOD].get("same_as", AUTO_METHOD) for t in ("t0", "t1"))
    assert rows["t0", "fit"]["steering_coefficient"] == 1.0 and rows["t1", "fit"]["steering_coefficient"] == 3.0
    examples = {e.id: e for e in load_dataset(str(data)).examples}
    request = EvalSettings(dataset=str(data), out=out, max_new_tokens=12).request()
    for (example, method), source in copies.items():
        made = numpy_costeer.generate_from_messages(examples[example].public, examples[example].private,
                                                    replace(request, method=method))
        copy = rows[example, method]
        assert made.text == copy["text"] == rows[example, source]["text"]
        assert made.steering_coefficient == copy["steering_coefficient"]
        assert all(copy[k] is None for k in TIMING_FIELDS) and rows[example, source]["tokens_per_second"] > 0
        assert copy["machine"] == rows[example, source]["machine"] == machine_fingerprint()  # made where its source was
    assert "`fit`: 1 `mix:1`'s of its 2 answers" in report and "`fit:0.5`: 1 `fit`'s of its 2 answers" in report
    assert "| `fit` | 12.0 |" in report  # speed: the answer it made; the copy's timing is not invented


def test_a_later_run_takes_a_stored_answer_and_unseeded_sampling_takes_none(tmp_path, numpy_costeer):
    data = split(tmp_path / "data")
    first = tmp_path / "first"
    run_eval(EvalSettings(dataset=str(data), out=first, methods=["mix:1"], max_new_tokens=8, figures=False), numpy_costeer)
    run_eval(EvalSettings(dataset=str(data), out=first, methods=["mix:1", "fit"], max_new_tokens=8, figures=False),
             numpy_costeer)
    rows = rows_of(first)
    assert rows["t0", "fit"].get("same_as") == "mix:1" and "same_as" not in rows["t1", "fit"]

    sampled = tmp_path / "sampled"
    run_eval(EvalSettings(dataset=str(data), out=sampled, methods=["mix:1", "fit"], max_new_tokens=8, figures=False,
                          temperature=1.0), numpy_costeer)
    assert not any("same_as" in r for r in rows_of(sampled).values())  # not reproducible: every answer made
    seeded = tmp_path / "seeded"
    run_eval(EvalSettings(dataset=str(data), out=seeded, methods=["mix:1", "fit"], max_new_tokens=8, figures=False,
                          temperature=1.0, seed=5), numpy_costeer)
    assert rows_of(seeded)["t0", "fit"]["same_as"] == "mix:1"


def test_multiple_choice_scores_each_distinct_policy_once(tmp_path, numpy_costeer):
    data, out = write_prefeval(tmp_path / "mcq", {"pets": 2}), tmp_path / "out"
    run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=["llm", "mix:1"], figures=False), numpy_costeer)
    methods = ["llm", "mix:1", "fit", "fit:1", "fit:0.5"]  # fit:1 is fit
    run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=methods, figures=False), numpy_costeer)
    rows = rows_of(out)
    examples = {e.id: e for e in load_dataset(f"prefeval-mcq:{data}").examples}
    for item in ("pets-000", "pets-001"):
        assert {m: rows[item, m].get("same_as") for m in methods} == {
            "llm": None, "mix:1": None, "fit": None, "fit:1": "fit", "fit:0.5": None}  # ~100 bytes: weights differ
        assert rows[item, "fit:1"]["elapsed_s"] is None and np.isfinite(rows[item, "fit"]["elapsed_s"])
        e = examples[item]
        scored = numpy_costeer.score_from_messages(e.public, e.private, e.options, methods, GenerationRequest())
        for method in methods:
            assert rows[item, method]["option_mean_logprobs"] == [s.mean for s in scored[method]]
    if make_policy(AUTO_METHOD, SteeringParams()).decoding_key() is not None:
        run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=[*methods, "auto"], figures=False),
                 numpy_costeer)
        auto = rows_of(out)["pets-000", "auto"]
        assert auto["same_as"] in methods and auto["correct"] == rows["pets-000", auto["same_as"]]["correct"]


def test_a_stored_auto_answer_is_never_copied(tmp_path, numpy_costeer):
    """An `auto` row is what auto named when it was made, which a later AUTO_METHOD may not be."""
    data, out = write_prefeval(tmp_path / "mcq", {"pets": 1}), tmp_path / "out"
    run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=["llm", "auto"], figures=False), numpy_costeer)
    lines = (out / RESULTS).read_text().splitlines()
    older = [json.dumps(r | {"option_mean_logprobs": [0.0, 0.0, 0.0, 0.0]}) if r["method"] == "auto" else json.dumps(r)
             for r in map(json.loads, lines)]  # as if auto had named another method then
    (out / RESULTS).write_text("\n".join(older) + "\n")
    run_eval(EvalSettings(dataset=f"prefeval-mcq:{data}", out=out, methods=["llm", "auto", AUTO_METHOD], figures=False),
             numpy_costeer)
    named = rows_of(out)["pets-000", AUTO_METHOD]
    assert "same_as" not in named and named["option_mean_logprobs"] != [0.0, 0.0, 0.0, 0.0]
