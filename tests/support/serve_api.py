"""`costeer serve`'s HTTP API as the server tests speak it: a session's opening body, and
the error shape every refusal has."""

from __future__ import annotations

import httpx


def open_body(max_new_tokens: int = 8, content: str = "hi") -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_new_tokens": max_new_tokens, "top_k": 4}


def assert_error(response: httpx.Response, status: int, kind: str) -> dict:
    """The response is an error of this status and kind, with a message; its body."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == kind and body["message"], response.text
    return body
