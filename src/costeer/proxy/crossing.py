"""What crossed to the cloud for one answer: the chat page's "What the cloud saw".

Split mode (`--cloud URL`): the records the wire client writes to its wire log
(transport/wire.py), kept for the one generation (`WireClient.recording`): every request
body the device sent, as sent, and the size of every reply. The replies' bodies (the
cloud's distributions) are left out: they are large and say nothing of the device.

Embedded mode: nothing crossed, so the record is what the split client would have sent
for the same answer, built with the protocol's own models (transport/protocol.py):
the OpenSession body (the public messages) and one Step body per token the session
would have appended. A split run sends these same bodies; it may also ask again at a
position where a top-k could not settle the pick (a look: a Step with no tokens), which
an embedded run cannot know.

Neither ever holds the private context: the public messages and token ids are what
the cloud sees by design; a method that would give the cloud the context (llm-context)
gets no record at all.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from ..methods import Policy
from ..prompts import PublicChat
from ..transport.protocol import API_PREFIX, Message, OpenSession, Step
from ..transport.wire import encode_body

SPLIT_NOTE = "Every message this answer sent to the cloud, as sent; replies by size only."
EMBEDDED_NOTE = ("Embedded mode: nothing left this device. These are the messages a split client (--cloud) would have "
                 "sent for this answer; it may also ask again at a step where a top-k cannot settle the pick.")
NO_CLOUD_NOTE = "This method does not use the cloud model: nothing would cross."
WITHHELD_NOTE = ("This method gives the cloud model the private context itself; a remote cloud refuses it unless the "
                 "proxy allows it. Not shown, so that the context stays off this page.")
SESSION_PLACEHOLDER = "SESSION"  # an embedded run has no session id


def _exchange(direction: str, path: str, size: int, body: object, method: str | None = None,
              status: int | None = None) -> dict:
    """One message. A request's `json` is its body's exact text on the wire (the wire
    client sends encode_body of it and counts its bytes); a reply has its size only."""
    sent = encode_body(body).decode() if direction == "device->cloud" and body is not None else None
    return {"direction": direction, "method": method, "path": path, "status": status, "bytes": size, "body": body,
            "json": sent}


def _record(mode: str, exchanges: list[dict], note: str, replies_known: bool) -> dict:
    sent = [e for e in exchanges if e["direction"] == "device->cloud"]
    return {"mode": mode, "note": note, "exchanges": exchanges, "round_trips": len(sent),
            "bytes_to_cloud": sum(e["bytes"] for e in sent),
            "bytes_from_cloud": sum(e["bytes"] for e in exchanges if e["direction"] == "cloud->device")
            if replies_known else None}


def split_record(records: Iterable[dict]) -> dict:
    """The wire log's records of one generation, for the page: requests whole, replies by size."""
    exchanges = []
    for r in records:
        if r["direction"] == "device->cloud":
            exchanges.append(_exchange(r["direction"], r["path"], r["bytes"], r["body"], method=r["method"]))
        else:
            exchanges.append(_exchange(r["direction"], r["path"], r["bytes"], None, status=r["status"]))
    return _record("split", exchanges, SPLIT_NOTE, replies_known=True)


def _body(model: OpenSession | Step) -> tuple[dict, int]:
    """The body as the split client sends it (the fields it sets) and its size as counted on the wire."""
    body = model.model_dump(mode="json", exclude_unset=True)
    return body, len(encode_body(body))


def appended_tokens(token_ids: Sequence[int], finish_reason: str) -> list[int]:
    """The tokens a cloud session is sent: every token but the last, which ends the loop
    before it is appended, unless the end of text ended it (that token is not in token_ids)."""
    return list(token_ids) if finish_reason == "eos" else list(token_ids[:-1])


def embedded_record(policy: Policy, public: PublicChat, max_new_tokens: int, first_k: int | None,
                    token_ids: Sequence[int], finish_reason: str) -> dict:
    """What the split client would have sent for this answer (see the module's docstring);
    `first_k`: the top-k it asks for (policy.first_cloud_k; None: the full vector)."""
    roles = {(spec.role, spec.prompt) for spec in policy.streams}
    if ("llm", "private") in roles:
        return _record("embedded", [], WITHHELD_NOTE, replies_known=False) | {"withheld": True}
    if ("llm", "public") not in roles:
        return _record("embedded", [], NO_CLOUD_NOTE, replies_known=False)
    opened, size = _body(OpenSession(messages=[Message(**m) for m in public], max_new_tokens=max_new_tokens,
                                     top_k=first_k))
    exchanges = [_exchange("device->cloud", f"{API_PREFIX}/sessions", size, opened, method="POST")]
    step_path = f"{API_PREFIX}/sessions/{SESSION_PLACEHOLDER}/step"
    for token in appended_tokens(token_ids, finish_reason):
        body, size = _body(Step(tokens=[token], top_k=first_k))
        exchanges.append(_exchange("device->cloud", step_path, size, body, method="POST"))
    exchanges.append(_exchange("device->cloud", f"{API_PREFIX}/sessions/{SESSION_PLACEHOLDER}", 0, None,
                               method="DELETE"))
    return _record("embedded", exchanges, EMBEDDED_NOTE, replies_known=False)
