"""The Python API: load the two models once, generate with any method."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Sequence

from .backends import LanguageModel, load_model, same_tokenizer
from .backends.aligned import AlignedModel
from .backends.base import ChatMessage, StreamSource
from .config import CloudConfig, GenerationRequest
from .decoding import decode
from .default_models import DEFAULT_LLM, DEFAULT_SLM, ChunkedModel, resolve_model_path
from .cloud import RemoteCloud
from .context_cache import ContextCache
from .errors import PrivacyError, UserError
from .explain import TokenStep
from .fusion import SteeringParams
from .methods import DEFAULT_TOP_K, Fusion, Policy, Role, StreamSpec, make_policy
from .prompts import PromptPair, build_prompts, declassify
from .sampling import TokenPicker
from .scoring import Score, score_continuations

__all__ = ["CloudConfig", "CoSteer", "Generation", "GenerationRequest", "Score"]

log = logging.getLogger(__name__)

ModelSource = str | os.PathLike | LanguageModel | None


@dataclass
class Generation:
    """One generated answer and what it cost."""

    text: str
    method: str
    new_tokens: int
    token_ids: list[int]
    finish_reason: str
    elapsed_s: float
    tokens_per_second: float
    time_to_first_token_s: float
    prefill_s: float
    prompt_tokens: dict[str, int]
    context_truncated: bool = False
    steering_coefficient: float | None = None
    traffic: dict | None = None  # with a remote cloud: bytes, round trips, certification
    context_cache_tokens: int = 0  # private prompt tokens reused from the context cache (0: prefilled)
    alignment: dict | None = None  # a device model of another tokenizer: how it kept in step (backends/aligned.py)
    paused_steps: int | None = None  # `ada`: steps picked by the cloud alone, the device not run
    steps: list[TokenStep] | None = None  # with explain=True: one record per picked token (explain.py)

    def to_dict(self) -> dict:
        fields = dict(self.__dict__)
        if self.steps is None:
            del fields["steps"]  # not asked for: the same fields as without explain
        else:
            fields["steps"] = [step.to_dict() for step in self.steps]
        return fields


@dataclass
class _ModelSlot:
    source: ModelSource
    default: ChunkedModel
    model: LanguageModel | RemoteCloud | None = None


class CoSteer:
    """Cloud model (`llm`) and device model (`slm`), loaded lazily on first need.

    >>> cs = CoSteer()                       # the embedded default Qwen2.5-Coder pair
    >>> g = cs.generate("Write a haiku about my city.", context="I live in Lisbon.")
    >>> print(g.text)
    """

    def __init__(
        self,
        llm: ModelSource = None,
        slm: ModelSource = None,
        backend: str = "auto",
        *,
        cloud: CloudConfig | None = None,
        context_cache: bool | ContextCache = True,
        quiet: bool = False,
    ):
        """`cloud`: where the cloud model runs instead of here (`CloudConfig`: a URL and how
        to talk to it), in place of a local `llm`. The device model (slm) stays local and
        alone reads the private context. `context_cache` keeps the device model's prefill
        of private prompts on disk and starts the next prompt with the same context from
        it, with the same output (True: the default folder; a `ContextCache`: that one;
        False: off)."""
        if cloud is not None and not isinstance(cloud, CloudConfig):
            raise TypeError(f"cloud takes a CloudConfig (CloudConfig(url, ...)), got {type(cloud).__name__}")
        if cloud is not None and llm is not None:
            raise UserError("give either a cloud URL or a local cloud model (--llm), not both")
        self._slots: dict[Role, _ModelSlot] = {"llm": _ModelSlot(llm, DEFAULT_LLM), "slm": _ModelSlot(slm, DEFAULT_SLM)}
        self.backend = backend
        self.quiet = quiet
        self._cloud = cloud
        self._device_beside_cloud: LanguageModel | None = None  # the device model as the loop sees it (_models_for)
        # the device model's saved prefill of private prompts (exact; see context_cache/)
        self.context_cache = ContextCache() if context_cache is True else context_cache or None

    @property
    def cloud_url(self) -> str | None:
        """Where the cloud model runs when not here (None: embedded)."""
        return self._cloud.url if self._cloud else None

    def model(self, role: Role) -> LanguageModel | RemoteCloud:
        slot = self._slots[role]
        if slot.model is None:
            source = slot.source
            if role == "llm" and self._cloud:
                from .transport.connect import connect_cloud

                slot.model = connect_cloud(self._cloud, tokenizer=self.model("slm"))
            elif isinstance(source, LanguageModel):
                slot.model = source
            else:
                slot.model = load_model(resolve_model_path(source, slot.default, self.quiet), self.backend)
        return slot.model

    def _policy(self, method: str, params: SteeringParams | None, fusion: Fusion) -> Policy:
        """The method's policy, refused before anything is sent if it would give the
        private context to a remote cloud."""
        policy = make_policy(method, params, fusion, self._cloud.top_k if self._cloud else DEFAULT_TOP_K)
        if self._cloud and policy.reads_private_context_in_cloud and not self._cloud.send_private_context_to_cloud:
            raise PrivacyError(
                f"method {policy.name!r} gives the cloud model the private context, and the cloud is remote "
                f"({self._cloud.url}); the privacy rule keeps private context on this device. Use a method that "
                "steers from the device (such as costeer), or pass --send-private-context-to-cloud to send it anyway"
            )
        return policy

    def _chat_for(self, spec: StreamSpec, pair: PromptPair) -> list:
        if spec.prompt == "public":
            return pair.public
        if spec.role == "llm" and self._cloud:
            return declassify(pair.private)  # allowed: _policy checked send_private_context_to_cloud
        return pair.private

    def _models_for(self, roles: set[Role]) -> dict[Role, StreamSource]:
        """The models as the loop opens them: beside a cloud of another tokenizer, the
        device model follows the cloud's tokens; with the context cache, local models
        start private prompts from their saved prefill."""
        models = {role: self.model(role) for role in roles}
        if len(models) == 2:
            models["slm"] = self._aligned_device(models["llm"], models["slm"])
        if self.context_cache is not None:
            models = {role: m if m.remote else self.context_cache.wrap(m) for role, m in models.items()}
        return models

    def _aligned_device(self, cloud: LanguageModel | RemoteCloud, device: LanguageModel) -> LanguageModel:
        """The device model itself where it shares the cloud's tokenizer; else the device
        model following the cloud's tokens and steering on the tokens the two share."""
        if self._device_beside_cloud is None:
            if same_tokenizer(cloud, device):
                self._device_beside_cloud = device
            else:
                if isinstance(cloud, RemoteCloud):
                    pieces, special = cloud.vocabulary()
                else:
                    pieces, special = cloud.vocabulary_fingerprint(), cloud.special_token_ids()
                self._device_beside_cloud = AlignedModel(device, pieces, special, cloud.eos_token_ids)
        return self._device_beside_cloud

    def generate(
        self,
        prompt: str | Sequence[ChatMessage],
        context: str = "",
        request: GenerationRequest | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        **keywords,
    ) -> Generation:
        """Answer `prompt` for the user whose private `context` only the device model reads.
        `prompt` may be a conversation (system, user and assistant turns): the context goes
        into its first user turn, and its own system message replaces the request's
        `system_prompt`. `on_text` gets the answer's text as it is made.

        `request` holds the settings; or give them as keyword arguments (method,
        max_new_tokens, temperature, top_p, top_k, seed, params, fusion, stop,
        system_prompt, max_context_tokens, explain: `GenerationRequest.from_keywords`), not both.
        `explain=True` fills `Generation.steps`: per token, the cloud's own pick and
        probability, the fused probability and the steering term (explain.py).

        A context that does not fit the device model's window (or `max_context_tokens`)
        is cut at its end, keeping its beginning, with a warning on stderr.
        """
        request = _request(request, keywords)
        policy = self._policy(request.method, request.steering, request.fusion)
        pair = build_prompts(prompt, context, request.system_prompt)  # an empty prompt fails before a model loads
        models = self._models_for(policy.roles)
        truncated = False
        private_role = next((s.role for s in policy.streams if s.prompt == "private"), None)
        if private_role and context:
            reader = models[private_role]
            reader = reader.tokenizer if isinstance(reader, RemoteCloud) else reader
            pair, truncated = _fit_context(reader, prompt, context, request.system_prompt, request.max_new_tokens,
                                           request.max_context_tokens)
        return self._run(policy, models, pair, request, on_text, truncated)

    def generate_from_messages(
        self,
        public: list[ChatMessage],
        private: list[ChatMessage],
        request: GenerationRequest | None = None,
        *,
        on_text: Callable[[str], None] | None = None,
        **keywords,
    ) -> Generation:
        """Like `generate`, with both conversations given in full (datasets that ship them):
        the request's `system_prompt` does not apply, and nothing is cut to fit."""
        request = _request(request, keywords)
        if request.max_context_tokens is not None:
            raise TypeError("generate_from_messages takes the conversations whole: max_context_tokens does not apply")
        policy = self._policy(request.method, request.steering, request.fusion)
        models = self._models_for(policy.roles)
        return self._run(policy, models, PromptPair(public, private), request, on_text, False)

    def score(
        self,
        prompt: str | Sequence[ChatMessage],
        continuations: str | Sequence[str],
        context: str = "",
        request: GenerationRequest | None = None,
        *,
        batched: bool = False,
        **keywords,
    ) -> Score | list[Score]:
        """How likely each continuation is as the answer to `prompt`, under the request's
        method: teacher-forced through the distribution generation picks from (the fused
        one for `costeer` and its levers), per token and in total (natural logs, temperature
        1). A string gives one `Score`, a list one each, the prompt prefilled once.
        `batched` feeds each continuation in few passes: faster, with llama.cpp's batch
        rounding. Runs embedded (see scoring.py for what split mode would cost)."""
        request = _request(request, keywords)
        texts = [continuations] if isinstance(continuations, str) else list(continuations)
        policy = self._scoring_policy(request.method, request)
        pair = build_prompts(prompt, context, request.system_prompt)
        models = self._models_for(policy.roles)
        ids = _continuation_ids(models[policy.streams[0].role], texts)
        private_role = next((s.role for s in policy.streams if s.prompt == "private"), None)
        if private_role and context:
            pair, _ = _fit_context(models[private_role], prompt, context, request.system_prompt, max(map(len, ids)),
                                   request.max_context_tokens)
        scores = self._score({policy.name: request.method}, request, models, pair, ids, batched)[policy.name]
        return scores[0] if isinstance(continuations, str) else scores

    def score_from_messages(self, public: list[ChatMessage], private: list[ChatMessage], continuations: Sequence[str],
                            methods: Sequence[str], request: GenerationRequest | None = None, *,
                            batched: bool = False, **keywords) -> dict[str, list[Score]]:
        """`score` under several methods at once, with both conversations given in full (as
        `generate_from_messages`): each model and prompt runs once for all the methods.
        Keyed by the methods as given; the request's own method is not used."""
        request = _request(request, keywords)
        if not methods:
            raise UserError("no methods to score under")
        policies = {m: self._scoring_policy(m, request) for m in methods}
        models = self._models_for({role for p in policies.values() for role in p.roles})
        ids = _continuation_ids(models[policies[methods[0]].streams[0].role], list(continuations))
        made = self._score({m: m for m in methods}, request, models, PromptPair(public, private), ids, batched)
        return {m: [replace(s, method=policies[m].name) for s in made[m]] for m in methods}

    def decoding_keys(self, public: list[ChatMessage], private: list[ChatMessage], methods: Sequence[str],
                      request: GenerationRequest | None = None) -> dict[str, tuple | None]:
        """Per method, what decides its answer to these conversations under `request`
        (`Policy.decoding_key` once fitted to the prompts, and the prompts): methods with
        equal keys answer alike, token for token and score alike, so one answer serves both
        (`costeer eval`). Tokenizes, runs no model. None where no claim is made: a policy
        that makes none, a remote cloud or a device following another tokenizer, and every
        method when the sampler is not reproducible (sampling without a seed)."""
        request = _request(request, {})
        if not request.sampling.greedy and request.sampling.seed is None:
            return dict.fromkeys(methods)
        policies = {m: self._policy(m, request.steering, request.fusion) for m in methods}
        models = self._models_for({role for p in policies.values() for role in p.roles})
        if self._cloud or isinstance(self._device_beside_cloud, AlignedModel):
            return dict.fromkeys(methods)
        specs = dict.fromkeys(spec for p in policies.values() for spec in p.streams)
        prompts = self._prompts(specs, models, PromptPair(public, private))  # each stream's prompt once
        keys = {}
        for method, policy in policies.items():
            mine = [list(prompts[s]) for s in policy.streams]
            policy.started([len(p) for p in mine])
            key = policy.decoding_key()
            keys[method] = None if key is None else (key, hashlib.sha256(repr(mine).encode()).hexdigest())
        return keys

    def _scoring_policy(self, method: str, request: GenerationRequest) -> Policy:
        policy = self._policy(method, request.steering, request.fusion)
        if self._cloud and "llm" in policy.roles:
            raise UserError("costeer score runs with the cloud model on this machine (--llm), not with --cloud: "
                            "each position would need the cloud's whole distribution, about 600 KB a token")
        return policy

    def _score(self, methods: dict[str, str], request: GenerationRequest, models: dict[Role, StreamSource],
               pair: PromptPair, ids: list[list[int]], batched: bool) -> dict[str, list[Score]]:
        """`methods`: name in the result -> method."""
        makers = {name: (lambda m=m: self._policy(m, request.steering, request.fusion)) for name, m in methods.items()}
        specs = dict.fromkeys(spec for make in makers.values() for spec in make().streams)
        prompts = self._prompts(specs, models, pair)
        return score_continuations(makers, models, prompts, ids, batched)

    def _prompts(self, specs: Iterable[StreamSpec], models: dict[Role, StreamSource], pair: PromptPair) -> dict:
        """Each stream's prompt as its model encodes it, in the order given."""
        return {spec: models[spec.role].encode_chat(self._chat_for(spec, pair)) for spec in specs}

    def _run(self, policy: Policy, models: dict[Role, StreamSource], pair: PromptPair, request: GenerationRequest,
             on_text: Callable[[str], None] | None, truncated: bool) -> Generation:
        prompts = self._prompts(policy.streams, models, pair)
        prompts = [prompts[spec] for spec in policy.streams]  # one per stream, in its order
        result = decode(policy, models, prompts, TokenPicker(request.sampling), request.max_new_tokens, request.stop,
                        on_text, request.explain)
        prompt_tokens = {f"{s.role}_{s.prompt}": n for s, n in zip(policy.streams, result.prompt_lengths)}
        n = len(result.token_ids)
        return Generation(
            text=result.text,
            method=policy.name,
            new_tokens=n,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            elapsed_s=result.elapsed_s,
            tokens_per_second=n / result.elapsed_s if result.elapsed_s > 0 else 0.0,
            time_to_first_token_s=result.time_to_first_token_s,
            prefill_s=result.prefill_s,
            prompt_tokens=prompt_tokens,
            context_truncated=truncated,
            steering_coefficient=getattr(policy, "coefficient", None),
            traffic=result.traffic,
            context_cache_tokens=result.restored_prompt_tokens,
            alignment=result.alignment,
            paused_steps=getattr(policy, "paused_steps", None),
            steps=result.steps,
        )

    def close(self) -> None:
        for slot in self._slots.values():
            if slot.model is not None and not isinstance(slot.source, LanguageModel):
                slot.model.close()
            slot.model = None


def _request(request: GenerationRequest | None, keywords: dict) -> GenerationRequest:
    """The request given, or the one its keyword arguments spell; never both."""
    if request is None:
        return GenerationRequest.from_keywords(**keywords)
    if not isinstance(request, GenerationRequest):
        raise TypeError(f"request takes a GenerationRequest, got {type(request).__name__}")
    if keywords:
        raise TypeError(f"give a GenerationRequest or keyword arguments ({', '.join(keywords)}), not both: "
                        "dataclasses.replace(request, ...) changes some of its settings")
    return request


def _fit_context(
    model: LanguageModel,
    prompt: str | Sequence[ChatMessage],
    context: str,
    system_prompt: str | None,
    max_new_tokens: int,
    max_context_tokens: int | None,
) -> tuple[PromptPair, bool]:
    """Cut the context's end until the private prompt fits; never quotes the context."""
    context_ids = model.tokenize(context)
    limit = len(context_ids) if max_context_tokens is None else min(len(context_ids), max_context_tokens)
    pair = build_prompts(prompt, model.detokenize(context_ids[:limit]) if limit < len(context_ids) else context, system_prompt)
    overflow = len(model.tokenize(model.render_chat(pair.private))) + max_new_tokens - model.context_window
    if overflow > 0:
        limit -= overflow + 8  # margin: re-tokenizing at the cut may merge differently
        if limit <= 0:
            raise UserError(
                f"the request and {max_new_tokens} new tokens leave no room for the context in "
                f"{model.name}'s window of {model.context_window} tokens"
            )
        pair = build_prompts(prompt, model.detokenize(context_ids[:limit]), system_prompt)
    truncated = limit < len(context_ids)
    if truncated:
        log.warning("costeer: private context cut to its first %s of %s tokens", limit, len(context_ids))
    return pair, truncated


def _continuation_ids(model: StreamSource, texts: list[str]) -> list[list[int]]:
    """Continuations as the model's tokens; markup in them stays text, as in generated text."""
    ids = [list(model.tokenize(t, special=False)) for t in texts]
    if not ids or not all(ids):
        raise UserError("nothing to score: give at least one continuation, none empty")
    return ids
