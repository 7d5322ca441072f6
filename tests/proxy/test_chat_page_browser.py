"""The proxy's chat page in a real headless Chromium (Debian's, driven by Playwright for
Python; never a downloaded browser). On the default models: the page streams an answer
steered by the example profile, the cloud panel holds none of the profile while the
answer does, the token tint is `Generation.steps` token for token, and compare shows
the cloud alone beside it, at 1280 px and at a phone's 390 px (screenshots under
out/chat-page/, ignored by git). On the NumPy models: what a chat app must do besides
(Enter and Shift+Enter, stop, a wrong key, a full queue, a proxy that dies mid-answer,
a reload that keeps the conversation).

Marked `models` with the real-model tests: they need the browser (installed with apt-get
on first use where this runs as root, else skipped) and run on the models' worker."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from costeer import CoSteer
from costeer.prompts import ContextSource
from costeer.proxy.access import ProxyAccess
from costeer.proxy.app import create_proxy_app
from costeer.proxy.schema import ProxyDefaults
from support.example_profile import BIRTHDAY_PROMPT, EXAMPLE_PROFILE, PROFILE_FACTS, facts_in
from support.fakes import NumpyModel, SlowEndlessModel
from support.servers import TESTS, app_in_thread, free_port, running

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.models

CHROMIUM = "/usr/bin/chromium"
# what works headless in a container: no sandbox (root), no GPU, nothing fetched in the background
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = TESTS.parent / "out" / "chat-page"  # /out/ is in .gitignore
KEY = "browser-test-key-0123456789"
MAX_TOKENS = 24  # the real models share 2 cores: a few short answers
WIDE, PHONE = {"width": 1280, "height": 860}, {"width": 390, "height": 844}
WAIT_MS = 600_000


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium; installed with apt-get where it is missing and this runs as root."""
    if not os.path.exists(CHROMIUM):
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            pytest.skip(f"no Chromium at {CHROMIUM}, and apt-get cannot install it here (not root, or no apt-get): "
                        "apt-get install chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=900, capture_output=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env, timeout=1800,
                       capture_output=True)
    return CHROMIUM


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@contextlib.contextmanager
def opened(browser, url: str, viewport: dict = WIDE, key: str = KEY):
    """A fresh browser context (its own storage) on the page, connected with `key`; the
    page's console errors and uncaught exceptions are collected in page.problems."""
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on("console", lambda message: page.problems.append(message.text) if message.type == "error" else None)
    page.goto(f"{url}/")
    connect(page, key)
    try:
        yield page
    finally:
        context.close()


def connect(page, key: str) -> None:
    page.fill("#key-input", key)
    page.click("#key-form button[type=submit]")


def ask(page, prompt: str, compare: bool = False) -> None:
    page.wait_for_selector("#conn-dot.on")  # connected: the methods are listed
    if page.is_checked("#compare") != compare:
        page.click("label.switch")
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")


def answers(page, status: str = "done", count: int = 1, timeout: float = WAIT_MS):
    """The answer cards, once the last `count` of them have `status`."""
    page.wait_for_selector(f".turn:last-child .answer[data-status={status}] >> nth={count - 1}", timeout=timeout)
    return page.locator(".turn:last-child .answer")


def show(card, view: str) -> None:
    card.locator(f".seg button[data-view={view}]").click()


def tokens_in(card) -> list[tuple[int, bool]]:
    show(card, "tint")
    spans = card.locator(".tok")
    return [(int(spans.nth(i).get_attribute("data-token-id")), spans.nth(i).get_attribute("data-changed") == "true")
            for i in range(spans.count())]


def stored_turns(page) -> list[dict]:
    """The conversation as the page keeps it in localStorage (read through the DevTools
    protocol: the page's CSP refuses evaluated strings, not this)."""
    return json.loads(page.evaluate("localStorage.getItem('costeer.chat.v1')"))


def screenshot(page, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


# --- the default models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_proxy(tmp_path_factory):
    """`costeer proxy` as a user starts it, on the default models and the example profile."""
    port, log = free_port(), tmp_path_factory.mktemp("proxy") / "proxy.log"
    command = [sys.executable, "-m", "costeer.cli", "proxy", "--port", str(port), "--context", str(EXAMPLE_PROFILE),
               "--max-new-tokens", str(MAX_TOKENS)]
    with running(command, "/", port, env={"COSTEER_PROXY_API_KEY": KEY, "PYTHONUNBUFFERED": "1"}, timeout_s=900,
                 log=log) as url:
        yield url


def test_the_page_streams_a_steered_answer_that_the_cloud_panel_does_not_betray(browser, real_proxy):
    with opened(browser, real_proxy) as page:
        page.wait_for_selector("#context-files .name")  # listed (before: a line asking for the key)
        files = page.locator("#context-files li")
        assert EXAMPLE_PROFILE.name in files.first.inner_text() and "tok" in files.first.inner_text()
        assert not facts_in(page.locator("#sidebar").inner_text())  # names and sizes, never the text
        ask(page, BIRTHDAY_PROMPT)
        answers(page, "streaming")  # it streams: the card is there before the answer is done
        card = answers(page).first
        text = card.locator(".text").inner_text()
        assert facts_in(text), text  # the private profile steered the answer
        show(card, "wire")
        cloud_saw = card.locator(".wire").inner_text()
        assert BIRTHDAY_PROMPT in cloud_saw and "would have crossed" in cloud_saw
        assert not facts_in(cloud_saw) and "Okonkwo" not in cloud_saw, cloud_saw  # the canaries stay on the device
        screenshot(page, "cloud-saw-1280")
        assert not page.problems, page.problems


def test_the_token_tint_is_generation_steps_token_for_token(browser, real_proxy):
    generated = subprocess.run(
        [sys.executable, "-m", "costeer.cli", "generate", "--prompt", BIRTHDAY_PROMPT, "--context", str(EXAMPLE_PROFILE),
         "--method", "costeer", "--max-new-tokens", str(MAX_TOKENS), "--json", "--explain"],
        capture_output=True, text=True, timeout=900)
    assert generated.returncode == 0, generated.stderr
    steps = json.loads(generated.stdout)["steps"]
    with opened(browser, real_proxy) as page:
        ask(page, BIRTHDAY_PROMPT)
        tinted = tokens_in(answers(page).first)
        assert tinted == [(s["token_id"], s["changed"]) for s in steps]
        assert any(changed for _, changed in tinted)  # the profile moved some picks, and they are marked
        changed = page.locator(".tok.changed").first
        changed.hover()
        tip = page.locator("#tooltip").inner_text()
        assert "cloud alone would pick" in tip and "%" in tip and "nats" in tip


def test_compare_shows_the_cloud_alone_beside_the_steered_answer_at_1280_and_390_px(browser, real_proxy):
    with opened(browser, real_proxy) as page:
        ask(page, BIRTHDAY_PROMPT, compare=True)
        cards = answers(page, count=2)
        assert cards.count() == 2
        steered, alone = cards.nth(0), cards.nth(1)
        assert steered.get_attribute("data-method") == "costeer" and alone.get_attribute("data-method") == "llm"
        assert facts_in(steered.locator(".text").inner_text()) and not facts_in(alone.locator(".text").inner_text())
        first, second = steered.bounding_box(), alone.bounding_box()
        assert abs(first["y"] - second["y"]) < 2 and second["x"] > first["x"] + first["width"]  # side by side
        show(steered, "tint")
        changed = page.locator(".answer.steered .tok.changed")
        changed.nth(changed.count() // 2).hover()  # a changed pick mid-answer: its tooltip
        assert page.is_visible("#tooltip")
        screenshot(page, "compare-1280")  # docs/images/chat.png
        page.set_viewport_size(PHONE)
        page.mouse.move(0, 0)
        page.wait_for_timeout(400)  # the side panel slides away (0.2 s)
        first, second = steered.bounding_box(), alone.bounding_box()
        assert second["y"] >= first["y"] + first["height"] and first["width"] <= PHONE["width"]  # stacked
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]  # nothing wider than a phone
        screenshot(page, "compare-390")
        assert not page.problems, page.problems


# --- what a chat app must do, on the NumPy models ---------------------------------------------------

SOURCES = [ContextSource("notes/okonkwo-bees.md", 40, "I keep bees. canary-Browser-3131")]


@contextlib.contextmanager
def fake_proxy(slow: bool = False, **access):
    kind = (lambda seed, name: SlowEndlessModel(seed, name, delay_s=0.01)) if slow else NumpyModel
    cs = CoSteer(llm=kind(1, "numpy-cloud"), slm=kind(2, "numpy-device"), context_cache=False)
    port = free_port()
    app = create_proxy_app(cs, SOURCES, ProxyDefaults(max_tokens=400 if slow else 16),
                           access=ProxyAccess(api_key=KEY, port=port, **access))
    with app_in_thread(app, port) as url:
        yield url, app


def test_enter_sends_shift_enter_breaks_the_line_and_a_second_turn_carries_the_first(browser):
    with fake_proxy() as (url, _), opened(browser, url, PHONE) as page:
        page.wait_for_selector("#conn-dot.on")  # connected: the methods are listed
        page.fill("#prompt", "First line")
        page.press("#prompt", "Shift+Enter")
        page.type("#prompt", "second line")
        assert page.input_value("#prompt") == "First line\nsecond line" and page.locator(".answer").count() == 0
        page.press("#prompt", "Enter")
        answers(page)
        first = stored_turns(page)[1]["answers"][0]["text"]  # as the model wrote it (the page renders Markdown)
        assert page.locator(".msg-user .bubble").first.inner_text() == "First line\nsecond line"
        ask(page, "And again.")
        card = answers(page).first
        show(card, "wire")
        opened_session = json.loads(card.locator(".exchange pre").first.inner_text())
        assert [m["role"] for m in opened_session["messages"]] == ["system", "user", "assistant", "user"]
        assert opened_session["messages"][2]["content"] == first
        assert "canary-Browser" not in page.content()
        assert not page.problems, page.problems


def test_stop_aborts_the_request_and_the_proxy_stops_generating(browser):
    with fake_proxy(slow=True) as (url, app), opened(browser, url) as page:
        ask(page, "Write a long story.")
        page.locator(".answer .text:not(.thinking)").first.wait_for()
        page.click("#stop")
        card = answers(page, "stopped").first
        assert "Stopped" in card.locator(".error-box").inner_text() and card.locator(".text").inner_text()
        wait_until(lambda: app.state.stats.cancelled == 1)
        assert app.state.stats.completed == 0 and page.is_visible("#send")


def wait_until(condition, timeout_s: float = 30) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_wrong_key_and_a_full_queue_are_shown_in_the_page(browser):
    with fake_proxy(slow=True, max_queue=1) as (url, _):
        with opened(browser, url, key="not-the-key-0123456789") as page:
            error = page.locator("#key-error")
            error.wait_for()
            assert "401" in error.inner_text() and page.locator("#key-dialog").is_visible()
            connect(page, KEY)
            page.locator("#key-dialog").wait_for(state="hidden")
            ask(page, "Hello.", compare=True)  # two requests at once, and the queue holds one
            refused = answers(page, "error").nth(1)
            assert "429" in refused.locator(".error-box").inner_text() and refused.locator(".retry").is_visible()
            page.click("#stop")


_FAKE_PROXY = """
import sys
sys.path.insert(0, sys.argv[1])
from costeer import CoSteer
from costeer.proxy.access import ProxyAccess
from costeer.proxy.app import serve_proxy
from costeer.proxy.schema import ProxyDefaults
from support.fakes import SlowEndlessModel
cs = CoSteer(llm=SlowEndlessModel(1, "numpy-cloud", delay_s=float(sys.argv[4])),
             slm=SlowEndlessModel(2, "numpy-device", delay_s=float(sys.argv[4])), context_cache=False)
serve_proxy(cs, "I keep bees.", ProxyDefaults(max_tokens=60), ProxyAccess(api_key=sys.argv[3], port=int(sys.argv[2])))
"""


def fake_proxy_process(port: int, delay_s: float, procs: list):
    return running([sys.executable, "-c", _FAKE_PROXY, str(TESTS), str(port), KEY, str(delay_s)], "/", port,
                   procs=procs)


def test_a_proxy_that_dies_mid_answer_loses_nothing_and_retry_finishes_the_answer(browser):
    port, procs = free_port(), []
    with fake_proxy_process(port, 0.05, procs) as url, opened(browser, url) as page:
        ask(page, "Tell me about bees.")
        page.locator(".answer .text:not(.thinking)").first.wait_for()
        procs[0].send_signal(signal.SIGKILL)  # no goodbye: the stream just breaks
        card = answers(page, "error").first
        partial = card.locator(".text").inner_text()
        assert partial and "retry" in card.locator(".error-box").inner_text().lower()
        with fake_proxy_process(port, 0.0, []):
            page.reload()  # the page comes from the proxy again; the conversation from localStorage
            card = answers(page, "error").first
            assert card.locator(".text").inner_text() == partial
            card.locator(".retry").click()
            card = answers(page).first
            assert len(card.locator(".text").inner_text()) > len(partial) and not card.locator(".error-box").count()
