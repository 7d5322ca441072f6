"""What one generation asks for (`GenerationRequest`) and where a remote cloud runs
(`CloudConfig`): plain values, checked when made, so a mistake is refused before any
model loads. Here, not in api.py, so that transport/ can take a `CloudConfig` without
importing the API above it; api.py and the package re-export both."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal, Sequence

from .errors import UserError
from .fusion import SteeringParams
from .methods import DEFAULT_TOP_K, Fusion, make_policy
from .prompts import PAPER_SYSTEM_PROMPT
from .sampling import SamplingConfig
from .transport.protocol import MAX_DRAFT_TOKENS


@dataclass(frozen=True)
class GenerationRequest:
    """One generation's settings. `CoSteer.generate`'s keyword arguments are a shorthand
    for one (`from_keywords`); `dataclasses.replace` makes a variant."""

    method: str = "costeer"
    max_new_tokens: int = 256
    sampling: SamplingConfig = SamplingConfig()
    steering: SteeringParams | None = None  # the method's steering parameters (None: its defaults)
    fusion: Fusion = "closed"
    stop: Sequence[str] = ()  # stop strings; kept as a tuple
    system_prompt: str | None = PAPER_SYSTEM_PROMPT  # a conversation's own system message replaces it
    max_context_tokens: int | None = None  # cut the private context to this many tokens
    explain: bool = False  # record every pick in Generation.steps (explain.py)

    def __post_init__(self) -> None:
        make_policy(self.method, self.steering, self.fusion)  # an unknown method, weight or fusion
        if self.max_context_tokens is not None and self.max_context_tokens < 0:
            raise UserError(f"max-context-tokens must be >= 0, got {self.max_context_tokens}")
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UserError(f"max-new-tokens must be an integer >= 1, got {n!r}")
        object.__setattr__(self, "stop", tuple(self.stop))

    @classmethod
    def from_keywords(
        cls,
        *,
        method: str = "costeer",
        max_new_tokens: int = 256,
        sampling: SamplingConfig | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        params: SteeringParams | None = None,
        fusion: Fusion = "closed",
        stop: Sequence[str] = (),
        system_prompt: str | None = PAPER_SYSTEM_PROMPT,
        max_context_tokens: int | None = None,
        explain: bool = False,
    ) -> GenerationRequest:
        """`CoSteer.generate`'s keyword arguments as a request: the sampling as its four
        values, or whole as `sampling` (as `generate_from_messages` always took it)."""
        if sampling is None:
            sampling = SamplingConfig(temperature, top_p, top_k, seed)
        elif (temperature, top_p, top_k, seed) != (0.0, 1.0, 0, None):
            raise TypeError("give sampling=SamplingConfig(...) or temperature/top_p/top_k/seed, not both")
        return cls(method, max_new_tokens, sampling, params, fusion, stop, system_prompt, max_context_tokens, explain)


@dataclass(frozen=True)
class CloudConfig:
    """A cloud model that runs elsewhere, and how to reach it.

    `url`: a `costeer serve` server (http(s)://HOST:PORT), `openai+URL` for vLLM or any
    OpenAI-compatible completions server (then `model` names the model), or
    `llama-server+URL` for llama.cpp's server; `max_k` caps the logprobs asked of these
    two (a server's own cap is learned). `top_k`: the first k asked each step; with
    `adaptive_top_k` (the default), a `costeer serve` session asks more up front after a
    step had to escalate, and `top_k` again after a run of steps that did not. Methods
    that would give the private context to the cloud (`llm-context`) are refused unless
    `send_private_context_to_cloud`. `lookahead=(D, M)` or `(D, M, P)` asks a `costeer
    serve` cloud for a tree of its M likeliest continuations, D deep (grown where its
    likeliest token has probability >= P, default 0.5), with every step, so the device
    sends several tokens per round trip with the same output; "auto" (the default) asks
    for (3, 1, 0.5) where a round trip, measured on connecting, takes 80 ms or more, and
    None never. `speculate=K` sends the device's guess of the next K tokens with every
    request to a `costeer serve` cloud, which answers with the distributions along it:
    where the choices follow the guess, no request is needed (the same output again).
    If a `costeer serve` cloud goes away mid-generation (restart, dropped connection,
    proxy 502-504), the device reopens its session there and carries on with the same
    output, trying for `retry_for_s` seconds (0: fail at once). `timeout_s` bounds any one request;
    `wire_log` appends every message to and from the cloud to a file; `simulate_rtt_ms`
    adds a network round trip."""

    url: str
    api_key: str | None = None
    wire_log: str | os.PathLike | None = None
    simulate_rtt_ms: float = 0.0
    top_k: int = DEFAULT_TOP_K
    model: str | None = None
    max_k: int | None = None
    lookahead: tuple[int, int] | tuple[int, int, float] | Literal["auto"] | None = "auto"
    timeout_s: float = 120.0
    retry_for_s: float = 60.0
    send_private_context_to_cloud: bool = False
    adaptive_top_k: bool = True
    speculate: int = 0

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise UserError(f"cloud top-k must be >= 1, got {self.top_k}")
        if isinstance(self.lookahead, str) and self.lookahead != "auto":
            raise UserError(f"lookahead is (depth, width[, min_p]), 'auto' or None, got {self.lookahead!r}")
        if self.lookahead not in (None, "auto") and not self.url:
            raise UserError("lookahead applies to a remote cloud (--cloud URL) only")
        if not 0 <= self.speculate <= MAX_DRAFT_TOKENS:
            raise UserError(f"speculate takes 0 to {MAX_DRAFT_TOKENS} draft tokens, got {self.speculate}")
        if self.speculate and not self.url:
            raise UserError("speculate applies to a remote cloud (--cloud URL) only: embedded, every token costs "
                            "no round trip already")
        if not self.timeout_s > 0:
            raise UserError(f"the cloud timeout must be > 0 seconds, got {self.timeout_s!r}")
        if not 0 <= self.retry_for_s < math.inf:
            raise UserError(f"the cloud retry window must be >= 0 seconds, got {self.retry_for_s!r}")
