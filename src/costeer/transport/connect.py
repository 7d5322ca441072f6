"""A cloud URL to the client that talks to it: `costeer serve` (http(s)://HOST:PORT),
an OpenAI-compatible completions server (openai+URL) or llama.cpp's llama-server
(llama-server+URL)."""

from __future__ import annotations

from ..backends.base import LanguageModel
from ..cloud import RemoteCloud
from ..config import CloudConfig
from ..errors import UserError
from .client.llama_server import LlamaServerCloud
from .client.openai import OpenAICloud
from .client.served import ServedCloud
from .protocol import DEFAULT_LOOKAHEAD_MIN_P, Lookahead
from .wire import WireClient


# URL prefixes of the clouds that are not `costeer serve`: vLLM or any OpenAI-compatible
# completions server (openai+http://HOST:PORT/v1), llama.cpp's llama-server (its native route)
CLOUD_URL_KINDS = ("openai+", "llama-server+")


def connect_cloud(config: CloudConfig, tokenizer: LanguageModel) -> RemoteCloud:
    """The client of `config.url`; `tokenizer`: the device model (a shared vocabulary)."""
    kind = next((k for k in CLOUD_URL_KINDS if config.url.startswith(k)), "")
    base = config.url[len(kind):]
    if not base.startswith(("http://", "https://")):
        raise UserError(f"cloud URL must be http(s)://HOST:PORT (costeer serve), "
                        f"{', or '.join(k + 'http(s)://...' for k in CLOUD_URL_KINDS)}, got {config.url!r}")
    if kind and config.lookahead not in (None, "auto"):
        raise UserError(f"lookahead needs a costeer serve cloud; a {kind[:-1]} server cannot send trees")
    if kind and config.speculate:
        raise UserError(f"speculate needs a costeer serve cloud; a {kind[:-1]} server cannot score drafts")
    wire = WireClient(base, config.api_key, config.wire_log, config.simulate_rtt_ms, config.timeout_s)
    try:
        if kind == "openai+":
            return OpenAICloud(wire, tokenizer, config.model, config.max_k)
        if kind == "llama-server+":
            return LlamaServerCloud(wire, tokenizer, config.max_k)
    except BaseException:
        wire.close()
        raise
    tree = config.lookahead
    if tree not in (None, "auto"):
        depth, width, *rest = tree
        tree = Lookahead(depth=depth, width=width, min_probability=rest[0] if rest else DEFAULT_LOOKAHEAD_MIN_P)
    return ServedCloud(wire, tokenizer, tree, config.retry_for_s, config.adaptive_top_k, config.speculate)
