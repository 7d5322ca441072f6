"""Fake clouds for model-free transport tests: an OpenAI-compatible completions server
with the quirks real ones have, a `costeer serve` that sends less than asked, and a
request recorder to prove what did (or did not) reach a server."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from costeer.fusion import log_softmax
from fakes import NumpyModel


@dataclass
class RequestLog:
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def install(self, app: FastAPI) -> FastAPI:
        @app.middleware("http")
        async def record(request: Request, call_next):
            body = await request.body()
            with self._lock:
                self.bodies.append((request.url.path, body))
            return await call_next(request)

        return app


@dataclass
class OpenAIQuirks:
    max_logprobs: int = 20  # the server's cap (vLLM's --max-logprobs)
    accepts_token_ids: bool = True  # vLLM does; llama-cpp-python's server answers 500
    eos_without_logprobs: bool = False  # llama-cpp-python sends no logprobs when it stops
    only_unmappable: bool = False  # every listed token prints like another id


def openai_app(model: NumpyModel, quirks: OpenAIQuirks = OpenAIQuirks()) -> FastAPI:
    """/v1/models and /v1/completions (max_tokens 1, greedy, top logprobs keyed by token string)."""
    app = FastAPI()

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
        k = min(int(body.get("logprobs") or 0), quirks.max_logprobs)
        order = np.lexsort((np.arange(len(logprobs)), -logprobs))
        chosen = int(order[0])
        finish = "stop" if chosen in model.eos_token_ids else "length"
        if quirks.only_unmappable:
            order = [t for t in order if 128 <= t < 256]  # byte fragments: all print as ""
        top: dict[str, float] = {}
        for token in order[:k]:
            text = model.token_bytes(int(token)).decode("utf-8", errors="ignore")
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
