"""Loading CoGenesis-format splits by folder or file, and the packaged preference tasks."""

import json
from pathlib import Path

import pytest

from costeer import PAPER_SYSTEM_PROMPT, UserError
from costeer.evaluation.datasets import load_dataset, preference_kinds
from support.cogenesis import CANARY, write_prefeval, write_split

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "cogenesis"
SHARED_PAPER = SHARED.with_name("cogenesis-paper")
SHARED_PREFEVAL = SHARED.with_name("prefeval") / "mcq"


def test_a_split_loads_from_its_folder_its_file_or_its_wo_sibling(tmp_path):
    path = write_split(tmp_path / "data")
    for spec in (tmp_path / "data", path, tmp_path / "data" / "ctx_dev_wo.json"):
        ds = load_dataset(str(spec))
        assert ds.name == str(path.resolve()) and ds.preference is None
        assert [e.id for e in ds.examples] == ["t0", "t1", "t2"]
    e = ds.examples[1]
    assert e.public == [{"role": "system", "content": PAPER_SYSTEM_PROMPT},
                        {"role": "user", "content": "Task 1: write a note."}]
    assert e.private[0] == e.public[0] and CANARY in e.private[1]["content"]
    assert CANARY not in json.dumps(e.public)  # the cloud's conversation never holds the context
    assert e.reference == "Reference 1." and e.task == "Task 1: write a note."


def test_the_shared_cogenesis_dev_split_loads(tmp_path):
    if not (SHARED / "ctx_dev.json").is_file():
        pytest.skip("no CoGenesis data beside the repository")
    ds = load_dataset(str(SHARED))
    assert len(ds.examples) == 150 and all(e.reference for e in ds.examples)
    assert all(len(e.private[-1]["content"]) > len(e.public[-1]["content"]) for e in ds.examples)


@pytest.mark.parametrize("kind", ["concise", "verbose", "creative", "uplifting"])
def test_preference_tasks_put_the_preference_in_the_device_prompt_only(kind):
    ds = load_dataset(f"preference:{kind}")
    assert ds.preference == kind and len(ds.examples) >= 20
    sentence = f"Your answer should be as {kind} as possible."
    for e in ds.examples:
        assert e.private[-1]["content"] == f"{e.task}\n\n{sentence}"
        assert e.public[-1]["content"] == e.task and sentence not in json.dumps(e.public)
        assert e.reference is None
    assert len({e.id for e in ds.examples}) == len(ds.examples)
    assert set(preference_kinds()) == {"concise", "verbose", "creative", "uplifting"}


def test_mistakes_are_user_errors_that_never_quote_the_data(tmp_path):
    cases = []
    cases.append((tmp_path / "missing", "dataset not found"))
    (tmp_path / "empty").mkdir()
    cases.append((tmp_path / "empty", "no CoGenesis split"))
    write_split(tmp_path / "two", "dev")
    write_split(tmp_path / "two", "test")
    cases.append((tmp_path / "two", "several splits (ctx_dev.json, ctx_test.json)"))
    lone = write_split(tmp_path / "lone")
    (tmp_path / "lone" / "ctx_dev_wo.json").unlink()
    cases.append((lone, "ctx_dev_wo.json not found"))
    short = write_split(tmp_path / "short")
    rows = json.loads(short.read_text())
    short.write_text(json.dumps(rows[:2]))
    cases.append((short, "has 2 rows but ctx_dev_wo.json has 3"))
    swapped = write_split(tmp_path / "swapped")
    wo = swapped.with_name("ctx_dev_wo.json")
    wo_rows = json.loads(wo.read_text())
    wo.write_text(json.dumps(wo_rows[::-1]))
    cases.append((swapped, "row 0: tid differs"))
    bad = write_split(tmp_path / "bad")
    rows = json.loads(bad.read_text())
    rows[1]["conversations"] = rows[1]["conversations"][:1]
    bad.write_text(json.dumps(rows))
    cases.append((bad, "row 1"))
    broken = write_split(tmp_path / "broken")
    broken.write_text(broken.read_text()[:-5])
    cases.append((broken, "not valid UTF-8 JSON (line 1"))
    for spec, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            load_dataset(str(spec))
        assert CANARY not in str(info.value)
    with pytest.raises(UserError, match="unknown preference 'funny'"):
        load_dataset("preference:funny")


def test_the_shared_paper_split_loads_like_the_ctx_one():
    if not (SHARED_PAPER / "paper_dev.json").is_file():
        pytest.skip("no CoGenesis paper data beside the repository")
    ds = load_dataset(str(SHARED_PAPER))
    assert ds.name.endswith("paper_dev.json") and len(ds.examples) == 161 and all(e.reference for e in ds.examples)
    assert all(len(e.private[-1]["content"]) > len(e.public[-1]["content"]) for e in ds.examples)


def test_a_folder_without_a_pair_of_files_is_refused(tmp_path):
    (tmp_path / "dev.json").write_text("[]")
    with pytest.raises(UserError, match="X.json with X_wo.json"):
        load_dataset(str(tmp_path))


def test_prefeval_items_hold_the_preference_in_the_device_prompt_only(tmp_path):
    ds = load_dataset(f"prefeval-mcq:{write_prefeval(tmp_path / 'mcq')}")
    assert ds.multiple_choice and [e.id for e in ds.examples] == ["pets-000", "travel-000", "travel-001"]
    for e in ds.examples:
        assert len(e.options) == 4 and e.options[0] == "Steak." and e.reference is None
        assert CANARY in json.dumps(e.private) and CANARY not in json.dumps(e.public) + e.task
        assert e.public[-1]["content"] == e.task and e.private[0] == e.public[0]


@pytest.mark.parametrize("item, message", [
    ({"preference": "p", "question": "q", "classification_task_options": ["only one"]}, "two or more"),
    ({"preference": "p", "classification_task_options": ["a", "b"]}, "needs 'preference', 'question'"),
    ({"preference": "p", "question": "q", "classification_task_options": ["a", " "]}, "non-empty"),
    ("not an item", "needs"),
])
def test_a_broken_prefeval_item_is_named_by_file_and_number_not_by_content(tmp_path, item, message):
    (tmp_path / "topic.json").write_text(json.dumps([item]))
    with pytest.raises(UserError, match=message) as caught:
        load_dataset(f"prefeval-mcq:{tmp_path}")
    assert "topic.json item 0" in str(caught.value) and "'p'" not in str(caught.value)
    with pytest.raises(UserError, match="folder of PrefEval"):
        load_dataset(f"prefeval-mcq:{tmp_path / 'topic.json'}")


def test_the_shared_prefeval_dev_topics_load_whole():
    if not SHARED_PREFEVAL.is_dir():
        pytest.skip("no PrefEval data beside the repository")
    ds = load_dataset(f"prefeval-mcq:{SHARED_PREFEVAL}")
    assert len(ds.examples) == 505 and len({e.id for e in ds.examples}) == 505
    assert len({e.id.rsplit("-", 1)[0] for e in ds.examples}) == 10
    assert all(len(e.options) == 4 for e in ds.examples)
