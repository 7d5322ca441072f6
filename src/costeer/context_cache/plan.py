"""Which saved entry a prompt starts from, and which of its states to save after."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .format import Entry

# Shorter shared prefixes are not worth a file read (and are not a context).
MIN_SHARED_TOKENS = 64


@dataclass(frozen=True)
class Plan:
    entry: Entry | None  # the entry to start from
    keep: int  # its tokens reused
    snapshot: int | None  # prompt tokens whose state to save (None: save nothing)
    replaces: Entry | None  # the entry the saved state replaces


def make_plan(entries: list[Entry], prompt: np.ndarray, block: int) -> Plan:
    """The entry sharing the longest prefix with `prompt`, and what to save after.

    An entry that is this very prompt, with the logits after it, starts the stream
    with no prefill. Otherwise entries converge to what requests share: when most of the
    prompt is reused, the rest is a request, and an entry that goes on differently is
    cut back to the shared part; an entry that is the prompt's start is left alone, and
    the whole prompt is saved beside it (with its logits, for the same prompt again).
    When most of the prompt is new (another context after a shared system prompt),
    the prompt is saved whole beside the entry, which other requests may still need.
    """
    n = len(prompt)
    best, shared = None, 0
    for entry in entries:  # ties: the shorter entry (a prefix of the prompt needs no rewrite)
        s = entry.shared_prefix(prompt)
        if s > shared or (s == shared and best is not None and len(entry.tokens) < len(best.tokens)):
            best, shared = entry, s
        if s == n == len(entry.tokens) and entry.has_logits:
            return Plan(entry, n, None, None)  # this prompt, as saved
    # at least one prompt token is computed (its logits start the answer), and whole
    # blocks only (so what follows is computed in the batches a cold start uses)
    keep = min(shared, n - 1) // block * block
    if best is None or keep < MIN_SHARED_TOKENS:
        return Plan(None, 0, n, None)  # a miss
    if 2 * keep < n:
        return Plan(best, keep, n, None)
    if shared < len(best.tokens) and shared < n:
        return Plan(best, keep, keep, best)
    return Plan(best, keep, n if shared < n else None, None)


def snapshot_marks(plans: dict[int, Plan]) -> dict[int, int]:
    return {i: p.snapshot for i, p in plans.items() if p.snapshot is not None}
