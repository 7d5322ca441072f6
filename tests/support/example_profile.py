"""The packaged example profile and the request the tests ask about it."""

from __future__ import annotations

from pathlib import Path

EXAMPLE_PROFILE = Path(__file__).resolve().parents[2] / "src" / "costeer" / "examples" / "profile.md"
BIRTHDAY_PROMPT = "Write a two-sentence invitation to my birthday party."
# Facts only the example profile holds; the cloud model alone cannot know them.
PROFILE_FACTS = ("Thaddeus", "Tromsø", "Polaria", "ice sculpt", "reindeer", "Ingrid", "Pølse", "frosty")


def facts_in(text: str) -> list[str]:
    return [f for f in PROFILE_FACTS if f.lower() in text.lower()]
