"""A Hugging Face tokenizer directory: tokenizer.json through the `tokenizers` package, with
tokenizer_config.json (bos/eos, special tokens, the chat template, add_bos_token),
chat_template.jinja (transformers' newer layout) and generation_config.json (eos ids); or the
tokenizer a GGUF file carries (gguf_tokenizer.py)."""

from __future__ import annotations

import json
import os
from typing import Any


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except RecursionError:  # json's recursive decoder on deeply nested arrays or objects
        raise ValueError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


_INT32_MAX = 2**31 - 1  # the core keeps token ids as int32


def _ids(value: Any, where: str) -> list[int]:
    """Token ids as generation_config.json writes them: an id, a list of ids, or null."""
    if value is None:
        return []
    ids = value if isinstance(value, list) else [value]
    for v in ids:
        if type(v) is not int or not 0 <= v <= _INT32_MAX:
            raise ValueError(f"{where}: {v!r} is not a token id (an integer in [0, {_INT32_MAX}])")
    return ids


def _bound_word_cache(tok) -> None:
    """A BPE model caches each pre-tokenized word (10,000 entries). Where nothing splits the
    text into words (sentencepiece-style Metaspace without split), each whole prompt of up to
    256 characters is a "word": a server's unique prompts filled that cache with ~4 KB
    entries that never hit (40 MB of resident memory). Keep a few for repeated prompts."""
    pre = tok.pre_tokenizer
    whole_text = pre is None or (type(pre).__name__ == "Metaspace" and not getattr(pre, "split", True))
    resize = getattr(tok.model, "_resize_cache", None)
    if whole_text and resize is not None:
        resize(256)


class Tokenizer:
    """Encodes and decodes like the model's own tokenizer; knows its special tokens, chat
    template and end-of-sequence ids. ``path`` is a model or tokenizer directory, a
    tokenizer.json file or a .gguf file."""

    def __init__(self, path: str) -> None:
        if path.endswith(".gguf"):
            from flashpage import gguf_tokenizer
            self._tok, config, eos, template = gguf_tokenizer.load(path)
        else:
            self._tok, config, eos, template = self._from_files(path)
        _bound_word_cache(self._tok)
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.unk_token = _token_text(config.get("unk_token"))
        self.bos_token_id = self.token_to_id(self.bos_token)
        self.eos_token_id = self.token_to_id(self.eos_token)
        if not eos and self.eos_token_id is not None:
            eos = [self.eos_token_id]
        self.eos_token_ids: list[int] = eos
        self.chat_template: str | None = template

        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            if getattr(self, name):
                special.add(getattr(self, name))
        self.all_special_tokens = sorted(special)
        self.all_special_ids = sorted(i for i in (self.token_to_id(t) for t in special) if i is not None)
        self.all_special_id_set = frozenset(self.all_special_ids)

        # Byte-fallback tokens (<0x00>..<0xFF>, sentencepiece vocabularies): the decoder turns a
        # run of them into text only as a whole (one U+FFFD per byte if the run is not valid
        # UTF-8), so incremental decoding holds text back while a run may go on.
        byte_ids = (self._tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
        self.byte_fallback_ids = frozenset(i for i in byte_ids if i is not None)

    @staticmethod
    def _from_files(path: str) -> tuple[Any, dict, list[int], str | None]:
        """tokenizer.json with tokenizer_config.json, generation_config.json (end-of-sequence ids:
        chat models list several) and chat_template.jinja beside it."""
        from tokenizers import Tokenizer as HFTokenizer

        directory = os.path.dirname(path) if path.endswith(".json") else path
        file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no tokenizer.json (pass skip_tokenizer_init=True to use token ids)")
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:  # the Rust parser's message names the problem
            raise ValueError(f"{file}: cannot load the tokenizer ({e})") from e
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        generation = _read_json(os.path.join(directory, "generation_config.json"))
        eos = _ids(generation.get("eos_token_id"),
                   f"{os.path.join(directory, 'generation_config.json')}: eos_token_id")
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja):
            try:
                with open(jinja, encoding="utf-8") as f:
                    template = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"{jinja}: cannot read the chat template ({e})") from e
        return tok, config, eos, template if isinstance(template, str) else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def to_json(self) -> str:
        """The tokenizer as tokenizer.json text (what grammar engines build their vocabulary from)."""
        return self._tok.to_str()

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], *, chat_template: str | None = None,
                            add_generation_prompt: bool = True, tokenize: bool = False,
                            **kwargs: Any) -> str | list[int]:
        """Renders messages with the model's chat template (or the one given), as
        transformers does; tokenize=True returns the ids (special tokens come from the
        template, none are added)."""
        from flashpage.chat_template import render

        template = chat_template or self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or "
                             "chat_template.jinja); pass chat_template=")
        text = render(template, messages, add_generation_prompt=add_generation_prompt,
                      bos_token=self.bos_token or "", eos_token=self.eos_token or "", **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text
