"""The `costeer` command line: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from ._version import __version__
from .transport.protocol import CPU_LOOKAHEAD, DEFAULT_LOOKAHEAD_MIN_P, MAX_DRAFT_TOKENS, MAX_LOOKAHEAD_NODES
from .errors import UserError
from .fusion import SteeringParams
from .methods import DEFAULT_TOP_K, METHODS
from .transport.server.limits import ServerLimits
from .default_models import KNOWN_MODELS

MODEL_NAMES = ", ".join(KNOWN_MODELS)

EXAMPLE_DIR = Path(__file__).parent / "examples"
DEMO_PROMPT = "Write a two-sentence invitation to my birthday party."


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _draft_tokens(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_DRAFT_TOKENS:
        raise argparse.ArgumentTypeError(f"must be 0..{MAX_DRAFT_TOKENS}, got {value}")
    return value


def _tree(text: str) -> tuple[int, int, float]:
    """D,M[,P] only (the bench measures a given tree)."""
    tree = _lookahead(text)
    if not isinstance(tree, tuple):
        raise argparse.ArgumentTypeError(f"expected DEPTH,WIDTH[,MIN_P] such as 3,1, got {text!r}")
    return tree


def _lookahead(text: str) -> tuple[int, int, float] | str | None:
    """D,M or D,M,P: a tree of depth D and width M, grown under nodes where the cloud's
    likeliest token has probability >= P (default 0.5); `auto`, or `off` (None)."""
    if text in ("auto", "off"):
        return None if text == "off" else text
    parts = text.split(",")
    try:
        depth, width = int(parts[0]), int(parts[1])
        min_probability = float(parts[2]) if len(parts) == 3 else DEFAULT_LOOKAHEAD_MIN_P
        if len(parts) not in (2, 3):
            raise ValueError
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"expected DEPTH,WIDTH[,MIN_P] such as 3,1 or 2,4,0.5, got {text!r}") from None
    if not (1 <= depth <= 4 and 1 <= width <= 8):
        raise argparse.ArgumentTypeError(f"depth must be 1..4 and width 1..8, got {text!r}")
    if not 0 <= min_probability <= 1:
        raise argparse.ArgumentTypeError(f"MIN_P must be between 0 and 1, got {text!r}")
    if sum(width**d for d in range(1, depth + 1)) > MAX_LOOKAHEAD_NODES:
        raise argparse.ArgumentTypeError(f"a tree of depth {depth} and width {width} has more than "
                                         f"{MAX_LOOKAHEAD_NODES} nodes (the server's limit)")
    return depth, width, min_probability


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, as argparse does, minus the usage dump
        raise UserError(message)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm", help=f"cloud model: a GGUF file, a Hugging Face folder, or a name ({MODEL_NAMES}; default: "
                   "qwen2.5-coder-1.5b)")
    p.add_argument("--slm", help=f"device model, any tokenizer: a GGUF file, a Hugging Face folder, or a name ({MODEL_NAMES}; "
                   "default: qwen2.5-coder-0.5b)")
    p.add_argument("--backend", default="auto", choices=["auto", "llama.cpp", "transformers"])
    p.add_argument("--no-context-cache", action="store_true",
                   help="prefill the private context from scratch and save nothing (default: reuse the device's saved "
                        "prefill of the same context, same output; see `costeer cache`)")


def _add_cloud_args(p: argparse.ArgumentParser, own_api_key: bool = False) -> None:
    """Where the cloud model runs when not here: `generate` and `proxy` take the same options.
    `own_api_key`: the command has an --api-key of its own (proxy: its clients' key), so the
    cloud's key is --cloud-api-key only; elsewhere --api-key is its older name."""
    cloud = p.add_argument_group("remote cloud (the device model stays here)")
    cloud.add_argument("--cloud", metavar="URL", help="a `costeer serve` server (http://HOST:PORT), vLLM or any "
                       "OpenAI-compatible completions server (openai+http://HOST:PORT/v1), or llama.cpp's "
                       "llama-server (llama-server+http://HOST:PORT)")
    cloud.add_argument("--cloud-model", help="model name for an OpenAI-compatible server (default: its first)")
    cloud.add_argument("--cloud-max-k", type=_positive_int, default=None,
                       help="most logprobs to ask of an OpenAI-compatible server or llama-server (default: "
                       "no limit but the server's own, learned from its refusal)")
    cloud.add_argument("--cloud-api-key", *(() if own_api_key else ("--api-key",)), dest="cloud_api_key", default=None,
                       metavar="KEY", help="the cloud server's key (default: $COSTEER_API_KEY)")
    cloud.add_argument("--wire-log", metavar="FILE", help="append every message to and from the cloud as JSON lines")
    cloud.add_argument("--cloud-timeout", metavar="S", type=_finite_float, default=120.0,
                       help="seconds any one request to the cloud may take before a clear error (default 120)")
    cloud.add_argument("--cloud-retry-for", metavar="S", type=_finite_float, default=60.0,
                       help="if a costeer serve cloud goes away mid-generation, keep trying to reopen the session there "
                            "for S seconds and carry on with the same output (default 60; 0: fail at once)")
    cloud.add_argument("--simulate-rtt", metavar="MS", type=_finite_float, default=0.0, help="add this network round-trip time")
    cloud.add_argument("--send-private-context-to-cloud", action="store_true",
                       help="let methods that give the cloud model the private context (llm-context) send it to a "
                            "remote cloud; refused without this flag")
    cloud.add_argument("--cloud-top-k", type=_positive_int, default=DEFAULT_TOP_K,
                       help=f"first k asked of the cloud each step (default {DEFAULT_TOP_K}); escalates when not certified, "
                            "and asks more up front after steps that escalated (costeer serve)")
    cloud.add_argument("--fixed-top-k", action="store_true",
                       help="ask --cloud-top-k every step, whatever earlier steps needed (same output)")
    cloud.add_argument("--lookahead", metavar="D,M[,P]|auto|off", type=_lookahead, default="auto",
                       help="with each step the cloud also sends its distributions after its own M likeliest "
                            "tokens, D levels deep, where its likeliest token has probability >= P (default 0.5); "
                            "the device walks them and sends several tokens per round trip (same output, fewer "
                            "round trips; costeer serve only; 3,1 suits a CPU cloud). Default auto: 3,1,0.5 where "
                            "a round trip to the cloud takes 80 ms or more, measured on connecting")
    cloud.add_argument("--speculate", metavar="K", type=_draft_tokens, default=0,
                       help="with each request, send the device's guess of the next K tokens; the cloud answers "
                            "with its distributions along them, and where the choices follow the guess no request "
                            "is needed (same output, fewer round trips; costeer serve only; combines with --lookahead)")


def _add_decoding_args(p: argparse.ArgumentParser, prompt_args: bool = True) -> None:
    p.add_argument("--max-new-tokens", type=_positive_int, default=256)
    p.add_argument("--temperature", type=_finite_float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=_finite_float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    _add_steering_args(p, prompt_args)


def _add_steering_args(p: argparse.ArgumentParser, prompt_args: bool = True) -> None:
    d = SteeringParams()
    p.add_argument("--iterations", "-T", type=int, default=d.iterations, help="FTRL iterations T (default 20)")
    p.add_argument("--alpha", type=_finite_float, default=d.alpha)
    p.add_argument("--beta", type=_finite_float, default=d.beta)
    p.add_argument("--lambda", dest="lam", type=_finite_float, default=d.lam)
    p.add_argument("--eta", type=_finite_float, default=d.eta)
    p.add_argument("--fusion", choices=["closed", "loop"], default="closed", help="closed form (default) or the paper's loop")
    if prompt_args:  # `eval` takes its prompts from the dataset
        p.add_argument("--system-prompt", default=None, help="default: the paper's 'You are a helpful assistant.'")
        p.add_argument("--max-context-tokens", type=int, default=None, help="cut the private context to this many tokens")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="costeer", description="CoSteer: a cloud LLM steered by a private on-device model.")
    parser.add_argument("--version", action="version", version=f"costeer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate an answer")
    gen.add_argument("--prompt", required=True, help="the public request (the cloud sees it)")
    gen.add_argument("--context", action="append", default=[], metavar="FILE",
                     help="private context file, a folder of .txt, .md and .json files, or - to read it from stdin "
                          "(repeatable)")
    gen.add_argument("--context-text", default=None,
                     help="private context given inline (visible to other local users in ps: prefer --context -)")
    gen.add_argument("--method", default="costeer",
                     help=f"one of {', '.join(METHODS)}, or cos:LAMBDA, mix:W, unsure:W, bounded:B, ada:P "
                          "(default costeer, the paper's; auto is the recommended one)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    gen.add_argument("--explain", action="store_true",
                     help="per token: the cloud's own pick and probability, the fused probability and the steering "
                          "term (in --json as `steps`; otherwise the tokens steering changed, on stderr)")
    _add_cloud_args(gen)
    _add_model_args(gen)
    _add_decoding_args(gen)

    score = sub.add_parser("score", help="how likely given answers are under each method (teacher-forced "
                           "log-likelihood; the cloud model runs here)")
    score.add_argument("--prompt", required=True, help="the public request")
    score.add_argument("--answer", action="append", default=[], metavar="TEXT",
                       help="a continuation to score as the reply (repeatable)")
    score.add_argument("--answer-file", action="append", default=[], metavar="FILE",
                       help="a file whose whole text is one continuation (repeatable)")
    score.add_argument("--context", action="append", default=[], metavar="FILE",
                       help="private context file, a folder, or - for stdin (repeatable)")
    score.add_argument("--context-text", default=None, help="private context given inline (visible in ps)")
    score.add_argument("--methods", default="llm,costeer",
                       help="comma-separated methods to score under (default llm,costeer): those of generate")
    score.add_argument("--batched", action="store_true",
                       help="feed each answer in few forward passes: faster, with llama.cpp's batch rounding "
                            "(default: stepwise, the numbers generation sees)")
    score.add_argument("--json", action="store_true", help="print one JSON object per method and answer")
    _add_model_args(score)
    _add_steering_args(score)

    demo = sub.add_parser("demo", help="the cloud model alone and CoSteer side by side on an example profile")
    demo.add_argument("--prompt", default=DEMO_PROMPT)
    demo.add_argument("--context", action="append", default=[], metavar="FILE")
    demo.add_argument("--max-new-tokens", type=_positive_int, default=80)
    _add_model_args(demo)

    srv = sub.add_parser("serve", help="host the cloud model over HTTP for devices (`generate --cloud`)")
    srv.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only); any other address "
                     "needs an API key, or --insecure")
    srv.add_argument("--port", type=_positive_int, default=8750)
    srv.add_argument("--api-key", action="append", default=[],
                     help="require a key (printable ASCII, at least 16 characters); repeatable, one per user "
                          "(default: $COSTEER_API_KEY, comma-separated; none: open)")
    srv.add_argument("--insecure", action="store_true",
                     help="allow serving on a non-loopback --host with no API key (anyone who can connect may use it)")
    srv.add_argument("--llm", help=f"the cloud model: a GGUF file, a Hugging Face folder, or a name ({MODEL_NAMES}; default: "
                     "qwen2.5-coder-1.5b)")
    srv.add_argument("--backend", default="auto", choices=["auto", "llama.cpp", "transformers"])
    limits = ServerLimits()
    srv.add_argument("--max-sessions", type=_positive_int, default=limits.max_sessions)
    srv.add_argument("--session-ttl", type=_positive_int, default=limits.session_ttl_s, help="seconds an idle session lives")
    srv.add_argument("--max-prompt-tokens", type=_positive_int, default=limits.max_prompt_tokens)
    srv.add_argument("--max-new-tokens", type=_positive_int, default=limits.max_new_tokens)
    srv.add_argument("--max-kv-tokens", type=_positive_int, default=limits.max_kv_tokens,
                     help="KV cache tokens all sessions may reserve together, prompt plus max_new_tokens each "
                          "(the default model keeps 28 KiB a token)")
    srv.add_argument("--batch-slot-tokens", type=_positive_int, default=limits.batch_slot_tokens,
                     help="KV tokens of each of the --max-sessions slots of the shared, batched cache (allocated at "
                          "start, out of --max-kv-tokens); longer sessions and lookahead trees get caches of their own")
    srv.add_argument("--max-batch", type=_positive_int, default=None,
                     help="tokens in one batched forward pass (default: the most that keeps every session's output "
                          "independent of the others', 3 on llama.cpp's CPU kernels; more is faster)")
    srv.add_argument("--max-sessions-per-key", type=_positive_int, default=None,
                     help="sessions one API key may hold at once (default: half of --max-sessions with two keys or "
                          "more, all of them with one)")
    srv.add_argument("--session-max-age", type=_positive_int, default=limits.session_max_age_s,
                     help=f"seconds a session may live however busy it is (default {limits.session_max_age_s})")
    srv.add_argument("--max-body-bytes", type=_positive_int, default=limits.max_body_bytes,
                     help=f"largest request body, refused unread beyond it (default {limits.max_body_bytes})")

    proxy = sub.add_parser("proxy", help="an OpenAI-compatible chat endpoint on this device, personalized with "
                           "the private context (the model field picks the method)")
    proxy.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    proxy.add_argument("--port", type=_positive_int, default=8008)
    proxy.add_argument("--context", action="append", default=[], metavar="FILE",
                       help="private context file, a folder of .txt, .md and .json files, or - to read it from "
                            "stdin (repeatable)")
    proxy.add_argument("--context-text", default=None,
                       help="private context given inline (visible to other local users in ps: prefer --context -)")
    access = proxy.add_argument_group("who may ask (the proxy's answers are steered by the private context)")
    access.add_argument("--api-key", metavar="KEY", default=None,
                        help="the key every request must carry (Authorization: Bearer KEY: the openai SDK's api_key), "
                             "16 or more printable characters (default: $COSTEER_PROXY_API_KEY, else the key in "
                             "$XDG_CONFIG_HOME or ~/.config, costeer/proxy-key, made mode 0600 at first start; a key "
                             "on the command line shows in ps: prefer those)")
    access.add_argument("--no-key", action="store_true",
                        help="ask no key: with a loopback --host only, and then any program or user on this machine "
                             "can read answers steered by the private context")
    access.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a Host name requests may use besides localhost, 127.0.0.1, ::1 and --host (repeatable; "
                             "others are refused, against DNS rebinding)")
    access.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                        help="a web page origin (scheme://host[:port]) that may call the proxy besides its own "
                             "(repeatable; requests from other pages are refused)")
    access.add_argument("--max-body-bytes", type=_positive_int, default=2 * 2**20, metavar="N",
                        help="largest request body (default 2 MiB)")
    access.add_argument("--methods", default=None, metavar="LIST",
                        help=f"the methods served, comma-separated (default: {', '.join(METHODS)}); parametric ones "
                             "only when listed: mix, unsure, bounded, cos:*, ada:*, fit:* (any number in range) or "
                             "PREFIX:NUMBER (that one); ranges: mix:W and unsure:W -8..8, bounded:B 0..8 (B > 0), "
                             "cos:LAMBDA -8..8, ada:P 0..1 (strictly), fit:W 0..8 (W > 0)")
    access.add_argument("--max-queue", type=_positive_int, default=8, metavar="N",
                        help="requests waiting or running at once (default 8); more are refused with 429 and "
                             "Retry-After")
    _add_cloud_args(proxy, own_api_key=True)
    _add_model_args(proxy)
    _add_decoding_args(proxy)  # the defaults of what a request leaves out; --max-new-tokens: of max_tokens

    models = sub.add_parser("models", help="assemble and verify the default models (and any named), print their paths")
    models.add_argument("names", nargs="*", help=f"more models to assemble by name ({MODEL_NAMES})")
    models.add_argument("--quiet", action="store_true")

    cache = sub.add_parser("cache", help="the device's private-context cache: where it is and how big, or delete it")
    cache.add_argument("action", choices=["info", "clear"], help="info: folder, entries, bytes; clear: delete every entry")

    ev = sub.add_parser("eval", help="run methods over a dataset, score the answers, write results and a report")
    ev.add_argument("--dataset", required=True, metavar="PATH",
                    help="a CoGenesis folder or ctx_X.json (with ctx_X_wo.json beside it), or preference:KIND "
                         "with KIND concise, verbose, creative or uplifting")
    ev.add_argument("--out", required=True, metavar="DIR", help="results.jsonl, report.md and plots; rerun to resume")
    ev.add_argument("--methods", default="llm,costeer",
                    help="comma-separated methods (default llm,costeer): those of generate, cos, cos:LAMBDA, mix:W")
    ev.add_argument("--limit", type=_positive_int, default=None, help="only the first N examples")
    ev.add_argument("--no-figures", action="store_true",
                    help="write report.md without its PNG figures (the same tables, about a second less a run)")
    _add_model_args(ev)
    _add_decoding_args(ev, prompt_args=False)

    bench = sub.add_parser("bench", help="every speed figure side by side in one run (device on CPU 0, cloud on CPU 1)")
    bench.add_argument("--rounds", type=_positive_int, default=2, help="repeats of every variant, in rotating order")
    bench.add_argument("--prompts", type=_positive_int, default=2, help="CoGenesis dev tasks per round")
    bench.add_argument("--max-new-tokens", type=_positive_int, default=32)
    bench.add_argument("--rtt-ms", default="0,20,100", help="simulated round-trip times, comma-separated")
    bench.add_argument("--lookahead", metavar="D,M[,P]", type=_tree, default=CPU_LOOKAHEAD,
                       help="the lookahead tree measured beside per-token steps (default 3,1,0.5)")
    bench.add_argument("--speculate", metavar="K", type=_draft_tokens, default=2,
                       help="the draft length measured beside per-token steps, alone and with --lookahead (default 2)")
    bench.add_argument("--cloud-top-k", type=_positive_int, default=DEFAULT_TOP_K,
                       help=f"first k of a split session, every mode (default {DEFAULT_TOP_K}, as generate; sessions "
                            "adapt it as they go)")
    bench.add_argument("--data", metavar="DIR", default=None, help="a CoGenesis folder (default $COSTEER_DATA/cogenesis)")
    bench.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _steering(args: argparse.Namespace) -> SteeringParams:
    return SteeringParams(args.iterations, args.alpha, args.beta, args.lam, args.eta)


def _costeer(args: argparse.Namespace):
    """The CoSteer that `generate` and `proxy` run: model, backend and cloud options."""
    from .api import CoSteer
    from .config import CloudConfig

    # checked also without --cloud (then it configures nothing): a bad option is an error either way
    cloud = CloudConfig(args.cloud or "", api_key=args.cloud_api_key or os.environ.get("COSTEER_API_KEY"),
                        wire_log=args.wire_log, simulate_rtt_ms=args.simulate_rtt, top_k=args.cloud_top_k,
                        model=args.cloud_model, max_k=args.cloud_max_k, lookahead=args.lookahead,
                        timeout_s=args.cloud_timeout, retry_for_s=args.cloud_retry_for,
                        send_private_context_to_cloud=args.send_private_context_to_cloud,
                        adaptive_top_k=not args.fixed_top_k, speculate=args.speculate)
    return CoSteer(args.llm, args.slm, backend=args.backend, cloud=cloud if args.cloud else None,
                   context_cache=not args.no_context_cache)


def _request(args: argparse.Namespace):
    """The GenerationRequest that `generate`'s decoding options spell."""
    from .config import GenerationRequest
    from .prompts import PAPER_SYSTEM_PROMPT
    from .sampling import SamplingConfig

    return GenerationRequest(
        method=args.method,
        max_new_tokens=args.max_new_tokens,
        sampling=SamplingConfig(args.temperature, args.top_p, args.top_k, args.seed),
        steering=_steering(args),
        fusion=args.fusion,
        stop=args.stop,
        system_prompt=args.system_prompt if args.system_prompt is not None else PAPER_SYSTEM_PROMPT,
        max_context_tokens=args.max_context_tokens,
        explain=args.explain,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from .prompts import load_context

    context = load_context(args.context, args.context_text, text_from_command_line=True)
    request = _request(args)
    cs = _costeer(args)
    stream = None if args.json else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    g = cs.generate(args.prompt, context, request=request, on_text=stream)
    if args.json:
        print(json.dumps(g.to_dict(), ensure_ascii=False))
    else:
        sys.stdout.write("\n")
        print(f"[{g.method}: {g.new_tokens} tokens in {g.elapsed_s:.1f} s, {g.tokens_per_second:.1f} tok/s]", file=sys.stderr)
        if g.traffic:
            print(f"[cloud traffic: {json.dumps(g.traffic)}]", file=sys.stderr)
        if g.steps is not None:
            changed = [s for s in g.steps if s.changed]
            shown = ", ".join(f"{s.text!r} for {s.cloud_text!r}" for s in changed[:20])
            print(f"[explain: steering changed {len(changed)} of {len(g.steps)} picks{': ' if changed else ''}{shown}"
                  f"{', ...' if len(changed) > 20 else ''}]", file=sys.stderr)
        if g.alignment:
            a = g.alignment
            print(f"[tokenizers differ: steered on {a['shared_vocabulary']:,} shared tokens; {a['retokenized_steps']} "
                  f"of {a['steps']} cloud tokens outside them were re-spelled for the device, {a['deferred_steps']} "
                  "waited for the rest of a character]", file=sys.stderr)
    _warn_inexact(g.traffic or {})
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .api import CoSteer, GenerationRequest
    from .prompts import PAPER_SYSTEM_PROMPT, load_context

    context = load_context(args.context, args.context_text, text_from_command_line=True)
    answers = list(args.answer) + [_read_text(f) for f in args.answer_file]
    if not answers:
        raise UserError("nothing to score: give --answer TEXT or --answer-file FILE")
    methods = _method_list(args.methods)
    request = GenerationRequest(method=methods[0], steering=_steering(args), fusion=args.fusion,
                                system_prompt=PAPER_SYSTEM_PROMPT if args.system_prompt is None else args.system_prompt,
                                max_context_tokens=args.max_context_tokens)
    cs = CoSteer(args.llm, args.slm, backend=args.backend, context_cache=not args.no_context_cache)
    table = {m: cs.score(args.prompt, answers, context, dataclasses.replace(request, method=m), batched=args.batched)
             for m in methods}
    if args.json:
        for m, scores in table.items():
            for i, sc in enumerate(scores):
                print(json.dumps({"answer": i + 1, **sc.to_dict()}))
        return 0
    # one row per answer: its mean log-probability per token under each method; the best of each column starred
    width = max(10, *(len(m) for m in methods))
    print(f"{'answer':<8}{'tokens':>7}  " + "  ".join(f"{m:>{width}}" for m in methods))
    best = {m: max(range(len(answers)), key=lambda i: table[m][i].mean) for m in methods}
    for i, text in enumerate(answers):
        cells = [f"{table[m][i].mean:.3f}{'*' if best[m] == i else ' '}" for m in methods]
        print(f"{i + 1:<8}{len(table[methods[0]][i].token_ids):>7}  " + "  ".join(f"{c:>{width}}" for c in cells))
    print("mean log-probability per token (natural log); * the likeliest answer under that method", file=sys.stderr)
    return 0


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc.strerror if isinstance(exc, OSError) else 'not UTF-8'}") from None


def _method_list(text: str) -> list[str]:
    from .methods import make_policy

    methods = [m.strip() for m in text.split(",") if m.strip()]
    if not methods:
        raise UserError("--methods is empty")
    for m in methods:
        make_policy(m)  # an unknown method fails here, before a model loads
    return list(dict.fromkeys(methods))


def _warn_inexact(traffic: dict) -> None:
    """Say so when the cloud could not give what exactness needs (a server's cap, names)."""
    if traffic.get("uncertified_steps"):
        cap = f" (it sends at most {traffic['logprobs_cap']} logprobs; vLLM: start it with --max-logprobs -1)" \
            if traffic.get("logprobs_cap") else ""
        print(f"costeer: {traffic['uncertified_steps']} of {traffic['steps']} steps were chosen inside the cloud's "
              f"top-k without proof that the full vocabulary agrees{cap}", file=sys.stderr)
    if traffic.get("unmapped_top_entries"):
        print(f"costeer: {traffic['unmapped_top_entries']} top-k entries from the cloud named no single token id "
              "(it keys them by text): use a server that names ids (vLLM, llama-server)", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    from .backends import load_model
    from .default_models import DEFAULT_LLM, resolve_model_path
    from .transport.guard import check_keys
    from .transport.server.app import check_exposure, serve

    # keys and exposure first: a mistake there is one line now, not after a model load
    keys = check_keys(args.api_key or _env_keys())
    warning = check_exposure(args.host, keys, args.insecure)
    if warning:
        print(f"costeer: {warning}", file=sys.stderr)
    model = load_model(resolve_model_path(args.llm, DEFAULT_LLM), args.backend)
    limits = ServerLimits(max_sessions=args.max_sessions, session_ttl_s=args.session_ttl, max_prompt_tokens=args.max_prompt_tokens,
                          max_new_tokens=args.max_new_tokens, max_kv_tokens=args.max_kv_tokens,
                          batch_slot_tokens=args.batch_slot_tokens, max_sessions_per_key=args.max_sessions_per_key,
                          session_max_age_s=args.session_max_age, max_body_bytes=args.max_body_bytes)
    if limits.max_sessions * limits.batch_slot_tokens > limits.max_kv_tokens:
        print(f"costeer: {limits.max_sessions} slots of {limits.batch_slot_tokens} tokens exceed --max-kv-tokens "
              f"{limits.max_kv_tokens}: sessions will not be batched", file=sys.stderr)
    print(f"costeer: serving {model.name} on http://{args.host}:{args.port} "
          f"({'API key required' if keys else 'no API key'}); schema at /openapi.json", file=sys.stderr)
    serve(model, args.host, args.port, keys, limits, args.max_batch, insecure=args.insecure)
    return 0


def _env_keys() -> list[str]:
    """$COSTEER_API_KEY's comma-separated keys. Set but holding no key (",", a stray comma)
    is an error, not an open server: the variable says a key was meant."""
    text = os.environ.get("COSTEER_API_KEY")
    if text is None:
        return []
    keys = [k.strip() for k in text.split(",")]
    if not all(keys):
        raise UserError("$COSTEER_API_KEY is set but holds an empty key (keys are separated by commas); unset it "
                        "to serve with no key")
    return keys


def cmd_demo(args: argparse.Namespace) -> int:
    import dataclasses

    from .api import CoSteer, GenerationRequest
    from .prompts import load_context

    files = args.context or [EXAMPLE_DIR / "profile.md"]
    context = load_context(files)
    print(f"Request (public, sent to the cloud): {args.prompt}")
    print(f"Private context (stays on the device): {', '.join(str(Path(f).name) for f in files)}\n")
    cs = CoSteer(args.llm, args.slm, backend=args.backend, context_cache=not args.no_context_cache)
    request = GenerationRequest(max_new_tokens=args.max_new_tokens)
    for method, title in (("llm", "Cloud model alone"), ("costeer", "CoSteer (cloud model steered by the device)")):
        print(f"=== {title} [--method {method}]")
        g = cs.generate(args.prompt, context, request=dataclasses.replace(request, method=method),
                        on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()))
        print(f"\n[{g.new_tokens} tokens, {g.tokens_per_second:.1f} tok/s]\n")
    return 0


def cmd_proxy(args: argparse.Namespace) -> int:
    import dataclasses

    from .prompts import PAPER_SYSTEM_PROMPT, join_context, load_context_sources
    from .transport.guard import is_loopback
    from .proxy.access import MethodAllowList, ProxyAccess, proxy_key
    from .proxy.app import serve_proxy
    from .proxy.schema import ProxyDefaults

    # who may ask, checked before anything is read or loaded
    if args.no_key and args.api_key:
        raise UserError("--api-key and --no-key contradict each other")
    if args.no_key and not is_loopback(args.host):
        raise UserError(f"--no-key is allowed only with a loopback --host (127.0.0.1, ::1, localhost), not "
                        f"{args.host}: anyone who reaches the port could read answers steered by the private context")
    given = None if args.no_key else args.api_key or os.environ.get("COSTEER_PROXY_API_KEY") or None
    access = ProxyAccess(api_key=given, host=args.host, port=args.port, allow_hosts=tuple(args.allow_host),
                         allow_origins=tuple(args.allow_origin), max_body_bytes=args.max_body_bytes,
                         methods=MethodAllowList.parse(args.methods), max_queue=args.max_queue)
    context_sources = load_context_sources(args.context, args.context_text, text_from_command_line=True)
    context = join_context(context_sources)
    defaults = ProxyDefaults(max_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                             top_k=args.top_k, seed=args.seed, stop=tuple(args.stop), params=_steering(args),
                             fusion=args.fusion, max_context_tokens=args.max_context_tokens,
                             system_prompt=args.system_prompt if args.system_prompt is not None else PAPER_SYSTEM_PROMPT)
    if args.no_key:
        print("costeer: warning: --no-key: any program or user on this machine can ask the proxy, and its answers "
              "are steered by the private context", file=sys.stderr)
    elif given is None:  # the key file's path only: the key itself is never printed
        key, path, created = proxy_key()
        access = dataclasses.replace(access, api_key=key)
        print(f"costeer: clients must send the key in {path} ({'made now, ' if created else ''}readable by you "
              "alone) as their API key (Authorization: Bearer KEY)", file=sys.stderr)
    else:
        print(f"costeer: clients must send the key given by {'--api-key' if args.api_key else '$COSTEER_PROXY_API_KEY'} "
              "as their API key (Authorization: Bearer KEY)", file=sys.stderr)
    if args.host in ("0.0.0.0", "::") and not args.allow_host:
        print("costeer: note: requests must name this machine localhost, 127.0.0.1 or ::1 in their Host header: add "
              "the names others use for it with --allow-host", file=sys.stderr)
    cs = _costeer(args)
    try:
        cs.model("slm"), cs.model("llm")  # load (or connect) now: the first request should not wait for it
        sources = len(args.context) + bool(args.context_text)
        print(f"costeer: OpenAI-compatible endpoint on http://{args.host}:{args.port}/v1 (cloud: "
              f"{cs.cloud_url or 'embedded'}; private context: {len(context):,} characters from {sources} "
              f"source{'s' * (sources != 1)}); the model field picks the method, see /v1/models", file=sys.stderr)
        serve_proxy(cs, context_sources, defaults, access)  # by source: the chat page lists their names and sizes
    finally:
        cs.close()
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .default_models import DEFAULT_LLM, DEFAULT_SLM, ensure_model

    unknown = [name for name in args.names if name not in KNOWN_MODELS]
    if unknown:
        raise UserError(f"unknown model name {unknown[0]!r}: choose one of {MODEL_NAMES}")
    for role, model in (("llm", DEFAULT_LLM), ("slm", DEFAULT_SLM)):
        print(f"{role}\t{model.key}\t{ensure_model(model, quiet=args.quiet)}")
    for name in args.names:
        print(f"-\t{name}\t{ensure_model(KNOWN_MODELS[name], quiet=args.quiet)}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .context_cache import ContextCache

    cache = ContextCache()
    if args.action == "clear":
        freed = cache.clear()
        print(f"deleted {freed.entries} entries, {_mib(freed.bytes)}, from {freed.folder} (the models are kept)")
    else:
        info = cache.info()
        print(f"folder\t{info.folder}\nentries\t{info.entries}\nbytes\t{info.bytes} ({_mib(info.bytes)}, "
              f"limit {_mib(cache.max_bytes)})")
    return 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation.runner import EvalSettings, run_eval

    settings = EvalSettings(
        dataset=args.dataset, out=Path(args.out), methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        limit=args.limit, max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature,
        top_p=args.top_p, top_k=args.top_k, params=_steering(args), fusion=args.fusion, stop=args.stop,
        llm=args.llm, slm=args.slm, backend=args.backend, context_cache=not args.no_context_cache,
        figures=not args.no_figures,
    )
    print(f"report: {run_eval(settings)}")
    return 0


def _bench_data(given: str | None) -> Path:
    """--data, else $COSTEER_DATA/cogenesis: no default outside the repository."""
    if given:
        return Path(given)
    if os.environ.get("COSTEER_DATA"):
        return Path(os.environ["COSTEER_DATA"]) / "cogenesis"
    raise UserError("costeer bench needs --data DIR, a CoGenesis folder (or $COSTEER_DATA, a folder holding cogenesis/)")


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.speed import BenchConfig, format_table, run_bench

    try:
        rtts = tuple(float(x) for x in args.rtt_ms.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--rtt-ms takes milliseconds separated by commas, got {args.rtt_ms!r}") from None
    if not rtts or any(not math.isfinite(r) or r < 0 for r in rtts):
        raise UserError(f"--rtt-ms takes finite milliseconds >= 0, got {args.rtt_ms!r}")
    config = BenchConfig(rounds=args.rounds, prompts=args.prompts, max_new_tokens=max(2, args.max_new_tokens),
                         rtts_ms=rtts, lookahead=args.lookahead, speculate=args.speculate, cloud_top_k=args.cloud_top_k,
                         data=_bench_data(args.data))
    result = run_bench(config)
    print(json.dumps(result) if args.json else format_table(result))
    return 0


class _StderrNow(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (tests swap it), as Python's
    last-resort handler does."""

    def __init__(self) -> None:
        logging.Handler.__init__(self, logging.INFO)
        self.setFormatter(logging.Formatter("%(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


@contextmanager
def _library_messages_on_stderr() -> Iterator[None]:
    """The library logs its notices to the "costeer" logger, each message whole ("costeer: ...");
    the command shows INFO and above on stderr, one line each, the text the library once printed."""
    logger = logging.getLogger("costeer")
    handler = _StderrNow()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(logging.INFO, logger.getEffectiveLevel()))  # lower if a caller asked for more
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: Sequence[str] | None = None) -> int:
    with _library_messages_on_stderr():
        try:
            args = build_parser().parse_args(argv)
            return {"generate": cmd_generate, "score": cmd_score, "demo": cmd_demo, "models": cmd_models, "cache": cmd_cache,
                    "serve": cmd_serve, "proxy": cmd_proxy, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
        except UserError as exc:
            print(f"costeer: error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("costeer: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
