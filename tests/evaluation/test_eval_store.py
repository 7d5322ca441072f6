"""results.jsonl: resuming after a torn write, no duplicate rows, one writer at a time."""

import json

import pytest

from costeer import UserError
from costeer.evaluation.store import ResultsStore, read_rows


def row(i: int, method: str = "llm") -> dict:
    return {"id": f"t{i}", "method": method, "text": f"answer {i}", "rougeL": i / 10}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_survive_reopening_and_are_never_written_twice(tmp_path):
    path = tmp_path / "out" / "results.jsonl"
    with ResultsStore(path) as store:
        store.append(row(1))
        store.append(row(1, "costeer"))
        with pytest.raises(ValueError, match="already stored"):
            store.append(row(1))
    with ResultsStore(path) as store:
        assert store.done(("t1", "llm")) and store.done(("t1", "costeer")) and not store.done(("t2", "llm"))
        assert store.rows == [row(1), row(1, "costeer")]
        store.append(row(2))
    assert lines(path) == [row(1), row(1, "costeer"), row(2)]


def test_a_torn_last_line_is_dropped_and_cut_before_appending(tmp_path):
    path = tmp_path / "results.jsonl"
    good = json.dumps(row(1)) + "\n" + json.dumps(row(2)) + "\n"
    path.write_text(good + json.dumps(row(3))[:25])  # killed mid-write: no newline
    with ResultsStore(path) as store:
        assert [r["id"] for r in store.rows] == ["t1", "t2"]
        assert path.read_text() == good  # the fragment is gone before anything is appended
        store.append(row(3))
    assert lines(path) == [row(1), row(2), row(3)]


def test_a_damaged_complete_line_is_a_user_error_naming_the_line(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(1)) + "\n{not json\n" + json.dumps(row(2)) + "\n")
    with pytest.raises(UserError, match="line 2"):
        ResultsStore(path).__enter__()
    path.write_text(json.dumps({"text": "no id"}) + "\n")
    with pytest.raises(UserError, match="line 1"):
        read_rows(path)


def test_duplicate_keys_already_in_the_file_count_once(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps(row(1)) + "\n" + json.dumps(row(1) | {"text": "later"}) + "\n")
    rows, _ = read_rows(path)
    assert rows == [row(1)]


def test_two_runs_cannot_write_the_same_folder(tmp_path):
    path = tmp_path / "results.jsonl"
    with ResultsStore(path):
        with pytest.raises(UserError, match="another costeer eval"):
            ResultsStore(path).__enter__()
    with ResultsStore(path):  # released on close
        pass


@pytest.mark.parametrize("how", ["replaced by an older copy", "removed", "replaced by a copy with a row of its own"])
def test_a_file_replaced_under_a_running_store_gets_every_row(tmp_path, how, caplog):
    """A git checkout or stash replaces results.jsonl while a run appends to it: the run's
    open handle would go on writing to a deleted file, and its rows would be lost."""
    path = tmp_path / "results.jsonl"
    with ResultsStore(path) as store:
        store.append(row(0))
        older = path.read_bytes()
        store.append(row(1))
        if how == "removed":
            path.unlink()
        else:
            extra = (json.dumps(row(9, "costeer")) + "\n").encode() if "own" in how else b""
            replacement = tmp_path / "replacement"
            replacement.write_bytes(older + extra)
            replacement.replace(path)  # a new file (inode) at the path, as git writes one
        store.append(row(2))
        store.append(row(3))
        assert {"t0", "t1", "t2", "t3"} <= {r["id"] for r in store.rows}
    kept = [(r["id"], r["method"]) for r in lines(path)]
    assert sorted(kept) == sorted([(f"t{i}", "llm") for i in range(4)] + ([("t9", "costeer")] if "own" in how else []))
    assert len(kept) == len(set(kept))  # nothing twice
    assert "was replaced while this run wrote to it" in caplog.text
    with ResultsStore(path) as again:  # and a resume sees them all
        assert again.done(("t3", "llm")) and again.done(("t1", "llm"))
