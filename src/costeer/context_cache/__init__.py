"""A persistent cache of the local models' prefill, above all the device's private prompt.

Every request reads the whole private context on the device model first (seconds
for a long context). Requests with the same context share the start of their
private prompt (the context comes first, see `prompts.py`), so the device keeps the
model's state (its KV cache) after that prompt, on disk, and the next request with
a prompt that starts the same way loads it and prefills only the rest.

Exact by construction: an entry holds the token ids its state was computed from;
a request reuses only the longest run of its own first tokens that equals an
entry's, cut to whole blocks of the backend's `prefix_state_block`; the backend
prefills every prompt in batches of that block from position 0 and lays out its
cells the same way with or without a restored prefix, so what follows is computed
exactly as a cold start computes it: the same logits, bit for bit, and the same
tokens.

A prompt is also saved whole, with the next-token logits after it: the same prompt
again (the same request, a regenerated answer) then starts with no prefill at all.
Public prompts (the device's without the context, an embedded cloud model's) are
saved that way too; they are short, and serve only the same request again.

Entries are derived from private data: the folder is 0700, files 0600. Each file:

    MAGIC | uint32 header length | JSON header | int32 token ids | state bytes | logits

with the header {format, backend, model, n_tokens, state_bytes, logits_bytes, sha256
of tokens, state and logits}. Nothing in an entry is trusted: a file that is
truncated, foreign (another model or backend) or corrupt (digest), or a state the
backend refuses, is deleted and the prompt is prefilled cold (and saved afresh).
Writes are atomic (a temporary file named with the writer's pid, then `os.replace`);
temporary files a killed writer left are swept once they are an hour old and their
writer is gone. The folder is bounded in bytes; the least recently used entries go first. Only files and folders
named as the cache names its own (and entries that start with MAGIC) are ever
evicted or cleared: a cache folder pointed at the wrong place loses nothing else.
Messages name files and sizes only, never their content.

format.py holds an entry's file format, store.py the files on disk, plan.py the
choice of entry and of what to save; ContextCache (here) puts them together, and
`ContextCache.wrap(model)` is the model as the decoding loop sees it with the cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..backends.base import LanguageModel, PrefixRestore, PrefixStateError, StreamGroup
from ..default_models import DIGESTS_FILE
from .format import MAGIC, SUFFIX, BadEntry, Store, encode_entry, read_state
from .plan import Plan, make_plan, snapshot_marks
from .store import CacheFiles

__all__ = ["CacheInfo", "CachedModel", "ContextCache", "DIGESTS_FILE", "MAGIC", "SUFFIX"]

log = logging.getLogger(__name__)


class CachedModel:
    """A local model whose streams start from the context cache's longest matching saved
    prefix, exactly (and are saved for the next prompt); in all else the model itself."""

    def __init__(self, model: LanguageModel, cache: ContextCache) -> None:
        self.model = model
        self.cache = cache

    def __getattr__(self, name: str):  # all but opening streams: the model's own
        return getattr(self.model, name)

    def open_for_decoding(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, private: Sequence[bool],
                          first_k: int | None) -> StreamGroup:
        group, restored = self.cache.open_streams(self.model, prompts, max_new_tokens, [True] * len(prompts))
        # what the cache saved of the private context: public prompts are short, and
        # restored whole only when the same request comes again
        group.restored_tokens = sum(n for i, n in restored.items() if private[i])
        return group


@dataclass(frozen=True)
class CacheInfo:
    folder: Path
    entries: int
    bytes: int


class ContextCache(CacheFiles):
    """Saved device-model states of private prompts, reused by prompts that start the same way."""

    def __init__(self, folder: str | os.PathLike | None = None, max_bytes: int | None = None) -> None:
        super().__init__(folder, max_bytes)
        self._warned = False

    # -- the decoding loop's way in -----------------------------------------------------

    def wrap(self, model: LanguageModel) -> CachedModel:
        """`model`, its private prompts started from this cache (a `StreamSource`)."""
        return CachedModel(model, self)

    def open_streams(self, model: LanguageModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     cached: Sequence[bool]) -> tuple[StreamGroup, dict[int, int]]:
        """`model.open_streams(prompts, max_new_tokens)`, with the streams where `cached[i]`
        is true started from the longest matching saved prefix; also, per stream started
        so, how many prompt tokens were reused rather than prefilled."""
        if not model.supports_prefix_state or not any(cached):
            return model.open_streams(prompts, max_new_tokens), {}
        try:
            store = self._store(model)
            entries = self._entries(store)
        except OSError as exc:
            self._warn(f"not used ({exc.strerror or type(exc).__name__})")
            return model.open_streams(prompts, max_new_tokens), {}
        arrays = [np.asarray(p, dtype=np.int32) for p in prompts]
        plans = {i: make_plan(entries, arrays[i], store.block) for i, c in enumerate(cached) if c}
        restore: dict[int, PrefixRestore] = {}
        for i, plan in list(plans.items()):
            if plan.entry is None:
                continue
            try:
                state, logits = read_state(plan.entry, store)
                restore[i] = PrefixRestore(state, len(plan.entry.tokens), plan.keep,
                                           logits if plan.keep == len(plan.entry.tokens) else None)
                os.utime(plan.entry.path)  # used: last in line for eviction
            except (BadEntry, OSError):
                self._discard(plan.entry.path)
                plans[i] = make_plan([], arrays[i], store.block)
        try:
            group = model.open_streams(prompts, max_new_tokens, restore=restore, snapshot=snapshot_marks(plans))
        except PrefixStateError:  # the backend refused a state: forget it, start cold
            for i in restore:
                self._discard(plans[i].entry.path)
            plans = {i: make_plan([], arrays[i], store.block) for i in plans}
            restore = {}
            group = model.open_streams(prompts, max_new_tokens, snapshot=snapshot_marks(plans))
        try:
            self._save(store, plans, arrays, group.snapshots, getattr(group, "snapshot_logits", {}))
        except OSError as exc:
            self._warn(f"not written ({exc.strerror or type(exc).__name__})")
        return group, {i: r.keep for i, r in restore.items()}

    # -- user commands -----------------------------------------------------------------

    def info(self) -> CacheInfo:
        files = self._all_entries()
        return CacheInfo(self.folder, len(files), sum(size for _, size, _ in files))

    def clear(self) -> CacheInfo:
        """Delete every entry, the cache's temporary files, its digest memo and its store
        folders once empty; what was freed. Nothing not named as the cache names its own
        is touched (the cache folder itself is kept)."""
        entries = total = 0
        stores = self._store_folders()
        ours = [(path, True) for path, _, _ in self._all_entries()]
        ours += [(p, False) for folder in (self.folder, *stores) for p in self._temp_files(folder)]
        ours.append((self.folder / DIGESTS_FILE, False))
        for path, entry in ours:
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            total += size
            entries += entry
        for folder in stores:
            try:
                folder.rmdir()  # only if empty: a foreign file inside keeps it
            except OSError:
                pass
        self._stores.clear()
        return CacheInfo(self.folder, entries, total)

    def _save(self, store: Store, plans: dict[int, Plan], prompts: list[np.ndarray],
              snapshots: dict[int, bytes], snapshot_logits: dict[int, np.ndarray]) -> None:
        wrote = False
        for i, plan in plans.items():
            state = snapshots.get(i)
            if plan.snapshot is None or state is None:
                continue
            tokens = prompts[i][: plan.snapshot].astype("<i4").tobytes()
            parts = encode_entry(store, plan.snapshot, tokens, state, snapshot_logits.get(i))
            if sum(len(part) for part in parts) > self.max_bytes:
                continue  # would evict itself
            path = store.folder / (hashlib.sha256(tokens).hexdigest()[:32] + SUFFIX)
            self._make_dir(store.folder)
            self._write_atomic(path, parts)
            wrote = True
            if plan.replaces is not None and plan.replaces.path != path:
                self._discard(plan.replaces.path)
        if wrote:
            self._sweep_stale_temps(store.folder)
            self._evict()

    def _warn(self, what: str) -> None:
        if not self._warned:
            log.warning("costeer: private-context cache %s", what)
            self._warned = True
