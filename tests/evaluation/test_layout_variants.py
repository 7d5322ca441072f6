"""evaluation/layouts.py (scripts/layout_variants.py) changes exactly one part of the
device prompt per variant, and what it writes is a CoGenesis split that `costeer eval`
reads, row for row."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from costeer.evaluation import layouts as layout
from costeer.evaluation.datasets import load_dataset

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "cogenesis"


def _row(private: str, public: str) -> tuple[dict, dict]:
    reference = {"from": "assistant", "value": "the reference"}
    return ({"tid": "t1", "conversations": [{"from": "user", "value": private}, reference]},
            {"tid": "t1", "conversations": [{"from": "user", "value": public}, reference]})


PRIVATE = ("Emulate the author.\n\n## User Profile\nName: A\n\n## User Writing History\nold text\n\n"
           "## Task\nWrite a note.\n")


def test_each_variant_changes_one_part():
    w, wo = _row(PRIVATE, "Write a note.")
    a, b = layout.variant("no-instruction", w, wo)
    assert a["conversations"][0]["value"] == "## User Profile\nName: A\n\n## User Writing History\nold text\n\n## Task\nWrite a note.\n"
    assert b == wo
    a, b = layout.variant("no-history", w, wo)
    assert a["conversations"][0]["value"] == "Emulate the author.\n\n## User Profile\nName: A\n\n## Task\nWrite a note.\n"
    assert b == wo
    a, b = layout.variant("shared-instruction", w, wo)
    assert a == w
    assert b["conversations"][0]["value"] == "Emulate the author.\n\n## Task\nWrite a note.\n"
    assert w["conversations"][0]["value"] == PRIVATE  # inputs are not modified
    with pytest.raises(ValueError):
        layout.variant("no-such-variant", w, wo)


@pytest.mark.skipif(not DATA.is_dir(), reason="needs ../shared/data/cogenesis")
def test_written_variants_load_and_pair_with_the_original(tmp_path):
    # the script, as a user runs it
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "layout_variants.py"), "--data", str(DATA),
                             "--out", str(tmp_path), "--limit", "5"], capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and script.stderr == ""
    assert script.stdout == "".join(f"{tmp_path / name}: 5 rows\n" for name in layout.VARIANTS)
    original = load_dataset(str(DATA)).examples[:5]
    for name in layout.VARIANTS:
        examples = load_dataset(str(tmp_path / name)).examples
        assert [e.id for e in examples] == [e.id for e in original]
        for new, old in zip(examples, original):
            assert new.reference == old.reference
            private, public = new.private[-1]["content"], new.public[-1]["content"]
            if name == "no-instruction":
                assert private.startswith("## User Profile") and "## User Writing History" in private
                assert new.public == old.public
            elif name == "no-history":
                assert "## User Writing History" not in private and "## User Profile" in private
                assert new.public == old.public
            else:
                assert new.private == old.private
                assert public.endswith(old.public[-1]["content"] + "\n") and "## Task" in public
    assert json.loads((tmp_path / "no-history" / "ctx_dev.json").read_text(encoding="utf-8"))[0]["tid"] == original[0].id


PAPER = ROOT.parent / "shared" / "data" / "cogenesis-paper" / "paper_dev.json"


@pytest.mark.skipif(not PAPER.is_file(), reason="needs ../shared/data/cogenesis-paper")
def test_the_paper_split_gets_its_variants_under_its_own_file_names(tmp_path):
    script = subprocess.run([sys.executable, str(ROOT / "scripts" / "layout_variants.py"), "--data", str(PAPER),
                             "--out", str(tmp_path), "--limit", "3"], capture_output=True, text=True, timeout=120)
    assert script.returncode == 0 and script.stderr == ""
    assert sorted(p.name for p in (tmp_path / "shared-instruction").iterdir()) == ["paper_dev.json", "paper_dev_wo.json"]
    original = load_dataset(str(PAPER)).examples[:3]
    shared = load_dataset(str(tmp_path / "shared-instruction" / "paper_dev.json")).examples
    bare = load_dataset(str(tmp_path / "no-history" / "paper_dev.json")).examples
    for old, new, without in zip(original, shared, bare):
        public, task = new.public[-1]["content"], old.public[-1]["content"]
        assert new.private == old.private and public.startswith("You are now a helpful personal AI assistant")
        assert public.endswith(f"## Task\n{task}\n") and "## History Paper Abstracts" not in public
        assert "## History Paper Abstracts" not in without.private[-1]["content"] and without.public == old.public

    missing = subprocess.run([sys.executable, str(ROOT / "scripts" / "layout_variants.py"), "--data",
                              str(tmp_path / "nothing.json"), "--out", str(tmp_path / "x")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith("layout_variants: no CoGenesis split at ")
