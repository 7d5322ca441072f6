"""`costeer proxy` as a user runs it: a real subprocess with the default models, called
with the official `openai` SDK, answering exactly as `costeer generate` does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from support.example_profile import BIRTHDAY_PROMPT, EXAMPLE_PROFILE, facts_in
from support.servers import free_port, running

openai = pytest.importorskip("openai")

MAX_TOKENS = 40
KEY = "models-proxy-key-0123456789"


@pytest.mark.models
def test_the_proxy_streams_what_costeer_generate_prints_with_the_profile_in_it(tmp_path):
    port, log = free_port(), tmp_path / "proxy.log"
    env = {"PYTHONUNBUFFERED": "1"}
    # the key from the environment, as a user would give it (not in argv, where ps shows it)
    command = [sys.executable, "-m", "costeer.cli", "proxy", "--port", str(port), "--context", str(EXAMPLE_PROFILE)]
    with running(command, "/v1/models", port, env={**env, "COSTEER_PROXY_API_KEY": KEY}, timeout_s=600,
                 log=log) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=600)
        stream = client.chat.completions.create(model="costeer", messages=[{"role": "user", "content": BIRTHDAY_PROMPT}],
                                                stream=True, max_tokens=MAX_TOKENS, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        # a second request with the same context starts from the device's saved prefill of it
        again = client.chat.completions.create(model="costeer", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
    proxy_log = log.read_text(encoding="utf-8")
    assert "OpenAI-compatible endpoint on" in proxy_log and "Thaddeus" not in proxy_log  # the profile is never logged
    assert "$COSTEER_PROXY_API_KEY" in proxy_log and KEY not in proxy_log  # the key neither
    generated = subprocess.run(
        [sys.executable, "-m", "costeer.cli", "generate", "--prompt", BIRTHDAY_PROMPT, "--context", str(EXAMPLE_PROFILE),
         "--method", "costeer", "--max-new-tokens", str(MAX_TOKENS), "--json"],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env})
    assert generated.returncode == 0, generated.stderr
    expected = json.loads(generated.stdout)
    assert text == expected["text"], (text, expected["text"])
    assert facts_in(text), text  # the private profile steered the answer (the demo's "Thaddeus")
    usage = chunks[-1].usage
    assert usage.completion_tokens == expected["new_tokens"] and usage.prompt_tokens == expected["prompt_tokens"]["llm_public"]
    assert again.usage.completion_tokens == 4 and again.model_extra["costeer"]["context_tokens_reused"] > 0
