"""Shared fixtures. Tests marked `models` run the real default GGUF models
(assembled into the user cache on first use, as `costeer` itself does)."""

from __future__ import annotations

from pathlib import Path

import pytest

EXAMPLE_PROFILE = Path(__file__).resolve().parents[1] / "src" / "costeer" / "examples" / "profile.md"
BIRTHDAY_PROMPT = "Write a two-sentence invitation to my birthday party."
# Facts only the example profile holds; the cloud model alone cannot know them.
PROFILE_FACTS = ("Thaddeus", "Tromsø", "Polaria", "ice sculpt", "reindeer", "Ingrid", "Pølse", "frosty")


@pytest.fixture(scope="session", autouse=True)
def private_context_cache(tmp_path_factory):
    """Every test, and every `costeer` it starts, keeps its context cache in a temporary
    folder: the user's own cache is never read or written."""
    folder = tmp_path_factory.mktemp("context-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COSTEER_CONTEXT_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def default_costeer():
    from costeer import CoSteer

    cs = CoSteer(quiet=True, context_cache=False)  # every prefill cold: tests compare against it
    cs.model("llm"), cs.model("slm")
    yield cs
    cs.close()


@pytest.fixture(scope="session")
def profile_text() -> str:
    return EXAMPLE_PROFILE.read_text(encoding="utf-8")


def facts_in(text: str) -> list[str]:
    return [f for f in PROFILE_FACTS if f.lower() in text.lower()]
