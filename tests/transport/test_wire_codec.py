"""The one codec between NextToken and the wire (transport/protocol.py), and the one
reading of a body that failed validation (transport/errors.py) each HTTP surface renders
in its own shape. The expected bytes are those the server and the proxy sent before the
codec and the reading were shared: a change to any of them changes the wire."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from costeer.distribution import NextToken
from costeer.errors import UserError
from costeer.proxy import errors as proxy_errors
from costeer.proxy.schema import ChatRequest
from costeer.transport.protocol import (decode_distribution, decode_tree_node, encode_array, encode_distribution,
                                        encode_tree_node, FLOATS, IDS, OpenSession)
from costeer.transport.server import errors as server_errors

LOGITS = np.array([0.5, -1.25, 2.0, 3.5, -0.125, 1.0], dtype=np.float32)
VIEW = NextToken.local(LOGITS)
SENDER = "the cloud at http://cloud.test"
TOP_3 = '"position":7,"lse":3.829521723153649,"top_ids_b64":"AwAAAAIAAAAFAAAA","top_logits_b64":"AABgQAAAAEAAAIA/"'
FULL = '"position":7,"lse":3.829521723153649,"full_logits_b64":"AAAAPwAAoL8AAABAAABgQAAAAL4AAIA/"'


def wire(model) -> dict:
    """As the device receives it: the JSON the server sends, parsed."""
    return json.loads(model.model_dump_json(exclude_none=True))


@pytest.mark.parametrize("k, expected", [
    (3, "{" + TOP_3 + "}"),
    (1, '{"position":7,"lse":3.829521723153649,"top_ids_b64":"AwAAAA==","top_logits_b64":"AABgQA=="}'),
    (None, "{" + FULL + "}"),
    (6, "{" + FULL + "}"),  # k of the whole vocabulary: the full vector
])
def test_distributions_encode_to_the_same_bytes(k, expected):
    assert encode_distribution(VIEW, 7, k).model_dump_json(exclude_none=True) == expected


def test_a_distribution_with_its_nones_and_a_tree_node_encode_to_the_same_bytes():
    assert encode_distribution(VIEW, 7, 3).model_dump_json() == "{" + TOP_3 + ',"full_logits_b64":null,"tree":null}'
    assert encode_tree_node((4, 2), VIEW, 2).model_dump_json() == \
        '{"path":[4,2],"lse":3.829521723153649,"top_ids_b64":"AwAAAAIAAAA=","top_logits_b64":"AABgQAAAAEA="}'


def test_what_the_server_encodes_the_device_decodes_exactly():
    top = decode_distribution(wire(encode_distribution(VIEW, 7, 3)), 6, SENDER)
    ids, logits = VIEW.top(3)
    assert np.array_equal(top.ids, ids) and np.array_equal(top.logits, logits) and top.logits.dtype == np.float32
    assert top.lse == VIEW.lse and top.vocab_size == 6 and top.can_widen
    full = decode_distribution(wire(encode_distribution(VIEW, 7, None)), 6, SENDER)
    assert full.complete and np.array_equal(full.logits, LOGITS) and full.lse == VIEW.lse and not full.can_widen
    path, node = decode_tree_node(wire(encode_tree_node((4, 2), VIEW, 2)), 6, SENDER)
    assert path == (4, 2) and np.array_equal(node.ids, [3, 2]) and node.lse == VIEW.lse


def reply(**fields) -> dict:
    payload = wire(encode_distribution(VIEW, 7, 3))
    payload.update(fields)
    return {key: value for key, value in payload.items() if value is not None}


@pytest.mark.parametrize("payload, detail", [
    (reply(lse=None), "'lse'"),
    (reply(top_ids_b64=None), "'top_ids_b64'"),
    (reply(top_ids_b64="AAAAAAA"), "Incorrect padding"),
    (reply(top_ids_b64=encode_array(np.array([3, 2]), IDS)), "2 token ids for 3 logits"),
    (reply(full_logits_b64=encode_array(LOGITS[:5], FLOATS)), "5 logits for a vocabulary of 6"),
    (reply(lse="many"), "could not convert string to float: 'many'"),
    ([1, 2], "list indices must be integers or slices, not str"),
    (None, "'NoneType' object is not subscriptable"),
])
def test_a_malformed_distribution_is_refused_whole(payload, detail):
    with pytest.raises(UserError) as caught:
        decode_distribution(payload, 6, SENDER)
    assert str(caught.value) == f"{SENDER} sent a malformed distribution ({detail})"


@pytest.mark.parametrize("ids, first_outside", [([4, 2, 5], 4), ([-1, 0, 1], -1)])
def test_token_ids_outside_the_vocabulary_are_refused(ids, first_outside):
    with pytest.raises(UserError) as caught:
        decode_distribution(reply(top_ids_b64=encode_array(np.array(ids), IDS)), 4, SENDER)
    assert str(caught.value) == (f"{SENDER} sent token id {first_outside}, outside the vocabulary (0 to 3); "
                                 "nothing of that reply was used")


@pytest.mark.parametrize("path", [None, "4,2", [4, "2"], [True], [4.0]])
def test_a_tree_node_needs_a_path_of_token_ids(path):
    node = {**wire(encode_tree_node((4, 2), VIEW, 2)), "path": path}
    with pytest.raises(UserError, match="sent a lookahead tree node without a path of token ids"):
        decode_tree_node(node, 6, SENDER)
    with pytest.raises(UserError, match="without a path"):
        decode_tree_node([1], 6, SENDER)


def test_a_tree_node_path_outside_the_vocabulary_is_refused_before_its_distribution():
    node = {"path": [4, 99]}  # no distribution at all: the path is checked first
    with pytest.raises(UserError, match="sent token id 99, outside the vocabulary"):
        decode_tree_node(node, 6, SENDER)


def validating_app(model, render) -> TestClient:
    app = FastAPI()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return render(exc).response()

    def accept(body) -> dict:
        return {}
    accept.__annotations__["body"] = model  # a class, not this module's postponed name for it
    app.post("/")(accept)
    return TestClient(app)


def post(client: TestClient, body: bytes | object) -> tuple[int, bytes]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post("/", content=content, headers={"content-type": "application/json"})
    return response.status_code, response.content


USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("body, expected", [
    (b"{nope", b'{"error":"malformed_json","message":"1: JSON decode error"}'),
    ([1], b'{"error":"invalid_request","message":"Input should be a valid dictionary or object to extract fields from"}'),
    ({"messages": [], "max_new_tokens": 4},
     b'{"error":"invalid_request","message":"messages: List should have at least 1 item after validation, not 0"}'),
    ({"messages": [{"role": "robot", "content": "x"}], "max_new_tokens": 4},
     b'{"error":"invalid_request","message":"messages.0.role: Input should be \'system\', \'user\' or \'assistant\'"}'),
])
def test_the_server_refuses_an_invalid_body_with_a_422_error_body(body, expected):
    assert post(validating_app(OpenSession, server_errors.invalid_request), body) == (422, expected)


def openai_error(message: str, param: str | None) -> bytes:
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}},
                      separators=(",", ":")).encode()


@pytest.mark.parametrize("body, message, param", [
    (b"{nope", "the body is not valid JSON", None),
    ([1], "Input should be a valid dictionary or object to extract fields from", None),
    ({"messages": USER, "stop": ["a"] * 5}, "stop: at most 4 stop strings", "stop"),  # a validator's ValueError
    ({"messages": USER, "temperature": 3}, "temperature: Input should be less than or equal to 2", "temperature"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}]}]},
     "messages.0.content: only text content parts ({\"type\": \"text\", \"text\": ...}) are supported, got type 'image'",
     "messages.0.content"),
])
def test_the_proxy_refuses_an_invalid_body_with_a_400_in_openai_shape(body, message, param):
    assert post(validating_app(ChatRequest, proxy_errors.invalid_request), body) == (400, openai_error(message, param))
