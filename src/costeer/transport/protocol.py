"""Messages between the device and the cloud server (JSON over HTTP).

The device opens a session with the public conversation only, then sends the
chosen token ids and asks for the next-token distribution's top-k, or the full
vector. Values are raw float32 logits plus their log-normalizer `lse`, so the
device computes exactly what an embedded run computes.

The codec at the end (encode_distribution, decode_distribution, ...) is the one
translation between a NextToken and its wire form: the server encodes with it, the
device decodes with it.
"""

from __future__ import annotations

import base64
from typing import Literal, Sequence

import numpy as np
from pydantic import BaseModel, Field

from ..distribution import NextToken, check_token_ids
from ..errors import UserError
from .wire import printable

API_PREFIX = "/v1"


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


MAX_LOOKAHEAD_NODES = 64  # a tree's nodes: each costs the server one forward pass per step
DEFAULT_LOOKAHEAD_MIN_P = 0.5  # what a device asks for unless told: measured best on a CPU cloud (README)
CPU_LOOKAHEAD = (3, 1, DEFAULT_LOOKAHEAD_MIN_P)  # depth, width, min_p: the tree measured best on a CPU cloud
MAX_DRAFT_TOKENS = 8  # a step's draft: each token costs the server one forward pass


class Lookahead(BaseModel):
    """With each distribution, also send the distributions after the cloud's own `width`
    likeliest next tokens, recursively to `depth` levels: a tree computed from the
    public prefix alone, which lets the device choose up to depth+1 tokens per round trip."""

    depth: int = Field(ge=1, le=4, description="levels of the tree")
    width: int = Field(ge=1, le=8, description="children of each node: the cloud's likeliest tokens there")
    top_k: int = Field(default=64, ge=1, le=1024, description="k of each node's distribution")
    min_probability: float = Field(default=0.0, ge=0.0, le=1.0, description="grow children only under nodes where the "
                                   "cloud's likeliest token has at least this probability (saves the cloud work the "
                                   "device's choice would likely leave)")

    def nodes(self) -> int:
        return sum(self.width**d for d in range(1, self.depth + 1))


class OpenSession(BaseModel):
    messages: list[Message] = Field(min_length=1, description="the public conversation: no private context")
    max_new_tokens: int = Field(ge=1, description="tokens this session may generate")
    top_k: int | None = Field(default=64, ge=1, description="k of the first distribution; null for the full vector")
    lookahead: Lookahead | None = Field(default=None, description="send a lookahead tree with every step (see /v1/model features)")
    speculate: int = Field(default=0, ge=0, le=MAX_DRAFT_TOKENS, description="the most draft tokens a step may carry "
                           "(Step.draft; see /v1/model features)")


class Step(BaseModel):
    tokens: list[int] = Field(default_factory=list, description="chosen token ids to append; none: a look, which "
                              "only sends another top-k at the session's position, or at `path` in its tree")
    path: list[int] = Field(default_factory=list, max_length=8, description="with no tokens: a node of the latest "
                            "lookahead tree (one the server has sent) to send another top-k of")
    top_k: int | None = Field(default=64, ge=1, description="k largest logits to return; null for the full vector")
    lookahead: bool = Field(default=True, description="with a session opened with lookahead: send a new tree")
    draft: list[int] = Field(default_factory=list, max_length=MAX_DRAFT_TOKENS, description="with tokens, in a "
                             "session opened with `speculate`: the device's guess of the tokens after them. The tree "
                             "then holds the distribution after each prefix of the draft (top_k each) first, computed "
                             "exactly as steps would, and the lookahead tree, if any, grows after the whole draft")
    stream: bool = Field(default=False, description="with lookahead or a draft: answer in JSON lines, the distribution "
                         "(without its tree) first, then each tree node the moment it is computed")


class Distribution(BaseModel):
    """Next-token distribution after the session's tokens."""

    position: int = Field(description="tokens in the session so far, prompt included")
    lse: float = Field(description="log-sum-exp of all logits: log p = logit - lse")
    top_ids_b64: str | None = Field(default=None, description="top-k token ids, likeliest first: int32 little-endian, base64")
    top_logits_b64: str | None = Field(default=None, description="their raw logits: float32 little-endian, base64")
    full_logits_b64: str | None = Field(default=None, description="all logits in id order: float32 little-endian, base64")
    tree: list["TreeNode"] | None = Field(default=None, description="the lookahead tree, when asked for")


class TreeNode(BaseModel):
    """The distribution after appending `path` to the session's tokens (top-k only)."""

    path: list[int] = Field(description="token ids after the session's current position")
    lse: float
    top_ids_b64: str
    top_logits_b64: str


Distribution.model_rebuild()


class SessionOpened(BaseModel):
    session_id: str
    prompt_tokens: int
    distribution: Distribution


class ModelInfo(BaseModel):
    name: str
    vocab_size: int
    context_window: int
    eos_token_ids: list[int]
    vocabulary_sha256: str = Field(description="digest of every token's bytes, to check a shared tokenizer")
    limits: dict[str, int]
    features: list[str] = Field(default_factory=list, description="optional protocol parts this server has, e.g. lookahead")


class Vocabulary(BaseModel):
    """Every token's bytes, for a device model of another tokenizer (it steers on the
    tokens the two vocabularies share and keeps its text in step)."""

    lengths_b64: str = Field(description="each token's byte length in id order: int32 little-endian, base64")
    pieces_b64: str = Field(description="all tokens' bytes, concatenated in id order, base64")
    special_ids: list[int] = Field(description="control tokens: they stand for no text")
    vocabulary_sha256: str = Field(description="as in /v1/model: the device checks the pieces against it")

    @classmethod
    def of(cls, pieces: list[bytes], special_ids: frozenset[int], digest: str) -> "Vocabulary":
        lengths = np.array([len(p) for p in pieces], dtype=np.int64)
        return cls(lengths_b64=encode_array(lengths, IDS), pieces_b64=base64.b64encode(b"".join(pieces)).decode("ascii"),
                   special_ids=sorted(special_ids), vocabulary_sha256=digest)

    def pieces(self) -> list[bytes]:
        lengths = decode_array(self.lengths_b64, IDS)
        data = base64.b64decode(self.pieces_b64)
        ends = np.cumsum(lengths).tolist()
        if len(data) != (ends[-1] if ends else 0):
            raise ValueError("the vocabulary's pieces and lengths disagree")
        return [data[end - n:end] for n, end in zip(lengths.tolist(), ends)]


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable kind, e.g. unknown_session")
    message: str


# Numbers travel as base64 of little-endian arrays: 4 bytes a value plus a third,
# parsed in microseconds (a JSON list of 16,384 floats took tens of milliseconds).
def encode_array(values: np.ndarray, dtype: str) -> str:
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def decode_array(text: str, dtype: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype)


FLOATS, IDS = "<f4", "<i4"


# The one codec between NextToken and the wire: the server encodes with it, the device
# decodes with it (and checks every id a server sends before any of it is used).
def encode_distribution(view: NextToken, position: int, top_k: int | None) -> Distribution:
    """A next-token distribution as the server sends it: its top-k, or all of it."""
    if top_k is None or top_k >= view.vocab_size:
        return Distribution(position=position, lse=view.lse, full_logits_b64=encode_array(view.logits, FLOATS))
    ids, logits = view.top(top_k)
    return Distribution(position=position, lse=view.lse, top_ids_b64=encode_array(ids, IDS),
                        top_logits_b64=encode_array(logits, FLOATS))


def encode_tree_node(path: Sequence[int], view: NextToken, top_k: int) -> TreeNode:
    ids, logits = view.top(top_k)
    return TreeNode(path=list(path), lse=view.lse, top_ids_b64=encode_array(ids, IDS),
                    top_logits_b64=encode_array(logits, FLOATS))


def decode_distribution(payload: object, vocab_size: int, sender: str) -> NextToken:
    """A distribution (or a tree node's) as a server sent it (parsed JSON), checked whole
    before any of it is used; `sender` ("the cloud at URL") names the server in errors.
    A top-k can be widened: costeer serve sends any k up to the full vector."""
    try:
        lse = float(payload["lse"])
        if payload.get("full_logits_b64"):
            logits = decode_array(payload["full_logits_b64"], FLOATS).astype(np.float32)
            if len(logits) != vocab_size:
                raise ValueError(f"{len(logits)} logits for a vocabulary of {vocab_size}")
            return NextToken(logits, lse, vocab_size)
        ids = decode_array(payload["top_ids_b64"], IDS).astype(np.int64)
        logits = decode_array(payload["top_logits_b64"], FLOATS).astype(np.float32)
        if len(ids) != len(logits):
            raise ValueError(f"{len(ids)} token ids for {len(logits)} logits")
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{sender} sent a malformed distribution ({printable(str(exc))})") from None
    check_token_ids(ids, vocab_size, sender)
    return NextToken(logits, lse, vocab_size, ids=ids, can_widen=True)


def decode_tree_node(payload: object, vocab_size: int, sender: str) -> tuple[tuple[int, ...], NextToken]:
    """A lookahead tree node: its path of token ids (checked like every id a server
    sends), then its distribution."""
    path = payload.get("path") if isinstance(payload, dict) else None
    if not isinstance(path, list) or not all(type(t) is int for t in path):
        raise UserError(f"{sender} sent a lookahead tree node without a path of token ids")
    check_token_ids(path, vocab_size, sender)
    return tuple(path), decode_distribution(payload, vocab_size, sender)
