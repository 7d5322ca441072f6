"""Deterministic model-free parts for fast tests of decoding, certification and transport.

`NumpyModel` is a real `LanguageModel`: a byte-level tokenizer with ChatML special
tokens and a small seeded recurrent network whose hidden state is its "KV cache":
each stream advances by feeding only the new token, so a stream that was opened on
a long prompt and one that re-read everything agree exactly (tested), the way a
real cached model must. Two seeds give a cloud and a device model that share the
tokenizer. A closed group refuses to run, so a use-after-free shows up as an error
instead of silently stale logits.
"""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from costeer.backends.base import BatchEngine, ChatMessage, LanguageModel, PrefixStateError, StreamGroup, check_window
from costeer.distribution import top_k, top_probability

SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
IM_START, IM_END, END_OF_TEXT = 256, 257, 258
# Extra ids: multi-byte tokens, so a text has two tokenizations (as with BPE) and
# the vocabulary holds several ids that print alike (byte fragments do too).
EXTRA = (b"the", b" the", b"ing", b" a", b"\xe2\x80", b"\xe2\x80\x99", b"ab", b"ab")
VOCAB_SIZE = 256 + len(SPECIALS) + len(EXTRA)
HIDDEN = 24


class ClosedGroupError(RuntimeError):
    """A stream group used after close(): in llama.cpp this would be freed memory."""


class NumpyModel(LanguageModel):
    supports_lookahead = True

    pieces = [bytes([i]) for i in range(256)] + [s.encode() for s in SPECIALS] + list(EXTRA)
    specials = {s: 256 + i for i, s in enumerate(SPECIALS)}
    eos_ids = frozenset({IM_END, END_OF_TEXT})

    def __init__(self, seed: int, name: str | None = None, context_window: int = 4096, sharpness: float = 6.0) -> None:
        rng = np.random.default_rng(seed)
        self.name = name or f"numpy-rnn-{seed}"
        self.vocab_size = vocab = len(self.pieces)
        self.context_window = context_window
        self.eos_token_ids = self.eos_ids
        self._embed = rng.standard_normal((vocab, HIDDEN)).astype(np.float32)
        self._recur = (rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
        self._out = (rng.standard_normal((HIDDEN, vocab)) * sharpness / np.sqrt(HIDDEN)).astype(np.float32)
        self._pieces = list(self.pieces)
        self.forward_passes = 0  # counts advance() calls over every group, for tests of work done
        self._lock = threading.Lock()

    # --- tokenizer -------------------------------------------------------------------
    def special_token_ids(self) -> frozenset[int]:
        return frozenset(self.specials.values())

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        if not special:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        rest = text
        while rest:
            cut = min(((rest.find(s), s) for s in SPECIALS if s in rest), default=None)
            plain, special = (rest, None) if cut is None else (rest[: cut[0]], cut[1])
            ids.extend(plain.encode("utf-8"))
            if special is None:
                break
            ids.append(256 + SPECIALS.index(special))
            rest = rest[cut[0] + len(special):]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        return self._pieces[token_id]

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return turns + "<|im_start|>assistant\n"


    # --- the network -----------------------------------------------------------------
    def step_state(self, state: np.ndarray, token: int) -> np.ndarray:
        return np.tanh(self._recur @ state + self._embed[token])

    def state_logits(self, state: np.ndarray) -> np.ndarray:
        return (state @ self._out).astype(np.float32)

    def logits_after(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits after reading `tokens` from scratch (no cache): the reference."""
        state = np.zeros(HIDDEN, dtype=np.float32)
        for t in tokens:
            state = self.step_state(state, t)
        return self.state_logits(state)

    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, lookahead_depth: int = 0) -> StreamGroup:
        return NumpyStreams(self, prompts, max_new_tokens)

    def batch_engine(self, slots: int, slot_tokens: int, max_batch: int | None = None) -> BatchEngine:
        return NumpyBatchEngine(self, slots, slot_tokens, max_batch or 3)

    def count_pass(self) -> None:
        with self._lock:
            self.forward_passes += 1


class OtherVocabularyModel(NumpyModel):
    """A NumPy model with another tokenizer, laid out as SentencePiece ones are: its own
    control tokens first, then word pieces (some spelled like the byte-level fake's
    multi-byte tokens, most not), then byte fallback for all 256 bytes; greedy
    longest-match tokenization. For steering across tokenizers."""

    SPECIAL_TEXT = ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>")
    WORDS = (b" the", b"the", b"ing", b" friend", b"frie", b"nd", b" note", b" my", b"My", b" name", b" is",
             b"\n\n", b"er", b" a", b"\xe2\x80\x99", b"\xe2\x80\x99s", b"  ")
    pieces = [s.encode() for s in SPECIAL_TEXT] + list(WORDS) + [bytes([i]) for i in range(256)]
    specials = {s: i for i, s in enumerate(SPECIAL_TEXT)}
    eos_ids = frozenset({1, 4})  # <eos>, <end_of_turn>

    def __init__(self, seed: int, name: str | None = None, **kw) -> None:
        super().__init__(seed, name or f"numpy-other-{seed}", **kw)
        self._by_bytes = {p: i for i, p in reversed(list(enumerate(self.pieces))) if i >= len(self.SPECIAL_TEXT)}
        self._longest = max(len(p) for p in self.pieces)

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        ids: list[int] = []
        names = [s for s in self.SPECIAL_TEXT if special]
        rest = text
        while rest:
            cut = min(((rest.find(s), s) for s in names if s in rest), default=None)
            plain, marker = (rest, None) if cut is None else (rest[: cut[0]], cut[1])
            data = plain.encode("utf-8")
            while data:
                n = next(n for n in range(min(self._longest, len(data)), 0, -1) if data[:n] in self._by_bytes)
                ids.append(self._by_bytes[data[:n]])
                data = data[n:]
            if marker is None:
                break
            ids.append(self.specials[marker])
            rest = rest[cut[0] + len(marker):]
        return ids

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        turns = "".join(f"<start_of_turn>{m['role']}\n{m['content']}<end_of_turn>\n" for m in messages)
        return "<bos>" + turns + "<start_of_turn>model\n"


class NumpyStreams(StreamGroup):
    def __init__(self, model: NumpyModel, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        self._model = model
        self._prompt_lengths = [len(p) for p in prompts]
        for p in prompts:
            if not p:
                raise ValueError("empty prompt")
            check_window(model.name, model.context_window, len(p), max_new_tokens)
            if any(not 0 <= t < model.vocab_size for t in p):
                raise ValueError("token id out of range")
        self._states = []
        for p in prompts:
            state = np.zeros(HIDDEN, dtype=np.float32)
            for t in p:
                state = model.step_state(state, int(t))
            self._states.append(state)
        self._closed = False
        self._tree: dict[tuple[int, ...], np.ndarray] = {}  # path -> state, from the latest lookahead
        self._walked: tuple[int, ...] = ()  # tokens advanced along the tree since

    def logits(self) -> np.ndarray:
        if self._closed:
            raise ClosedGroupError("stream group used after close")
        return np.stack([self._model.state_logits(s) for s in self._states])

    def advance(self, token_id: int) -> None:
        if self._closed:
            raise ClosedGroupError("stream group used after close")
        path = self._walked + (int(token_id),)
        if path in self._tree:  # computed by the lookahead: no pass
            self._states, self._walked = [self._tree[path]], path
            return
        self._tree, self._walked = {}, ()
        self._states = [self._model.step_state(s, int(token_id)) for s in self._states]
        self._model.count_pass()

    rewinds = True

    def checkpoint(self) -> object:
        return list(self._states), self._tree, self._walked

    def rewind(self, mark: object) -> None:
        states, self._tree, self._walked = mark
        self._states = list(states)

    def advance_many(self, token_ids: Sequence[int]) -> None:
        """One "forward pass" for the lot, as a backend batches them."""
        if self._closed:
            raise ClosedGroupError("stream group used after close")
        self._tree, self._walked = {}, ()
        for t in token_ids:
            self._states = [self._model.step_state(s, int(t)) for s in self._states]
        if token_ids:
            self._model.count_pass()

    def lookahead(self, width: int, depth: int, min_probability: float = 0.0,
                  draft: Sequence[int] = ()) -> Iterator[tuple[tuple[int, ...], np.ndarray]]:
        if self._closed:
            raise ClosedGroupError("stream group used after close")
        if len(self._states) != 1:
            raise ValueError("lookahead needs a group of one stream")
        self._tree, self._walked = {(): self._states[0]}, ()
        base: tuple[int, ...] = ()
        for token in draft:  # a pass a draft token, as the server's chain computes them
            self._model.count_pass()
            child = (*base, int(token))
            self._tree[child] = self._model.step_state(self._tree[base], int(token))
            yield child, self._model.state_logits(self._tree[child])
            base = child
        frontier = [base]
        for _ in range(depth):
            self._model.count_pass()  # one batched pass per level
            children = []
            for path in frontier:
                state = self._tree[path]
                logits = self._model.state_logits(state)
                if top_probability(logits) < min_probability:
                    continue
                for token in top_k(logits, width)[0]:
                    child = path + (int(token),)
                    self._tree[child] = self._model.step_state(state, int(token))
                    yield child, self._model.state_logits(self._tree[child])
                    children.append(child)
            frontier = children

    def close(self) -> None:
        self._closed = True
        self._states = []


class NumpyBatchEngine(BatchEngine):
    """Slots of recurrent states: a slot's numbers do not depend on the batch, as the
    real engine's do not (up to its exact_batch). Records every forward pass's size,
    and refuses to work on a freed slot (in llama.cpp: cells of another session)."""

    exact_batch = 3
    prefill_block = 16

    def __init__(self, model: NumpyModel, slots: int, slot_tokens: int, max_batch: int) -> None:
        self._model, self.slots, self.slot_tokens, self.max_batch = model, slots, slot_tokens, max_batch
        self._states: list[np.ndarray | None] = [None] * slots
        self._lengths = [0] * slots
        self.passes: list[int] = []  # tokens in each decode forward pass

    def prefill(self, slot: int, prompt: Sequence[int], start: int) -> tuple[int, np.ndarray | None]:
        if start != self._lengths[slot] or start >= len(prompt) or len(prompt) + 1 > self.slot_tokens:
            raise ValueError(f"slot {slot} holds {self._lengths[slot]} tokens; cannot prefill from {start}")
        state = self._states[slot] if start else np.zeros(HIDDEN, dtype=np.float32)
        end = min(start + self.prefill_block, len(prompt))
        for t in prompt[start:end]:
            if not 0 <= t < self._model.vocab_size:
                raise ValueError("token id out of range")
            state = self._model.step_state(state, int(t))
        self._states[slot], self._lengths[slot] = state, end
        return end, self._model.state_logits(state) if end == len(prompt) else None

    def decode(self, entries: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        rows = []
        for first in range(0, len(entries), self.max_batch):
            group = entries[first:first + self.max_batch]
            self.passes.append(len(group))
            self._model.count_pass()
            for slot, token in group:
                if self._states[slot] is None or self._lengths[slot] + 1 > self.slot_tokens:
                    raise ClosedGroupError(f"slot {slot} is free or full")
                self._states[slot] = self._model.step_state(self._states[slot], int(token))
                self._lengths[slot] += 1
                rows.append(self._model.state_logits(self._states[slot]))
        return rows

    def free(self, slot: int) -> None:
        self._states[slot], self._lengths[slot] = None, 0


def cloud_and_device(cloud_seed: int = 1, device_seed: int = 2) -> tuple[NumpyModel, NumpyModel]:
    return NumpyModel(cloud_seed, "numpy-cloud"), NumpyModel(device_seed, "numpy-device")


def digest(values: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


# --- variants of NumpyModel that several test files use ------------------------------------

class EndlessModel(NumpyModel):
    """A NumPy model that never ends an answer by itself: it runs to max_tokens."""

    def __init__(self, seed: int, name: str) -> None:
        super().__init__(seed, name)
        self.eos_token_ids = frozenset()


class SlowEndlessModel(EndlessModel):
    """An endless model whose every forward pass takes `delay_s`: a generation long
    enough to be cut off mid-stream."""

    def __init__(self, seed: int, name: str, delay_s: float = 0.004) -> None:
        super().__init__(seed, name)
        self.delay_s = delay_s

    def count_pass(self) -> None:
        time.sleep(self.delay_s)
        super().count_pass()


class PrefixModel(NumpyModel):
    """A NumpyModel whose saved state is its hidden state after every prompt token."""

    supports_prefix_state = True
    prefix_state_block = 4
    state_version = "numpy-prefix 1"

    def __init__(self, path: Path) -> None:
        super().__init__(2, "numpy-device")
        self.path = path
        self.prefilled: list[int] = []  # prompt tokens computed by each open

    def open_streams(self, prompts, max_new_tokens, restore=None, snapshot=None, **kw):
        group = NumpyStreams(self, prompts, max_new_tokens)
        group.snapshots, group.snapshot_logits = {}, {}
        computed = 0
        for i, prompt in enumerate(prompts):
            states = []
            saved = (restore or {}).get(i)
            if saved is not None:
                whole = saved.keep == saved.n_tokens == len(prompt) and saved.logits is not None
                assert whole or (saved.keep % self.prefix_state_block == 0 and saved.keep < len(prompt))
                held = np.frombuffer(saved.state, dtype=np.float32)
                if held.size != saved.n_tokens * HIDDEN:
                    raise PrefixStateError("refused")
                states = list(held.reshape(-1, HIDDEN)[: saved.keep])
                if whole and not np.array_equal(saved.logits, self.state_logits(states[-1])):
                    raise PrefixStateError("logits that are not the state's")
            state = states[-1] if states else np.zeros(HIDDEN, dtype=np.float32)
            for token in prompt[len(states):]:
                state = self.step_state(state, int(token))
                states.append(state)
                computed += 1
            if snapshot and i in snapshot:
                group.snapshots[i] = np.stack(states[: snapshot[i]]).tobytes()
                if snapshot[i] == len(prompt):
                    group.snapshot_logits[i] = self.state_logits(states[-1])
            group._states[i] = state
        self.prefilled.append(computed)
        return group


class Pause:
    """A one-shot point where a server thread stops until the test lets it go."""

    def __init__(self) -> None:
        self._armed = False
        self._lock = threading.Lock()
        self.reached = threading.Event()
        self.go = threading.Event()

    def arm(self) -> "Pause":
        self._armed = True
        return self

    def __call__(self) -> None:
        with self._lock:
            if not self._armed:
                return
            self._armed = False
        self.reached.set()
        assert self.go.wait(30), "the test never released the pause"


class HookedModel(NumpyModel):
    """The cloud NumpyModel with pause points and injected failures."""

    def __init__(self) -> None:
        self.at_prefill, self.at_advance, self.at_validation = Pause(), Pause(), Pause()
        self.fail_prefill: str | None = None  # one-shot: the next prefill raises with this text
        self.fail_on_token: int | None = None  # advance() raises on this token
        super().__init__(1, "numpy-cloud")

    # the step handler reads vocab_size to validate the tokens after it found the session
    # and before it locks it: a pause there holds a step inside the close race's window
    @property
    def vocab_size(self) -> int:
        self.at_validation()
        return self._vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int) -> None:
        self._vocab_size = value

    def batch_engine(self, *args, **kwargs) -> None:
        return None  # the hooks sit in open_streams and advance: sessions with caches of their own

    def open_streams(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> StreamGroup:
        self.at_prefill()
        if self.fail_prefill:
            text, self.fail_prefill = self.fail_prefill, None
            raise RuntimeError(text)
        return _HookedStreams(self, prompts, max_new_tokens)


class _HookedStreams(NumpyStreams):
    def advance(self, token_id: int) -> None:
        self._model.at_advance()
        if token_id == self._model.fail_on_token:
            raise RuntimeError("private detail: /home/alice/profile.md")
        super().advance(token_id)
