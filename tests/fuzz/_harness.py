"""What every fuzz target here shares: the seed corpus (built at run time from the real files in
../shared, beside this checkout, plus small built-in seeds), a libFuzzer dictionary, and the
command line.

    python tests/fuzz/fuzz_<name>.py [libFuzzer flags] [CORPUS_DIR ...]

With no corpus directory a temporary one is made; the seeds are written into the first corpus
directory (files named seed-*, never overwritten). A file instead of a directory replays that
input (a crash reproducer). Any libFuzzer flag works (-runs=, -max_total_time=, -jobs=, ...);
-dict, -timeout and -rss_limit_mb get defaults unless given.

Only Python code is coverage-instrumented (atheris.instrument_imports): the C++ parsers reached
through flashpage._core are fuzzed as a black box, their coverage not fed back (that needs a
clang build with -fsanitize=fuzzer; the ASan + UBSan build of the C++ tests, tests/test_cpp.py,
mutates the same parsers under the sanitizers).

This module must not import flashpage: the targets import it inside instrument_imports()."""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared"

# Values that break parsers and validators: type confusion, the edges of int32/int64/float.
EDGE_VALUES: list = [
    None, True, False, 0, 1, -1, 2, 7, 16, 64, 100, 255, 256, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53 + 1,
    2**63 - 1, 2**63, -(2**63), 2**64, 10**30, 0.0, -0.0, 0.5, 1.5, -1.5, 1e-300, 5e-324, 1e308,
    float("nan"), float("inf"), float("-inf"), "", "a", "0", "NaN", "\x00", "\ud800", "\u202e", "é" * 3,
    "x" * 300, [], [0], [1, 2], [-1], [2**40], [None], ["a"], [[1]], {}, {"a": 1}, {"content": "x"},
    {"type": "text", "text": "hi"},
]


_bucket = None


def scratch_dir(prefix: str) -> Path:
    """A directory for the files a target writes per input, under $FLASHPAGE_FUZZ_TMP when set
    (the pytest runs point it at their tmp_path), else the system's temporary directory."""
    return Path(tempfile.mkdtemp(prefix=f"flashpage-fuzz-{prefix}-", dir=os.environ.get("FLASHPAGE_FUZZ_TMP")))


def feedback(label: str) -> None:
    """Coverage for code atheris cannot see: the C++ parsers report what they did only through
    their result or error message, so each kind of outcome (the message with its numbers and
    quoted values blanked) takes its own branch of an instrumented function, one of 1024. The
    fuzzer then keeps inputs that reach a new refusal, i.e. got further into the validation."""
    global _bucket
    if _bucket is None:
        import atheris

        src = "def bucket(h):\n" + "".join(f"    {'if' if i == 0 else 'elif'} h == {i}:\n        return {i}\n"
                                           for i in range(1024))
        ns: dict = {}
        exec(compile(src, "<feedback>", "exec"), ns)
        _bucket = atheris.instrument_func(ns["bucket"])
    shape = re.sub(r"\d+", "#", re.sub(r"\"[^\"]*\"|'[^']*'", "Q", label))[:200]
    _bucket(zlib.crc32(shape.encode("utf-8", "replace")) & 1023)


def shared_files(pattern: str) -> list[Path]:
    """Files under ../shared matching a glob (none when ../shared is absent)."""
    return sorted(SHARED.glob(pattern)) if SHARED.is_dir() else []


def json_keys(objs: Iterable) -> set[str]:
    """Every key of nested JSON values: dictionary words for the mutator."""
    out: set[str] = set()
    stack = list(objs)
    while stack:
        x = stack.pop()
        if isinstance(x, dict):
            out.update(k for k in x if isinstance(k, str) and len(k) < 64)
            stack.extend(x.values())
        elif isinstance(x, list):
            stack.extend(x)
    return out


JSON_TOKENS = [b'"', b"{", b"}", b"[", b"]", b",", b":", b"null", b"true", b"false", b"NaN", b"Infinity",
               b"-Infinity", b"-1", b"0", b"1e308", b"1e999", b"5e-324", b"2147483648", b"9223372036854775808",
               b"-9223372036854775809", b"\\u0000", b"\\ud800", b"\\udc00", b"\\u00e9", b"\xff", b"\xc3\xa9"]


def _dict_entry(token: bytes) -> str:
    return '"' + "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02X}" for b in token) + '"'


def main(test_one_input: Callable[[bytes], None], seeds: dict[str, bytes],
         dictionary: Iterable[bytes] = (), argv: list[str] | None = None) -> None:
    import atheris

    args = list(sys.argv if argv is None else argv)
    flags = [a for a in args[1:] if a.startswith("-")]
    paths = [a for a in args[1:] if not a.startswith("-")]
    if not paths:
        corpus = str(scratch_dir("corpus"))
        print(f"corpus: {corpus}", file=sys.stderr)
        args.append(corpus)
        paths = [corpus]
    if os.path.isdir(paths[0]):
        for name, data in seeds.items():
            p = Path(paths[0]) / f"seed-{name}"
            if not p.exists():
                p.write_bytes(data)
        if not any(f.startswith("-dict=") for f in flags):
            words = sorted(set(JSON_TOKENS) | set(dictionary))
            dict_file = scratch_dir("dict") / "words.dict"
            dict_file.write_text("".join(_dict_entry(w) + "\n" for w in words if 0 < len(w) <= 64))
            args.insert(1, f"-dict={dict_file}")
    defaults = {"-timeout=": "-timeout=20", "-rss_limit_mb=": "-rss_limit_mb=4096"}
    for prefix, flag in defaults.items():
        if not any(f.startswith(prefix) for f in flags):
            args.insert(1, flag)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


INT32_MAX = 2**31 - 1


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_sampling_params(p, limits) -> None:
    """What an API accepted must fit the engine and the C++ scheduler (int32 ids and counts,
    finite floats, torch seeds) and the server's RequestLimits."""
    assert type(p.n) is int and 1 <= p.n <= limits.max_n, p.n
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        assert _finite(getattr(p, name)), (name, getattr(p, name))
    assert type(p.top_k) is int and -1 <= p.top_k <= INT32_MAX, p.top_k
    assert p.max_tokens is None or (type(p.max_tokens) is int and 1 <= p.max_tokens <= INT32_MAX), p.max_tokens
    assert type(p.min_tokens) is int and 0 <= p.min_tokens <= INT32_MAX, p.min_tokens
    assert p.logprobs is None or (type(p.logprobs) is int and 0 <= p.logprobs <= limits.max_logprobs), p.logprobs
    assert p.prompt_logprobs is None or (type(p.prompt_logprobs) is int
                                         and 0 <= p.prompt_logprobs <= limits.max_prompt_logprobs), p.prompt_logprobs
    assert all(isinstance(s, str) and s for s in p.stop), p.stop
    assert len(p.stop) <= limits.max_stop and all(len(s) <= limits.max_stop_chars for s in p.stop)
    assert all(type(t) is int and 0 <= t <= INT32_MAX for t in p.stop_token_ids), p.stop_token_ids
    for t, b in (getattr(p, "logit_bias", None) or {}).items():
        assert type(t) is int and 0 <= t <= INT32_MAX and _finite(b), (t, b)
    if p.seed is not None:  # torch.Generator().manual_seed(seed + index) for each of the n sequences
        assert type(p.seed) is int and -(2**63) <= p.seed and p.seed + p.n - 1 < 2**64, p.seed


def dumps(obj) -> bytes:
    """JSON as Python writes it (NaN and Infinity included, as in real config files)."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
