"""A Hugging Face tokenizer.json through the `tokenizers` package."""

from __future__ import annotations

import os


class Tokenizer:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json (pass skip_tokenizer_init=True to use token ids)")
        self._tok = HFTokenizer.from_file(file)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
