"""What structured outputs cost: decode throughput of 32 concurrent requests with a JSON schema
against the same requests without one (same prompts, same number of tokens, same run, turns
alternated), and the time to first token added by compiling a new schema and by a cached one.

    python -m flashpage.bench.structured MODEL [--seqs 32] [--tokens 128] [--repeats 3] [--json]

The schema forces at least --tokens tokens (an object holding an array of at least 64 short
strings), so both sides generate exactly --tokens tokens a sequence (ignore_eos on the free side).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from flashpage import LLM, SamplingParams
from flashpage.structured_outputs import StructuredOutputsParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["title", "items"],
          "properties": {"title": {"type": "string"},
                         "items": {"type": "array", "minItems": 64, "items": {"type": "string"}}}}
# The same with length-bounded strings: llguidance cannot use its precomputed "slices" for a
# bounded string, so each mask inside one walks the vocabulary (~3x the cost of an open string).
BOUNDED = {"type": "object", "additionalProperties": False, "required": ["title", "items"],
           "properties": {"title": {"type": "string", "maxLength": 40},
                          "items": {"type": "array", "minItems": 64,
                                    "items": {"type": "string", "minLength": 2, "maxLength": 12}}}}
SCHEMAS = {"open_strings": SCHEMA, "bounded_strings": BOUNDED}


def _run(llm: LLM, prompts: list, params: SamplingParams) -> tuple[float, int]:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    return dt, sum(len(o.outputs[0].token_ids) for o in outs)


def _ttft(llm: LLM, prompt: dict, so: StructuredOutputsParams | None) -> float:
    """Seconds from add_request to the first token, alone on the engine."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=so)
    t0 = time.perf_counter()
    engine.add_request(f"ttft-{time.perf_counter_ns()}", prompt, params)
    while engine.has_unfinished_requests():
        engine.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--seqs", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args(argv)

    llm = LLM(args.model, verbose=False)
    tok = llm.get_tokenizer()
    questions = [f"List {args.tokens // 2} short words about topic number {i} as JSON." for i in range(args.seqs)]
    prompts = [{"prompt_token_ids": tok.apply_chat_template([{"role": "user", "content": q}], tokenize=True)}
               for q in questions]
    free = SamplingParams(temperature=0.7, seed=0, max_tokens=args.tokens, min_tokens=args.tokens, ignore_eos=True)
    sides = {"free": free} | {name: SamplingParams(temperature=0.7, seed=0, max_tokens=args.tokens,
                                                   structured_outputs=StructuredOutputsParams(json=schema))
                              for name, schema in SCHEMAS.items()}
    for params in sides.values():  # warm-up (and the tokenizer trie of the grammar engine)
        _run(llm, prompts[:2], params)
    rates: dict[str, list[float]] = {name: [] for name in sides}
    short = 0
    for _ in range(args.repeats):  # alternated: drift hits every side
        for name, params in sides.items():
            dt, n = _run(llm, prompts, params)
            rates[name].append(n / dt)
            if name != "free":
                short += args.seqs * args.tokens - n
    # TTFT: a schema never seen (compiled on the grammar thread), the same again (cached), none.
    ttft: dict[str, list[float]] = {"none": [], "new_schema": [], "cached_schema": []}
    for r in range(max(3, args.repeats)):
        fresh = dict(SCHEMA, title=f"run {r} {time.time_ns()}")  # a different text: a cache miss
        ttft["none"].append(_ttft(llm, prompts[0], None))
        ttft["new_schema"].append(_ttft(llm, prompts[0], StructuredOutputsParams(json=fresh)))
        ttft["cached_schema"].append(_ttft(llm, prompts[0], StructuredOutputsParams(json=fresh)))
    med = {k: statistics.median(v) for k, v in rates.items()}
    result = {"model": args.model, "seqs": args.seqs, "tokens": args.tokens, "repeats": args.repeats,
              "tokens_per_s": med, "vs_free": {k: med[k] / med["free"] for k in SCHEMAS},
              "constrained_tokens_short": short,
              "ttft_ms": {k: 1000 * statistics.median(v) for k, v in ttft.items()}}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.seqs} concurrent sequences x {args.tokens} tokens, median of {args.repeats}:")
        print(f"  free text                   {med['free']:8.1f} tok/s")
        for k in SCHEMAS:
            print(f"  JSON schema, {k:15s} {med[k]:8.1f} tok/s  ({med[k] / med['free']:.3f}x)")
        t = result["ttft_ms"]
        print(f"TTFT alone: no schema {t['none']:.1f} ms, new schema {t['new_schema']:.1f} ms, "
              f"cached schema {t['cached_schema']:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
