"""A cloud URL to the client that talks to it: `costeer serve` (http(s)://HOST:PORT),
an OpenAI-compatible completions server (openai+URL) or llama.cpp's llama-server
(llama-server+URL)."""

from __future__ import annotations

from ..backends.base import LanguageModel
from ..cloud import RemoteCloud
from ..errors import UserError
from .client.llama_server import LlamaServerCloud
from .client.openai import OpenAICloud
from .client.served import ServedCloud
from .protocol import DEFAULT_LOOKAHEAD_MIN_P, Lookahead
from .wire import WireClient


# URL prefixes of the clouds that are not `costeer serve`: vLLM or any OpenAI-compatible
# completions server (openai+http://HOST:PORT/v1), llama.cpp's llama-server (its native route)
CLOUD_URL_KINDS = ("openai+", "llama-server+")


def connect_cloud(url, api_key, wire_log, simulate_rtt_ms, model_name, max_k, lookahead, timeout_s, retry_for_s,
                  tokenizer: LanguageModel) -> RemoteCloud:
    kind = next((k for k in CLOUD_URL_KINDS if url.startswith(k)), "")
    base = url[len(kind):]
    if not base.startswith(("http://", "https://")):
        raise UserError(f"cloud URL must be http(s)://HOST:PORT (costeer serve), "
                        f"{', or '.join(k + 'http(s)://...' for k in CLOUD_URL_KINDS)}, got {url!r}")
    if kind and lookahead:
        raise UserError(f"lookahead needs a costeer serve cloud; a {kind[:-1]} server cannot send trees")
    wire = WireClient(base, api_key, wire_log, simulate_rtt_ms, timeout_s)
    try:
        if kind == "openai+":
            return OpenAICloud(wire, tokenizer, model_name, max_k)
        if kind == "llama-server+":
            return LlamaServerCloud(wire, tokenizer, max_k)
    except BaseException:
        wire.close()
        raise
    tree = None
    if lookahead:
        depth, width, *rest = lookahead
        tree = Lookahead(depth=depth, width=width, min_probability=rest[0] if rest else DEFAULT_LOOKAHEAD_MIN_P)
    return ServedCloud(wire, tokenizer, tree, retry_for_s)
