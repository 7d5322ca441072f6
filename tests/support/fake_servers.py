"""Fake clouds for model-free transport tests: an OpenAI-compatible completions server
with the quirks real ones have (vLLM's shapes among them), llama.cpp's llama-server
native routes, a `costeer serve` that sends less than asked, and a request recorder
to prove what did (or did not) reach a server."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from costeer.fusion import log_softmax
from support.fakes import VOCAB_SIZE, NumpyModel


@dataclass
class RequestLog:
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, app: FastAPI) -> FastAPI:
        """Record every request's path and body as it arrives, before the app sees either:
        the outermost middleware reads the whole body, then hands it on as it came. Plain
        ASGI, not @app.middleware("http"): that one relays every answer through a stream
        of its own, which costs each request more than the fake model's work."""
        app.add_middleware(_Recording, log=self)
        return app

    def record(self, path: str, body: bytes) -> None:
        with self._lock:
            self.bodies.append((path, body))


class _Recording:
    def __init__(self, app, log: RequestLog) -> None:
        self.app, self.log = app, log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received, body = [], b""
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":  # the client left
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self.log.record(scope["path"], body)
        replay = iter(received)

        async def receive_again() -> dict:
            return next(replay, None) or await receive()

        await self.app(scope, receive_again, send)


@dataclass
class OpenAIQuirks:
    max_logprobs: int = 20  # the server's cap (vLLM's --max-logprobs)
    accepts_token_ids: bool = True  # vLLM does; llama-cpp-python's server answers 500
    eos_without_logprobs: bool = False  # llama-cpp-python sends no logprobs when it stops
    only_unmappable: bool = False  # every listed token prints like another id
    ids_as_keys: bool = False  # honours return_tokens_as_token_ids: keys "token_id:N" (vLLM)
    refuses_over_cap: bool = False  # logprobs > cap: 400 naming the cap (vLLM), not a silent cut
    tokenize_as: NumpyModel | None = None  # serves /tokenize (vLLM) with this model's tokenizer


# vLLM 0.32's behaviour (see vllm/entrypoints/openai/completion/protocol.py and
# sampling_params.py), with --max-logprobs -1 (cap = vocabulary) or its default 20
VLLM_UNCAPPED = OpenAIQuirks(max_logprobs=VOCAB_SIZE, ids_as_keys=True, refuses_over_cap=True)
VLLM_DEFAULT = OpenAIQuirks(max_logprobs=20, ids_as_keys=True, refuses_over_cap=True)


def _vllm_refusal(asked: int, cap: int) -> JSONResponse:
    message = f"Requested sample logprobs of {asked}, which is greater than max allowed: {cap} (parameter=logprobs, value={asked})"
    return JSONResponse(status_code=400, content={"error": {"message": message, "type": "BadRequestError",
                                                            "param": "logprobs", "code": 400}})


def openai_app(model: NumpyModel, quirks: OpenAIQuirks = OpenAIQuirks()) -> FastAPI:
    """/v1/models and /v1/completions (max_tokens 1, greedy, top logprobs keyed by token
    string, or by id); /tokenize where the quirks say."""
    app = FastAPI()

    if quirks.tokenize_as is not None:
        @app.post("/tokenize")
        async def tokenize(request: Request) -> dict:
            body = await request.json()
            tokens = quirks.tokenize_as.tokenize(body["prompt"])
            return {"count": len(tokens), "max_model_len": model.context_window, "tokens": tokens}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": model.name, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        if isinstance(prompt, list):
            if not quirks.accepts_token_ids:
                return JSONResponse(status_code=500, content={"error": {"message": "prompt must be a string"}})
            ids = [int(t) for t in prompt]
        else:
            ids = model.tokenize(prompt)
        logprobs = log_softmax(model.logits_after(ids))
        asked = int(body.get("logprobs") or 0)
        if quirks.refuses_over_cap and asked > quirks.max_logprobs:
            return _vllm_refusal(asked, quirks.max_logprobs)
        k = min(asked, quirks.max_logprobs)
        order = np.lexsort((np.arange(len(logprobs)), -logprobs))
        chosen = int(order[0])
        finish = "stop" if chosen in model.eos_token_ids else "length"
        if quirks.only_unmappable:
            order = [t for t in order if 128 <= t < 256]  # byte fragments: all print as ""
        top: dict[str, float] = {}
        by_id = quirks.ids_as_keys and body.get("return_tokens_as_token_ids")
        for token in order[:k]:
            text = f"token_id:{token}" if by_id else model.token_bytes(int(token)).decode("utf-8", errors="ignore")
            top.setdefault(text, float(logprobs[token]))  # several ids alike: one key survives
        logprob_block = None if (finish == "stop" and quirks.eos_without_logprobs) else {
            "tokens": [model.token_bytes(chosen).decode("utf-8", "ignore")],
            "token_logprobs": [float(logprobs[chosen])],
            "top_logprobs": [top],
        }
        text = model.token_bytes(chosen).decode("utf-8", "ignore")
        return {"object": "text_completion", "model": model.name,
                "choices": [{"index": 0, "text": text, "logprobs": logprob_block, "finish_reason": finish}]}

    return app


def llama_server_app(model: NumpyModel, tokenize_as: NumpyModel | None = None) -> FastAPI:
    """llama.cpp's llama-server native routes: /props, /tokenize and /completion with a
    token-id prompt and `n_probs` entries carrying their ids (tools/server in llama.cpp)."""
    app = FastAPI()
    tokenizer = tokenize_as or model

    @app.get("/props")
    def props() -> dict:
        return {"model_path": f"/models/{model.name}.gguf", "default_generation_settings": {"n_ctx": model.context_window}}

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict:
        return {"tokens": tokenizer.tokenize((await request.json())["content"])}

    @app.post("/completion")
    async def completion(request: Request):
        body = await request.json()
        ids = body["prompt"]
        if not isinstance(ids, list) or body.get("post_sampling_probs"):
            return JSONResponse(status_code=400, content={"error": {"code": 400, "message": "unexpected request"}})
        logprobs = log_softmax(model.logits_after([int(t) for t in ids]))
        order = np.lexsort((np.arange(len(logprobs)), -logprobs))
        chosen = int(order[0])
        entry = lambda t: {"id": int(t), "token": model.token_bytes(int(t)).decode("utf-8", "ignore"),  # noqa: E731
                           "bytes": list(model.token_bytes(int(t))), "logprob": float(logprobs[t])}
        return {"content": entry(chosen)["token"], "stop": True,
                "stop_type": "eos" if chosen in model.eos_token_ids else "limit",
                "completion_probabilities": [{**entry(chosen), "top_logprobs": [entry(t) for t in order[: int(body["n_probs"])]]}]}

    return app


def short_changing(app: FastAPI, most: int) -> FastAPI:
    """A `costeer serve` that never sends more than `most` values, whatever it is asked
    for (a proxy or an older server with its own cap)."""
    import base64
    import json

    @app.middleware("http")
    async def cap(request: Request, call_next):
        response = await call_next(request)
        if not request.url.path.startswith("/v1/sessions") or request.method != "POST" or response.status_code != 200:
            return response
        raw = b"".join([chunk async for chunk in response.body_iterator])
        data = json.loads(raw)
        dist = data.get("distribution", data)
        if dist.get("full_logits_b64"):
            logits = np.frombuffer(base64.b64decode(dist["full_logits_b64"]), "<f4")
            order = np.lexsort((np.arange(len(logits)), -logits))[:most]
            dist["top_ids_b64"] = base64.b64encode(order.astype("<i4").tobytes()).decode()
            dist["top_logits_b64"] = base64.b64encode(logits[order].astype("<f4").tobytes()).decode()
            dist["full_logits_b64"] = None
        else:
            for key, width in (("top_ids_b64", 4), ("top_logits_b64", 4)):
                dist[key] = base64.b64encode(base64.b64decode(dist[key])[: most * width]).decode()
        return JSONResponse(data)

    return app
