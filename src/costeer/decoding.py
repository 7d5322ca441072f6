"""The one decoding loop every method goes through: open each model's streams
(`_Groups.open`), pick tokens until done (`_token_loop`), and say what it cost
(`decode`). Local models and a remote cloud are the same to it (`Streams`)."""

from __future__ import annotations

import codecs
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .backends.base import StreamGroup, Streams, StreamSource
from .certified import CertificationStats, Pick
from .errors import UserError
from .explain import TokenStep, explain_step
from .methods import Policy, Role
from .sampling import SamplingConfig, TokenPicker
from .speculation import SpeculativeGroup, steered_guess

log = logging.getLogger(__name__)

# A step asks a remote cloud again at most this often: the ladder (k x16, then the
# full vector) ends within 4 requests for any vocabulary below 2**20 tokens.
MAX_REQUESTS_PER_STEP = 8


@dataclass
class DecodeResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "eos", "stop" (a stop string) or "length"
    prompt_lengths: list[int]  # per stream, in policy.streams order
    prefill_s: float
    time_to_first_token_s: float
    elapsed_s: float
    traffic: dict | None = None  # remote groups' network counters, and certification
    restored_prompt_tokens: int = 0  # prompt tokens started from a saved state, not prefilled
    alignment: dict | None = None  # a device model of another vocabulary: how it kept in step
    steps: list[TokenStep] | None = None  # with explain: one record per picked token (explain.py)


class TextAssembler:
    """Turns chosen tokens into text: incremental UTF-8, stop strings, and a
    hold-back so streamed text never includes the start of a stop string."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = [s for s in stop if s]
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.text = ""
        self._emitted = 0
        self.stopped = False

    def add(self, piece: bytes) -> str:
        """Add a token's bytes; return the text now safe to show."""
        self.text += self._decoder.decode(piece)
        cut = min((i for i in (self.text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True
            return self._emit(len(self.text))
        return self._emit(len(self.text) - self._holdback)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        if upto <= self._emitted:
            return ""
        chunk = self.text[self._emitted : upto]
        self._emitted = upto
        return chunk


def _merge_traffic(groups) -> dict | None:
    counters = [t for t in (g.traffic() for g in groups) if t]
    if not counters:
        return None
    merged: dict = {}
    for c in counters:
        for k, v in c.items():
            if isinstance(v, bool):
                merged[k] = merged.get(k, False) or v
            elif isinstance(v, (int, float)):
                merged[k] = merged.get(k, 0) + v
            else:  # a description (a server's kind or cap): the first one given
                merged.setdefault(k, v)
    return merged


class _StepDistributions(Sequence):
    """Each stream's distribution at this step, read from its group on first access:
    a step whose policy leaves the device streams unread costs no device pass."""

    def __init__(self, stream_groups: list[tuple[Streams, int]]) -> None:
        self._where = stream_groups  # per stream: its group, its index in the group
        self._read: dict[int, list] = {}

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        group, index = self._where[i]
        if id(group) not in self._read:
            self._read[id(group)] = group.next_tokens()
        return self._read[id(group)][index]


class _PausableGroup(StreamGroup):
    """A device group that holds the tokens back while the policy has paused it, and
    feeds them in one batch when it is read or resumed."""

    def __init__(self, inner: StreamGroup, policy: Policy) -> None:
        self._inner, self._policy = inner, policy
        self._held: list[int] = []
        self._prompt_lengths = inner.prompt_lengths
        self.restored_tokens = inner.restored_tokens

    def _catch_up(self) -> None:
        if self._held:
            self._inner.advance_many(self._held)
            self._held = []

    def logits(self) -> np.ndarray:
        self._catch_up()
        return self._inner.logits()

    def next_tokens(self):
        self._catch_up()
        return self._inner.next_tokens()

    def advance(self, token_id: int) -> None:
        if self._policy.device_paused:
            self._held.append(token_id)
        else:
            self._catch_up()
            self._inner.advance(token_id)

    def alignment(self) -> dict | None:
        return self._inner.alignment()

    def close(self) -> None:
        self._inner.close()


class _Groups:
    """The policy's streams as open groups, one per model (its streams advance in
    lockstep, batched by the backend), and where each stream is: its group, its index."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.by_role: dict[Role, list[int]] = {}
        for i, spec in enumerate(policy.streams):
            self.by_role.setdefault(spec.role, []).append(i)
        self.groups: dict[Role, Streams] = {}  # each as it opens: close() closes what did
        self.widening: Streams | None = None  # the group that can be asked again (a remote cloud)
        self.speculating: SpeculativeGroup | None = None  # the device group, where it drafts for the cloud
        self._where: list[tuple[Streams, int]] = []
        self._local: list[Streams] = []
        self._remote: list[Streams] = []
        self._pool: ThreadPoolExecutor | None = None  # advances the remote groups

    def open(self, models: dict[Role, StreamSource], prompts: Sequence[Sequence], max_new_tokens: int,
             first_k: int | None) -> None:
        """A remote cloud prefills its prompt in a thread while this machine prefills the local models."""
        def open_role(role: Role, k: int | None) -> Streams:
            indices = self.by_role[role]
            return models[role].open_for_decoding([prompts[i] for i in indices], max_new_tokens, first_k=k,
                                                  private=[self.policy.streams[i].prompt == "private" for i in indices])

        with ThreadPoolExecutor(max_workers=1) as pool:
            opening = {role: pool.submit(open_role, role, first_k) for role in self.by_role if models[role].remote}
            try:
                for role in self.by_role:
                    if role not in opening:
                        self.groups[role] = open_role(role, None)
            finally:
                failed = None
                for role, future in opening.items():
                    try:
                        self.groups[role] = future.result()  # kept even if a local open failed, so it gets closed
                    except BaseException as exc:
                        failed = exc
            if failed is not None:
                raise failed
        if self.policy.pauses_device and "slm" in self.groups and not self.groups["slm"].remote:
            self.groups["slm"] = _PausableGroup(self.groups["slm"], self.policy)
        self.widening = next((g for g in self.groups.values() if g.widens), None)
        self._start_speculation()
        self._where = [(self.groups[s.role], self.by_role[s.role].index(i)) for i, s in enumerate(self.policy.streams)]
        self._local = [g for g in self.groups.values() if not g.remote]
        self._remote = [g for g in self.groups.values() if g.remote]
        self._pool = ThreadPoolExecutor(max_workers=len(self._remote)) if self._remote else None

    def _start_speculation(self) -> None:
        """Where the cloud takes drafts, the device model guesses them (speculation.py):
        with its private and public streams, from a group that can take tokens back."""
        if not getattr(self.widening, "drafts", 0):
            return
        device = self.groups.get("slm")
        prompts = {self.policy.streams[i].prompt: n for n, i in enumerate(self.by_role.get("slm", []))}
        if device is None or device.remote or self.policy.pauses_device or not getattr(device, "rewinds", False) \
                or not {"private", "public"} <= prompts.keys():
            log.warning("speculate: %s does not read a device model of the cloud's vocabulary every step, so no "
                        "draft is made (each token costs a request, as without speculate)", self.policy.name)
            return
        self.groups["slm"] = self.speculating = SpeculativeGroup(device, steered_guess(prompts["private"], prompts["public"]))

    def distributions(self) -> _StepDistributions:
        return _StepDistributions(self._where)

    def advance(self, token: int, remaining: int) -> None:
        """Every group by one token; `remaining`: the tokens still to pick after it. Remote
        groups run in a thread while the local ones compute, so a step costs max(cloud,
        device), not their sum; local groups stay sequential (they share this machine's
        cores). While speculating, the device goes first: a request to the cloud carries
        the draft it makes then (no longer than what is left to pick: the streams hold
        room for max_new_tokens, no more)."""
        if self.speculating is not None:
            for group in self._local:
                group.advance(token)
            cloud = self.widening
            n = min(cloud.drafts, remaining)
            draft = self.speculating.draft(n) if n > 0 and cloud.asks_after(token) else ()
            pending = [self._pool.submit(g.advance, token, draft) if g is cloud else self._pool.submit(g.advance, token)
                       for g in self._remote]
            if draft:  # while the cloud computes: the device's pass on its last guess, used if followed
                self.speculating.run_ahead(draft[-1])
            for future in pending:
                future.result()
            return
        pending = [self._pool.submit(g.advance, token) for g in self._remote] if self._pool else []
        for group in self._local:
            group.advance(token)
        for future in pending:
            future.result()

    def prompt_lengths(self) -> list[int]:
        """Per stream, in policy.streams order."""
        lengths = [0] * len(self.policy.streams)
        for role, indices in self.by_role.items():
            for i, n in zip(indices, self.groups[role].prompt_lengths):
                lengths[i] = n
        return lengths

    def traffic(self, certification: CertificationStats) -> dict | None:
        """The remote groups' network counters, and how their steps were certified."""
        traffic = _merge_traffic(self.groups.values())
        if traffic is not None and certification.steps:
            traffic.update(certification.as_dict())
        if traffic is not None and self.speculating is not None:
            traffic.update(draft_tokens=self.speculating.drafted, draft_tokens_followed=self.speculating.followed)
        return traffic

    def alignment(self) -> dict | None:
        return next((a for a in (g.alignment() for g in self.groups.values()) if a), None)

    def restored_tokens(self) -> int:
        return sum(g.restored_tokens for g in self.groups.values())

    def close(self) -> None:
        for group in self.groups.values():
            group.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _decide_step(policy: Policy, groups: _Groups, sampling: SamplingConfig, certification: CertificationStats) -> Pick:
    """The policy's pick for this step, asking the cloud again at the same position
    for as long as the policy says it must (a bounded number of times)."""
    cloud = groups.widening
    asked: list[int | None] = []
    while True:
        decision = policy.decide(groups.distributions(), sampling)
        if isinstance(decision, Pick):
            break
        if cloud is None or len(asked) >= MAX_REQUESTS_PER_STEP:
            raise RuntimeError(f"{policy.name} asked for more than the cloud can send ({asked})")
        asked.append(decision.k)
        cloud.widen(decision.k)
    if cloud is not None and (asked or decision.certified is not None):
        certification.record(decision, asked)
    if not np.isfinite(decision.scores).any():
        raise UserError(f"{policy.name}: the cloud sent nothing this method can choose from")
    return decision


@dataclass
class _Tokens:
    """What the token loop made."""

    text: str
    ids: list[int]
    finish_reason: str
    first_token_s: float  # since decoding started


def _token_loop(policy: Policy, groups: _Groups, decoder: StreamSource, picker: TokenPicker, max_new_tokens: int,
                stop: Sequence[str], on_text: Callable[[str], None] | None, certification: CertificationStats,
                start: float, steps: list[TokenStep] | None) -> _Tokens:
    """Pick, show and feed tokens until an end of text, a stop string or `max_new_tokens`;
    with `steps`, append each pick's explanation there."""
    eos = decoder.eos_token_ids
    text = TextAssembler(stop)
    tokens: list[int] = []
    first_token_s = 0.0
    finish = "length"
    while len(tokens) < max_new_tokens:
        decision = _decide_step(policy, groups, picker.config, certification)
        token = picker.pick(decision.scores)
        if steps is not None:  # before chose(): a stateful policy explains the step it decided
            steps.append(explain_step(policy, groups.distributions(), decision.scores, token, decoder.token_bytes))
        policy.chose(token)
        if not tokens:
            first_token_s = time.perf_counter() - start
        if token in eos:
            finish = "eos"
            break
        tokens.append(token)
        shown = text.add(decoder.token_bytes(token))
        if shown and on_text:
            on_text(shown)
        if text.stopped:
            finish = "stop"
            break
        if len(tokens) < max_new_tokens:
            groups.advance(token, max_new_tokens - len(tokens))
    rest = text.finish()
    if rest and on_text:
        on_text(rest)
    return _Tokens(text.text, tokens, finish, first_token_s)


def decode(
    policy: Policy,
    models: dict[Role, StreamSource],
    prompts: Sequence[Sequence],
    picker: TokenPicker,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    explain: bool = False,
) -> DecodeResult:
    """Generate with `policy`. `prompts[i]` is the prompt of `policy.streams[i]`, as
    its model's `encode_chat` made it (token ids; a public chat for a remote cloud).
    `explain`: record every pick (explain.py), at the cost of two log-softmaxes a step.

    Streams of the same model form one group that advances in lockstep (and is
    batched by the backend); every group is fed each chosen token. Where the policy
    cannot settle a step from a remote cloud's top-k, the loop asks the cloud again
    at the same position, as the policy says, until it can.
    """
    start = time.perf_counter()
    groups = _Groups(policy)
    certification = CertificationStats()
    steps: list[TokenStep] | None = [] if explain else None
    try:
        groups.open(models, prompts, max_new_tokens, policy.first_cloud_k(picker.config))
        prefill_s = time.perf_counter() - start
        prompt_lengths = groups.prompt_lengths()
        policy.started(prompt_lengths)
        made = _token_loop(policy, groups, models[policy.streams[0].role], picker, max_new_tokens, stop, on_text,
                           certification, start, steps)
        traffic, alignment = groups.traffic(certification), groups.alignment()
    finally:
        groups.close()
    return DecodeResult(
        text=made.text,
        token_ids=made.ids,
        finish_reason=made.finish_reason,
        prompt_lengths=prompt_lengths,
        traffic=traffic,
        prefill_s=prefill_s,
        time_to_first_token_s=made.first_token_s,
        elapsed_s=time.perf_counter() - start,
        restored_prompt_tokens=groups.restored_tokens(),
        alignment=alignment,
        steps=steps,
    )
