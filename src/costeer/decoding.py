"""The one decoding loop every method goes through."""

from __future__ import annotations

import codecs
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .backends.base import LanguageModel, StreamGroup
from .certified import CertificationStats, Pick
from .cloud import CloudSession, RemoteCloud
from .context_cache import ContextCache
from .errors import UserError
from .methods import Policy, Role
from .sampling import SamplingConfig, TokenPicker

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
    context_cache_tokens: int = 0  # private prompt tokens restored from the context cache, not prefilled
    alignment: dict | None = None  # a device model of another vocabulary: how it kept in step


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


class _GroupAdvancer:
    """Advances every group by one token. Remote groups run in a thread while the
    local ones compute, so a step costs max(cloud, device), not their sum; local
    groups stay sequential (they share this machine's cores)."""

    def __init__(self, groups: dict[Role, StreamGroup | CloudSession]) -> None:
        self._local = [g for g in groups.values() if not isinstance(g, CloudSession)]
        self._remote = [g for g in groups.values() if isinstance(g, CloudSession)]
        self._pool = ThreadPoolExecutor(max_workers=len(self._remote)) if self._remote else None

    def __call__(self, token: int) -> None:
        pending = [self._pool.submit(g.advance, token) for g in self._remote] if self._pool else []
        for group in self._local:
            group.advance(token)
        for future in pending:
            future.result()

    def close(self) -> None:
        if self._pool:
            self._pool.shutdown(wait=True)


def _open(model: LanguageModel | RemoteCloud, prompts: list, max_new_tokens: int, first_cloud_k: int | None):
    if isinstance(model, RemoteCloud):
        if len(prompts) != 1:
            raise ValueError("a remote cloud session holds one public conversation")
        return model.open_session(prompts[0], max_new_tokens, first_cloud_k)
    return model.open_streams(prompts, max_new_tokens)


class _StepDistributions(Sequence):
    """Each stream's distribution at this step, read from its group on first access:
    a step whose policy leaves the device streams unread costs no device pass."""

    def __init__(self, stream_groups: list[tuple[StreamGroup | CloudSession, int]]) -> None:
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


def _decide_step(
    policy: Policy,
    by_role: dict[Role, list[int]],
    groups: dict[Role, StreamGroup | CloudSession],
    sampling: SamplingConfig,
    cloud: CloudSession | None,
    certification: CertificationStats,
) -> Pick:
    """The policy's pick for this step, asking the cloud again at the same position
    for as long as the policy says it must (a bounded number of times)."""
    where: list = [None] * len(policy.streams)
    for role, indices in by_role.items():
        for n, i in enumerate(indices):
            where[i] = (groups[role], n)
    asked: list[int | None] = []
    while True:
        decision = policy.decide(_StepDistributions(where), sampling)
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


def decode(
    policy: Policy,
    models: dict[Role, LanguageModel | RemoteCloud],
    prompts: Sequence[Sequence],
    picker: TokenPicker,
    max_new_tokens: int,
    stop: Sequence[str] = (),
    on_text: Callable[[str], None] | None = None,
    context_cache: ContextCache | None = None,
) -> DecodeResult:
    """Generate with `policy`. `prompts[i]` is the prompt of `policy.streams[i]`, as
    its model's `encode_chat` made it (token ids; a public chat for a remote cloud).

    Streams of the same model form one group that advances in lockstep (and is
    batched by the backend); every group is fed each chosen token. Where the policy
    cannot settle a step from a remote cloud's top-k, the loop asks the cloud again
    at the same position, as the policy says, until it can. With a `context_cache`,
    local streams of private prompts start from the longest saved prefix (exactly).
    """
    start = time.perf_counter()
    by_role: dict[Role, list[int]] = {}
    for i, spec in enumerate(policy.streams):
        by_role.setdefault(spec.role, []).append(i)
    groups: dict[Role, StreamGroup | CloudSession] = {}
    advance_all = None
    sampling = picker.config
    certification = CertificationStats()
    reused = 0
    try:
        # a remote cloud prefills its prompt while this machine prefills the device's
        remote = [role for role in by_role if isinstance(models[role], RemoteCloud)]
        with ThreadPoolExecutor(max_workers=1) as pool:
            opening = {role: pool.submit(_open, models[role], [prompts[i] for i in by_role[role]], max_new_tokens,
                                         policy.first_cloud_k(sampling)) for role in remote}
            try:
                for role, indices in by_role.items():
                    if role in opening:
                        continue
                    private = [policy.streams[i].prompt == "private" for i in indices]
                    if context_cache is not None and any(private):
                        groups[role], n = context_cache.open_streams(models[role], [prompts[i] for i in indices],
                                                                     max_new_tokens, private)
                        reused += n
                    else:
                        groups[role] = _open(models[role], [prompts[i] for i in indices], max_new_tokens, None)
            finally:
                failed = None
                for role, future in opening.items():
                    try:
                        groups[role] = future.result()  # kept even if a local open failed, so it gets closed
                    except BaseException as exc:
                        failed = exc
            if failed is not None:
                raise failed
        if policy.pauses_device and "slm" in groups and not isinstance(groups["slm"], CloudSession):
            groups["slm"] = _PausableGroup(groups["slm"], policy)
        prefill_s = time.perf_counter() - start
        prompt_lengths = [0] * len(policy.streams)
        for role, indices in by_role.items():
            for i, n in zip(indices, groups[role].prompt_lengths):
                prompt_lengths[i] = n
        advance_all = _GroupAdvancer(groups)
        decoder_model = models[policy.streams[0].role]
        eos = decoder_model.eos_token_ids
        text = TextAssembler(stop)
        tokens: list[int] = []
        first_token_s = 0.0
        finish = "length"
        cloud = next((g for g in groups.values() if isinstance(g, CloudSession)), None)
        while len(tokens) < max_new_tokens:
            token = picker.pick(_decide_step(policy, by_role, groups, sampling, cloud, certification).scores)
            policy.chose(token)
            if not tokens:
                first_token_s = time.perf_counter() - start
            if token in eos:
                finish = "eos"
                break
            tokens.append(token)
            shown = text.add(decoder_model.token_bytes(token))
            if shown and on_text:
                on_text(shown)
            if text.stopped:
                finish = "stop"
                break
            if len(tokens) < max_new_tokens:
                advance_all(token)
        rest = text.finish()
        if rest and on_text:
            on_text(rest)
        traffic = _merge_traffic(groups.values())
        if traffic is not None and certification.steps:
            traffic.update(certification.as_dict())
        alignment = next((a for a in (g.alignment() for g in groups.values() if isinstance(g, StreamGroup)) if a), None)
    finally:
        for group in groups.values():
            group.close()
        if advance_all is not None:
            advance_all.close()
    return DecodeResult(
        text=text.text,
        token_ids=tokens,
        finish_reason=finish,
        prompt_lengths=prompt_lengths,
        traffic=traffic,
        prefill_s=prefill_s,
        time_to_first_token_s=first_token_s,
        elapsed_s=time.perf_counter() - start,
        context_cache_tokens=reused,
        alignment=alignment,
    )
