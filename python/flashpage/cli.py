"""The ``flashpage`` command.

  flashpage serve [MODEL] [--host 127.0.0.1] [--port 8000] [--grpc-port 50051] [engine options]
      the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
      /health, /metrics) and the gRPC API (flashpage.v1) over one engine
  flashpage generate [MODEL] PROMPT [--max-tokens 64] [--temperature 0] [--chat]
      one completion, printed as it is generated
  flashpage quantize SRC DST [--format w4a16|w8a8-int8|fp8] [--group-size 128] [--asymmetric]
      a checkpoint in flashpage's quantized format (from a float, GPTQ or AWQ checkpoint)
  flashpage info                 version, CPU ISA in use, CUDA backend status
  flashpage bench scheduler      the scheduler benchmark shipped with the wheel
  flashpage bench serve [--base-url URL] [--request-rate 1,2,inf] [--plot out.png] ...
      a serving load generator for any OpenAI-compatible server (flashpage, vLLM)

MODEL is a local Hugging Face model directory or a .gguf file (also --model MODEL); without
one, the tiny story model that ships in the wheel (stories260K) runs.
Errors print one line; --debug (or FLASHPAGE_DEBUG=1) prints the traceback too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

def bench_binary(name: str) -> Path:
    # Every directory of the package: an editable install keeps the built binaries apart from
    # the sources.
    import flashpage

    paths = [Path(p) / "bin" / name for p in flashpage.__path__]
    for path in paths:
        if path.is_file():
            return path
    raise SystemExit(f"flashpage: benchmark binary {paths[0]} is missing (is the wheel complete?)")


def cmd_info(_: argparse.Namespace) -> int:
    from flashpage.platform import platform_info

    print(json.dumps(platform_info(), indent=2))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "serve":  # Python, not a shipped binary
        from flashpage.bench.serve import main as bench_serve

        return bench_serve(args.rest)
    binary = bench_binary(f"bench_{args.what}")
    return subprocess.call([os.fspath(binary), *args.rest])


def cmd_serve(args: argparse.Namespace) -> int:
    from flashpage.serving.server import serve

    return serve(args)


def cmd_generate(args: argparse.Namespace) -> int:
    from flashpage.llm import LLM
    from flashpage.sampling_params import SamplingParams
    from flashpage.serving.server import build_llm

    if len(args.words) > 2:
        raise ValueError(f"flashpage generate takes [MODEL] PROMPT; got {len(args.words)} arguments (quote the prompt)")
    args.model, args.prompt = (None, *args.words) if len(args.words) == 1 else args.words
    args.verbose = False
    llm: LLM = build_llm(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.seed_sampling)
    prompt = args.prompt
    if args.chat:
        if llm.tokenizer is None:
            raise SystemExit("flashpage generate --chat: the model has no tokenizer")
        prompt = {"prompt_token_ids": llm.tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=True)}
    engine = llm.llm_engine
    engine.add_request("cli", prompt, params)
    shown = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text = out.outputs[0].text
            print(text[shown:], end="\n" if out.finished else "", flush=True)
            shown = len(text)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from flashpage.convert import quantize_checkpoint

    qconfig = quantize_checkpoint(args.src, args.dst, args.format, args.group_size, not args.asymmetric)
    print(json.dumps(qconfig))
    return 0


# What a person got wrong (a path, a flag's value, a model we do not run): the message names it,
# a traceback would only bury it. Anything else is our bug: the message asks for --debug.
_USER_ERRORS = (ValueError, TypeError, KeyError, OSError, RuntimeError)


def _debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FLASHPAGE_DEBUG", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [a for a in argv if a != "--debug"]
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - the top of the program: one readable line
        if debug:
            raise
        command = next((a for a in argv if not a.startswith("-")), "")
        message = str(e) or type(e).__name__
        if isinstance(e, KeyError):
            message = str(e.args[0]) if e.args else message
        hint = "" if isinstance(e, _USER_ERRORS) else f" ({type(e).__name__}; --debug shows the traceback)"
        print(f"flashpage {command}: error: {message}{hint}".replace("  ", " "), file=sys.stderr)
        return 1


def _run(argv: list[str]) -> int:
    from flashpage.serving.server import add_engine_args, add_model_args, add_serve_args

    parser = argparse.ArgumentParser(prog="flashpage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true", help="print the traceback of an error, not just its message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,quantize,info,bench}")
    serve = sub.add_parser("serve", help="serve a model over HTTP (OpenAI API) and gRPC",
                           description="Serve a model: OpenAI-compatible HTTP on --port, gRPC on --grpc-port.")
    add_serve_args(serve)
    serve.set_defaults(func=cmd_serve)
    gen = sub.add_parser("generate", help="generate one completion and print it")
    gen.add_argument("words", nargs="+", metavar="[MODEL] PROMPT",
                     help="the prompt, after the model (a Hugging Face directory or a .gguf file; default: the "
                          "embedded stories260K)")
    add_model_args(gen, positional=False)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed-sampling", type=int, default=None, help="seed of this request's sampling")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)
    quant = sub.add_parser("quantize", help="write a checkpoint in flashpage's quantized format",
                           description="Quantize a float checkpoint round-to-nearest, or convert a GPTQ/AWQ one.")
    quant.add_argument("src", help="a Hugging Face model directory (float, GPTQ or AWQ)")
    quant.add_argument("dst", help="the directory to write")
    quant.add_argument("--format", default="w4a16", choices=["w4a16", "w8a8-int8", "fp8"])
    quant.add_argument("--group-size", type=int, default=None,
                       help="w4a16: input features per scale (default: 128, 64 or 32, the largest dividing every "
                            "Linear's input size)")
    quant.add_argument("--asymmetric", action="store_true", help="w4a16: zero points per group")
    quant.set_defaults(func=cmd_quantize)
    sub.add_parser("info", help="version, CPU ISA in use, CUDA backend status").set_defaults(func=cmd_info)
    bench = sub.add_parser("bench", help="run a benchmark: the scheduler binary, or the serving load generator")
    bench.add_argument("what", choices=["scheduler", "serve"])
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark (--help for its own)")
    bench.set_defaults(func=cmd_bench)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
