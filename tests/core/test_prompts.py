import json

import pytest

from costeer import UserError, load_context
from costeer.prompts import CONTEXT_INTRO, PAPER_SYSTEM_PROMPT, REQUEST_INTRO, build_prompts


def test_public_prompt_holds_the_request_only_and_private_adds_the_context():
    pair = build_prompts("Plan my weekend.", "I live in Tromsø.")
    assert pair.public == [
        {"role": "system", "content": PAPER_SYSTEM_PROMPT},
        {"role": "user", "content": "Plan my weekend."},
    ]
    assert pair.private[0] == pair.public[0]
    assert pair.private[1]["content"] == f"{CONTEXT_INTRO}\n\nI live in Tromsø.\n\n{REQUEST_INTRO}\nPlan my weekend."
    assert "Tromsø" not in json.dumps(pair.public, ensure_ascii=False)


def test_no_context_means_identical_conversations_and_no_system_prompt_is_allowed():
    pair = build_prompts("Hi.", "", system_prompt=None)
    assert pair.public == pair.private == [{"role": "user", "content": "Hi."}]


def test_context_files_text_markdown_json_and_inline_are_joined_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("plain facts\n", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Me\n- likes owls", encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"name": "Ada", "pets": ["cat", {"kind": "dog", "name": "Rex"}]}))
    text = load_context([tmp_path / "a.txt", tmp_path / "b.md", tmp_path / "c.json"], "inline note")
    assert text.split("\n\n") == [
        "plain facts",
        "# Me\n- likes owls",
        "name: Ada\npets:\n  - cat\n  - kind: dog\n    name: Rex",
        "inline note",
    ]


@pytest.mark.parametrize("content, message", [(b"\xff\xfe\x00bad", "not UTF-8"), (b"{oops", "not valid JSON")])
def test_unreadable_context_files_are_user_errors(tmp_path, content, message):
    path = tmp_path / "ctx.json"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message):
        load_context([path])


def test_empty_prompt_is_refused():
    with pytest.raises(UserError, match="empty"):
        build_prompts("  ", "ctx")


def test_a_conversation_gets_the_context_in_its_first_user_turn_and_keeps_its_own_system_message():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Plan my weekend."},
             {"role": "assistant", "content": "Hike?"}, {"role": "user", "content": "Indoors, please."}]
    pair = build_prompts(turns, "I live in Tromsø.")
    assert pair.public == turns  # as given: its own system message, no default one added
    assert [m["content"] for m in pair.private] == ["Be brief.", f"{CONTEXT_INTRO}\n\nI live in Tromsø.\n\n"
                                                    f"{REQUEST_INTRO}\nPlan my weekend.", "Hike?", "Indoors, please."]
    assert "Tromsø" not in json.dumps(pair.public, ensure_ascii=False)


def test_a_one_turn_conversation_is_the_request_itself():
    single = build_prompts([{"role": "user", "content": "Plan my weekend."}], "I live in Tromsø.")
    assert single == build_prompts("Plan my weekend.", "I live in Tromsø.")


@pytest.mark.parametrize("turns", [[], [{"role": "assistant", "content": "Hi."}], [{"role": "user", "content": " "}]])
def test_a_conversation_without_a_request_is_refused(turns):
    with pytest.raises(UserError, match="empty"):
        build_prompts(turns, "ctx")


def test_a_context_folder_stands_for_its_text_files_in_name_order(tmp_path):
    (tmp_path / "b.md").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "c.json").write_text('{"third": 3}', encoding="utf-8")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")  # not a context file type: skipped
    (tmp_path / ".hidden.md").write_text("skipped", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.txt").write_text("not read: subfolders are not", encoding="utf-8")
    assert load_context([tmp_path], "inline").split("\n\n") == ["first", "second", "third: 3", "inline"]


def test_a_folder_without_context_files_is_a_user_error(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError, match="holds no"):
        load_context([tmp_path])
