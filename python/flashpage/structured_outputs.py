"""Structured outputs: generation constrained to a JSON schema, a regex, a list of choices or a
grammar (vLLM's `StructuredOutputsParams`), enforced by masking each step's logits.

The grammar engine is llguidance (PyPI, a Rust wheel with no dependencies): it builds token masks
lazily from a lexer and an Earley parser, so a new JSON schema costs about a millisecond to
"compile" and a mask a few tens of microseconds, where xgrammar precompiles per schema (the
stalls users of vLLM reported) and pulls torch-version-bound wheels. Grammars compile on a
thread of their own, cached by their text; a request whose grammar fails ends alone with the
compiler's message."""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

_CACHE_SIZE = 256  # compiled grammars kept (templates: each request deep-copies one)
# Whitespace between JSON tokens, by default: a space, or a newline and indentation — what
# compact and pretty-printed JSON hold. Unbounded runs (JSON's own grammar) let small models
# emit newlines until max_tokens, the best-known failure of guided JSON.
JSON_WHITESPACE = r"\x20|\x0A[\x20\x09]{0,32}"


@dataclass
class StructuredOutputsParams:
    """One constraint, vLLM's fields: json (a schema, dict or text), regex, choice (the output is
    exactly one of these strings), grammar (Lark, or GBNF / llama.cpp's EBNF), or json_object
    (any JSON object). disable_any_whitespace: JSON without whitespace between tokens;
    whitespace_pattern: a regex for it (default JSON_WHITESPACE)."""
    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    whitespace_pattern: str | None = None
    # llguidance_grammar's result: a server builds it to check the constraint, the engine again
    # to find the compiled grammar (the same params object).
    _grammar: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                             + (f"got {', '.join(given)}" if given else "got none"))
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice or any(
                    not isinstance(c, str) or not c for c in self.choice):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise ValueError("structured_outputs.json must be a JSON schema (an object, or its text)")
        for name in ("regex", "grammar", "whitespace_pattern"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"structured_outputs.{name} must be a string")

    def llguidance_grammar(self) -> str:
        """The constraint as llguidance's top-level grammar text (also the cache key)."""
        if self._grammar is None:
            self._grammar = self._build_grammar()
        return self._grammar

    def _build_grammar(self) -> str:
        import llguidance as llg

        if self.json is not None or self.json_object:
            schema: Any = self.json if self.json is not None else {"type": "object"}
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json: not valid JSON ({e})") from None
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json: a JSON schema is an object")
            options: dict[str, Any] = {"whitespace_flexible": False} if self.disable_any_whitespace else {
                "whitespace_pattern": self.whitespace_pattern or JSON_WHITESPACE}
            return llg.LLMatcher.grammar_from_json_schema(schema, defaults=options)
        if self.regex is not None:
            return llg.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            alternatives = " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
            return llg.LLMatcher.grammar_from_lark(f"start: {alternatives}")
        grammar = self.grammar or ""
        if "::=" in grammar:  # GBNF (llama.cpp, xgrammar's EBNF): llguidance reads Lark
            from llguidance.gbnf_to_lark import gbnf_to_lark
            try:
                grammar = gbnf_to_lark(grammar)
            except Exception as e:  # noqa: BLE001 - its parser's own exception types
                raise ValueError(f"not a valid GBNF grammar ({e})") from None
        return llg.LLMatcher.grammar_from_lark(grammar)

    def _given(self) -> list[str]:
        return [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None] + (
            ["json_object"] if self.json_object else [])

    def describe(self) -> str:
        return f"structured_outputs.{self._given()[0]}"


GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before 0.10


class GrammarError(ValueError):
    """A constraint that does not compile: the message is the compiler's, naming the field."""


class StructuredOutputs:
    """Compiles constraints for one tokenizer (cached, off the caller's thread) and masks logits."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flashpage-grammar")
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, Future] = OrderedDict()
        # Building the tokenizer trie takes ~0.2 s on a 50k vocabulary: first on the pool too.
        self._tokenizer = self._pool.submit(self._build_tokenizer, tokenizer_json, vocab_size, eos_token_ids)
        self._mask_thread: ThreadPoolExecutor | None = None
        self._bitmask = np.zeros((0, (vocab_size + 31) // 32), dtype=np.int32)

    @staticmethod
    def _build_tokenizer(tokenizer_json: str, vocab_size: int, eos_token_ids: list[int]):
        import llguidance as llg

        return llg.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos_token_ids or None)

    def compile(self, params: StructuredOutputsParams) -> Future:
        """A future of a matcher template (deep-copy it per sequence); it raises GrammarError for
        a constraint that does not compile. Cached by the grammar's text."""
        try:
            grammar = params.llguidance_grammar()
        except ValueError as e:
            failed: Future = Future()
            failed.set_exception(GrammarError(f"{params.describe()}: {e}"))
            return failed
        with self._lock:
            fut = self._cache.get(grammar)
            if fut is not None:
                self._cache.move_to_end(grammar)
                return fut
            fut = self._pool.submit(self._compile, grammar, params.describe())
            self._cache[grammar] = fut
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return fut

    def _compile(self, grammar: str, what: str):
        import llguidance as llg

        matcher = llg.LLMatcher(self._tokenizer.result(), grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"{what}: {matcher.get_error().strip()}")
        return matcher

    def compute_masks(self, matchers: list) -> np.ndarray:
        """One row of allowed-token bits (int32 words, bit t of word t // 32) per matcher. One
        thread, in turn: run beside the model (submit_masks), llguidance's own thread pool took
        both cores from the model's threads and cost more than it saved (measured: 32 JSON rows,
        0.93x of free text against 0.985x)."""
        n = len(matchers)
        if self._bitmask.shape[0] < n:
            self._bitmask = np.zeros((max(n, 2 * self._bitmask.shape[0]), self._bitmask.shape[1]), dtype=np.int32)
        bits = self._bitmask[:n]
        for i, m in enumerate(matchers):
            m.unsafe_compute_mask_ptr(bits[i].ctypes.data, bits.shape[1] * 4)
        return bits

    def submit_masks(self, matchers: list) -> Future:
        """compute_masks on a thread of its own (one step's masks at a time)."""
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="flashpage-masks")
        return self._mask_thread.submit(self.compute_masks, matchers)

    @staticmethod
    def apply(logits: Any, rows: list[int], bits: np.ndarray) -> None:
        """Sets to -inf, in place, the logits of row rows[i] (a torch tensor's) whose bit in
        bits[i] is clear."""
        import torch

        V = logits.shape[1]
        banned = np.unpackbits((~bits).view(np.uint8), axis=1, bitorder="little")[:, :V]
        banned_t = torch.from_numpy(np.ascontiguousarray(banned)).view(torch.bool)
        if rows == list(range(len(rows))):  # the usual case: no gather and scatter
            logits[:len(rows)].masked_fill_(banned_t, float("-inf"))
        else:
            index = torch.tensor(rows)
            logits[index] = logits[index].masked_fill(banned_t, float("-inf"))
