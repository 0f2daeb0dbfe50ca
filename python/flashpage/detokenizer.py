"""Incremental detokenization and stop strings.

Text grows one token at a time, exactly as the tokenizer decodes the whole: each step decodes a
short window of ids twice, from `prefix` (a few tokens back, so decoders that strip or merge at
the start of a sequence see context) up to `read` (the ids already turned into text) and up to
the end, and emits the difference once it no longer ends in an incomplete UTF-8 character
(U+FFFD: a multi-byte character split across byte-level tokens) and does not end in a
byte-fallback token (whose run the decoder turns into text only as a whole: a later byte can
turn the run's earlier, valid bytes into U+FFFDs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flashpage.tokenizer import Tokenizer

_CONTEXT = 5  # prompt tokens decoded as context before the first output token (as vLLM)
_REPLACEMENT = "\ufffd"


@dataclass
class IncrementalDetokenizer:
    tokenizer: Tokenizer
    skip_special_tokens: bool = True
    ids: list[int] = field(default_factory=list)
    prefix: int = 0
    read: int = 0
    text: str = ""  # the output text so far

    @classmethod
    def after_prompt(cls, tokenizer: Tokenizer, prompt_ids: Sequence[int],
                     skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        """Output text continues the prompt: its last tokens are the decoding context."""
        ids = list(prompt_ids[-_CONTEXT:])
        return cls(tokenizer, skip_special_tokens, ids, 0, len(ids))

    def add(self, token: int) -> str:
        """Appends one token id; returns the text it completes (maybe "")."""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: whatever is left, an incomplete character included (as decode gives it)."""
        return self._advance(final=True)

    def _ends_in_byte_run(self) -> bool:
        """The last token the decoder sees is a byte-fallback token (skipped special tokens
        vanish before decoding, so bytes on both sides of one form one run)."""
        tok = self.tokenizer
        for i in reversed(self.ids):
            if not (self.skip_special_tokens and i in tok.all_special_id_set):
                return i in tok.byte_fallback_ids
        return False

    def _advance(self, final: bool) -> str:
        if not final and self.tokenizer.byte_fallback_ids and self._ends_in_byte_run():
            return ""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read], self.skip_special_tokens)
        now = decode(self.ids[self.prefix:], self.skip_special_tokens)
        if len(now) <= len(before) or (now.endswith(_REPLACEMENT) and not final):
            return ""
        if not now.startswith(before):  # the window's decode changed its start: take the common part
            common = 0
            while common < min(len(before), len(now)) and before[common] == now[common]:
                common += 1
            delta = now[common:]
        else:
            delta = now[len(before):]
        # The next window starts where this one's text ended; ids before it are done with.
        del self.ids[:self.read]
        self.prefix, self.read = 0, len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, new_chars: int, stop: Sequence[str], include: bool) -> tuple[str, int] | None:
    """The earliest stop string in text that overlaps its last new_chars characters (a stop
    string may straddle token boundaries): (the stop string, where the text ends), or None."""
    best: tuple[str, int] | None = None
    for s in stop:
        start = max(0, len(text) - new_chars - len(s) + 1)
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[1]):
            best = (s, i)
    if best is None:
        return None
    s, i = best
    return s, i + len(s) if include else i
