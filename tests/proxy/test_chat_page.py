"""The chat page `costeer proxy` serves at `/`, and the API it uses, on the seeded NumPy
models (no browser: test_chat_page_browser.py drives it in Chromium). The page and its
assets are served without the key (they hold no secret) under a strict
Content-Security-Policy and the Host rule; the context endpoint needs the key, obeys the
origin rule and gives names and sizes, never text; the `costeer` request option adds the
per-token steps and the wire record only when asked, and the embedded wire record is
exactly what a split client sends."""

from __future__ import annotations

import contextlib
import json
import re

import httpx
import pytest

from costeer import CloudConfig, CoSteer
from costeer.prompts import ContextSource, load_context_sources
from costeer.proxy.access import MethodAllowList, ProxyAccess
from costeer.proxy.app import create_proxy_app
from costeer.proxy.page import PAGE_ASSETS
from costeer.proxy.schema import ProxyDefaults
from costeer.transport.server.app import create_app
from support.fakes import NumpyModel
from support.servers import app_in_thread, free_port

KEY = "chat-page-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
CANARY = "canary-Page-9090"
SOURCES = [ContextSource("notes/ingrid-okonkwo.md", 57, f"My name is Ingrid and I live in Tromso. {CANARY}"),
           ContextSource("--context-text", 12, "I keep bees.")]
PROMPT = "Write a note for my friend."
MESSAGES = [{"role": "user", "content": PROMPT}]
BOTH = {"steps": True, "wire": True}


def embedded() -> CoSteer:
    return CoSteer(llm=NumpyModel(1, "numpy-cloud"), slm=NumpyModel(2, "numpy-device"), context_cache=False)


@contextlib.contextmanager
def serving(cs: CoSteer, context=SOURCES):
    port = free_port()
    access = ProxyAccess(api_key=KEY, port=port, methods=MethodAllowList.parse("costeer,llm,llm-context,slm-context,mix"))
    with app_in_thread(create_proxy_app(cs, context, ProxyDefaults(), access=access), port) as url:
        yield url, port


@pytest.fixture(scope="module")
def proxy():
    with serving(embedded()) as served:
        yield served


@pytest.fixture(scope="module")
def split():
    """The same proxy with its cloud model behind costeer serve (loopback)."""
    with app_in_thread(create_app(NumpyModel(1, "numpy-cloud"))) as cloud_url:
        cs = CoSteer(slm=NumpyModel(2, "numpy-device"), cloud=CloudConfig(cloud_url), context_cache=False)
        with serving(cs) as (url, _):
            yield url
        cs.close()


def chat(url: str, **request) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", headers=AUTH, timeout=60,
                          json={"model": "costeer", "messages": MESSAGES, "max_tokens": 12, **request})
    assert response.status_code == 200, response.text
    return response.json()


# --- the page ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", list(PAGE_ASSETS))
def test_the_page_and_its_assets_are_served_without_the_key_under_a_strict_csp(proxy, path):
    url, _ = proxy
    response = httpx.get(f"{url}{path}")
    assert response.status_code == 200
    assert response.headers["content-type"] == PAGE_ASSETS[path].media_type
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self';" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy and "frame-ancestors 'none'" in policy
    assert response.headers["x-content-type-options"] == "nosniff"
    assert KEY not in response.text and CANARY not in response.text  # the page holds no secret


def test_the_html_has_no_inline_script_or_style_and_loads_nothing_from_elsewhere(proxy):
    html = httpx.get(f"{proxy[0]}/").text
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    assert " style=" not in html and "<style" not in html and not re.search(r"\son[a-z]+=", html)  # nor handlers
    assert not re.search(r"""(src|href)=["'](https?:)?//""", html)  # no CDN: every asset is the proxy's own
    script = httpx.get(f"{proxy[0]}/static/app.js").text
    assert "sessionStorage" in script and "?key=" not in script and "localStorage.setItem(KEY" not in script


def test_the_page_obeys_the_host_rule_and_other_paths_still_need_the_key(proxy):
    url, port = proxy
    assert httpx.get(f"{url}/", headers={"Host": f"evil.example:{port}"}).status_code == 403  # DNS rebinding
    assert httpx.get(f"{url}/static/other.js").status_code == 401
    assert httpx.get(f"{url}/static/app.js", headers=AUTH).status_code == 200  # a key sent along does no harm


# --- the context endpoint ------------------------------------------------------------------------

def test_the_context_endpoint_lists_names_and_sizes_never_text(proxy):
    url, _ = proxy
    body = httpx.get(f"{url}/v1/costeer/context", headers=AUTH).json()
    device = NumpyModel(2, "numpy-device")
    assert body["sources"] == [{"name": s.name, "bytes": s.size_bytes, "tokens": len(device.tokenize(s.text, special=False))}
                               for s in SOURCES]
    assert body["sent_to_cloud"] is False and body["bytes"] == 69 and body["tokens"] > 0
    assert CANARY not in json.dumps(body) and "Tromso" not in json.dumps(body) and "bees" not in json.dumps(body)


def test_the_context_endpoint_needs_the_key_and_obeys_the_origin_rule(proxy):
    url, port = proxy
    path = f"{url}/v1/costeer/context"
    assert httpx.get(path).status_code == 401
    assert httpx.get(path, headers={**AUTH, "Origin": "http://evil.example"}).status_code == 403
    assert httpx.get(path, headers={**AUTH, "Origin": f"http://localhost:{port}"}).status_code == 200  # the page's own


def test_a_context_given_as_text_is_one_source_and_none_is_an_empty_list():
    for context, names in ((f"I keep bees. {CANARY}", ["context text"]), ("", [])):
        with serving(embedded(), context) as (url, _):
            body = httpx.get(f"{url}/v1/costeer/context", headers=AUTH).json()
        assert [s["name"] for s in body["sources"]] == names and CANARY not in json.dumps(body)


def test_context_sources_keep_each_file_name_and_size(tmp_path):
    (tmp_path / "a.md").write_text("# About me\nI keep bees.\n", encoding="utf-8")
    (tmp_path / "b.json").write_text('{"city": "Tromso"}', encoding="utf-8")
    sources = load_context_sources([tmp_path], "Inline words.")
    assert [(s.name, s.size_bytes) for s in sources] == [(str(tmp_path / "a.md"), 24), (str(tmp_path / "b.json"), 18),
                                                          ("--context-text", 13)]
    assert "Tromso" in sources[1].text and sources[1].text != '{"city": "Tromso"}'  # JSON as the context reads it


# --- steps and the wire record: only when asked -------------------------------------------------

def test_an_ordinary_request_gets_neither_steps_nor_wire(proxy):
    extension = chat(proxy[0])["costeer"]
    assert "steps" not in extension and "wire" not in extension
    for options in ({}, {"steps": False, "wire": False}):
        assert not {"steps", "wire"} & set(chat(proxy[0], costeer=options)["costeer"])


def test_steps_are_generation_steps_and_come_alone_when_asked_alone(proxy):
    extension = chat(proxy[0], costeer={"steps": True}, max_tokens=16)["costeer"]
    g = embedded().generate(PROMPT, "\n\n".join(s.text for s in SOURCES), max_new_tokens=16, explain=True)
    assert extension["steps"] == [s.to_dict() for s in g.steps] and "wire" not in extension
    assert len(extension["steps"]) == 16 and all(s["steering"] is not None for s in extension["steps"])


def test_a_stream_carries_steps_and_wire_on_its_finish_chunk(proxy):
    request = {"model": "costeer", "messages": MESSAGES, "max_tokens": 10, "stream": True, "costeer": BOTH}
    with httpx.stream("POST", f"{proxy[0]}/v1/chat/completions", json=request, headers=AUTH, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    finish = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and len(finish[0]["costeer"]["steps"]) == 10 and finish[0]["costeer"]["wire"]["mode"] == "embedded"
    assert all("costeer" not in c for c in chunks if c is not finish[0])


def sent(wire: dict) -> list[dict]:
    """The requests of a wire record, session ids replaced by one placeholder."""
    return [{**e, "path": re.sub(r"/sessions/[^/]+", "/sessions/SESSION", e["path"])}
            for e in wire["exchanges"] if e["direction"] == "device->cloud"]


def appended(requests: list[dict]) -> list[list[int]]:
    return [e["body"]["tokens"] for e in requests if e["body"] and e["body"].get("tokens")]


@pytest.mark.parametrize("method", ["llm", "costeer"])
def test_the_embedded_record_is_what_the_split_client_sends(proxy, split, method):
    embedded_wire = chat(proxy[0], model=method, costeer={"wire": True}, max_tokens=12)["costeer"]["wire"]
    split_answer = chat(split, model=method, costeer={"wire": True}, max_tokens=12)
    split_wire = split_answer["costeer"]["wire"]
    assert embedded_wire["mode"] == "embedded" and split_wire["mode"] == "split"
    assert "would have sent" in embedded_wire["note"] and embedded_wire["bytes_from_cloud"] is None
    mine, theirs = sent(embedded_wire), sent(split_wire)
    assert mine[0] == theirs[0]  # the OpenSession body, byte for byte
    assert appended(mine) == appended(theirs) and len(appended(mine)) == 11  # the last token ends the loop unsent
    if method == "llm":  # greedy on the cloud alone: top-1 settles every step, so the split run never looks again
        assert mine == theirs
    assert mine[0]["body"]["messages"][-1] == {"role": "user", "content": PROMPT}
    assert all(e["bytes"] == len(e["json"].encode()) for e in mine if e["json"] is not None)
    # the record also holds the DELETE that ends the session, after `traffic` was counted
    assert split_wire["round_trips"] == split_answer["costeer"]["traffic"]["round_trips"] + 1
    assert theirs[-1]["method"] == "DELETE" and mine[-1] == theirs[-1]
    assert split_wire["bytes_to_cloud"] == split_answer["costeer"]["traffic"]["bytes_to_cloud"]
    for wire in (embedded_wire, split_wire):
        assert CANARY not in json.dumps(wire) and "Tromso" not in json.dumps(wire)


def test_a_method_that_gives_the_cloud_the_context_shows_no_record_and_one_without_the_cloud_an_empty_one(proxy):
    withheld = chat(proxy[0], model="llm-context", costeer={"wire": True})["costeer"]["wire"]
    assert withheld["withheld"] is True and withheld["exchanges"] == [] and CANARY not in json.dumps(withheld)
    device_only = chat(proxy[0], model="slm-context", costeer={"wire": True})["costeer"]["wire"]
    assert device_only["exchanges"] == [] and device_only["round_trips"] == 0 and "nothing would cross" in device_only["note"]


def test_the_costeer_option_is_validated_like_the_rest_of_the_request(proxy):
    response = httpx.post(f"{proxy[0]}/v1/chat/completions", headers=AUTH,
                          json={"messages": MESSAGES, "max_tokens": 2, "costeer": {"steps": "yes"}})
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("costeer")
