"""llama.cpp's C++ `llama-server` as the cloud, through its native `/completion` route.

Unlike its OpenAI route, `/completion` takes the prompt as token ids and sends
`n_probs` entries with their ids, uncapped: the top-k is exact, and the certificate
can ask for more at the same position, up to the whole vocabulary. The server keeps
the prompt's KV cache between requests (`cache_prompt`), so each step costs one
token's forward pass. The probabilities are the model's before sampling
(`post_sampling_probs` off), which is what CoSteer fuses.
"""

from __future__ import annotations

from ...backends.base import LanguageModel
from ...distribution import check_token_ids
from ...errors import UserError
from .openai import TopEntries, TopLogprobsCloud
from ..wire import CloudRefused, WireClient, printable


class LlamaServerCloud(TopLogprobsCloud):
    kind = "llama-server"

    def __init__(self, wire: WireClient, tokenizer: LanguageModel, max_k: int | None = None) -> None:
        super().__init__(wire, tokenizer, max_k)
        props = wire.request("GET", "/props") or {}
        model = str(props.get("model_alias") or props.get("model_path") or "llama-server").rsplit("/", 1)[-1]
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx")
        if isinstance(n_ctx, int) and n_ctx > 0:
            self.context_window = min(self.context_window, n_ctx)
        self.name = f"{printable(model)} at {wire.base_url}"
        self.check_tokenizer()

    def tokenize(self, text: str) -> list[int] | None:
        try:
            tokens = (self._wire.request("POST", "/tokenize", {"content": text, "add_special": False}) or {}).get("tokens")
        except CloudRefused as exc:
            if exc.status in (404, 405, 501):
                return None
            raise
        return tokens if isinstance(tokens, list) else None

    def ask(self, ids: list[int], k: int) -> TopEntries:
        reply = self._wire.request("POST", "/completion", {
            "prompt": ids, "n_predict": 1, "n_probs": k, "temperature": 0, "cache_prompt": True,
            "post_sampling_probs": False, "stream": False,
        }) or {}
        steps = reply.get("completion_probabilities")
        if not isinstance(steps, list):
            raise UserError("the cloud's answer is not a llama-server /completion answer with completion_probabilities")
        if not steps:
            if reply.get("stop_type") == "eos" or reply.get("stopped_eos"):
                return TopEntries([], 0, eos_without_logprobs=True)
            raise UserError("llama-server sent no probabilities for the next token")
        top = steps[0].get("top_logprobs") if isinstance(steps[0], dict) else None
        if not isinstance(top, list):
            raise UserError("llama-server's answer lists no top_logprobs (is post_sampling_probs on?)")
        pairs, unmapped = [], 0
        for entry in top:
            token = entry.get("id") if isinstance(entry, dict) else None
            logprob = entry.get("logprob") if isinstance(entry, dict) else None
            if isinstance(token, int):
                check_token_ids([token], self.vocab_size, f"llama-server at {self._wire.base_url}")
            if not isinstance(token, int) or not isinstance(logprob, (int, float)) or not logprob <= 0:
                unmapped += 1
            else:
                pairs.append((float(logprob), token))
        return TopEntries(pairs, len(top), unmapped)
