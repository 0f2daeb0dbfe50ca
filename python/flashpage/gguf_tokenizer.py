"""The tokenizer a GGUF file carries (tokenizer.ggml.*), as a `tokenizers` Tokenizer: the
byte-level BPE kind ("gpt2": vocabulary, merges and the pre-tokenizer named by
tokenizer.ggml.pre) and the sentencepiece kind ("llama": vocabulary with scores, merges derived
from the scores as transformers' converter does, byte fallback). With the chat template
(tokenizer.chat_template) and the special tokens, so that text prompts and chat work from the
.gguf alone."""

from __future__ import annotations

from typing import Any

from flashpage import _core

# Pre-tokenizer regexes of the byte-level BPE vocabularies llama.cpp names (tokenizer.ggml.pre).
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
           r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
          r"\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2_PRE = {"default", "gpt2", "gpt-2"}
_SMOLLM_PRE = {"smollm"}
_LLAMA3_PRE = {"llama-bpe", "llama3", "smaug-bpe", "dbrx"}
_QWEN2_PRE = {"qwen2", "deepseek-r1-qwen"}

CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _byte_level_pre(pre: str, where: str):
    from tokenizers import Regex, pre_tokenizers as pt
    if pre in _GPT2_PRE:
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _SMOLLM_PRE:
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    for names, regex in ((_LLAMA3_PRE, _LLAMA3), (_QWEN2_PRE, _QWEN2)):
        if pre in names:
            return pt.Sequence([pt.Split(Regex(regex), behavior="isolated", invert=False),
                                pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = sorted(_GPT2_PRE | _SMOLLM_PRE | _LLAMA3_PRE | _QWEN2_PRE)
    raise ValueError(f"{where}: tokenizer.ggml.pre {pre!r} is not supported ({', '.join(known)})")


def _bpe(tokens: list[str], merges: list[str], pre: str, where: str):
    from tokenizers import Tokenizer, decoders, models
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for k, m in enumerate(merges):
        left, sep, right = m.partition(" ")
        if not sep:
            raise ValueError(f"{where}: tokenizer.ggml.merges[{k}] {m!r} is not two tokens")
        pairs.append((left, right))
    tok = Tokenizer(models.BPE(vocab, pairs, ignore_merges=pre in _LLAMA3_PRE))
    tok.pre_tokenizer = _byte_level_pre(pre, where)
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm(tokens: list[str], scores: list[float], add_space_prefix: bool, unk: int | None):
    """A sentencepiece BPE vocabulary: merges are the splits of each piece into two pieces of the
    vocabulary, in order of the merged piece's score (as transformers converts it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers as pt
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda x: x[2], reverse=True)
    tok = Tokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=tokens[unk] if unk is not None else None,
                               fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pt.Metaspace(replacement="▁", prepend_scheme="first" if add_space_prefix else "never",
                                     split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _id(meta: dict, key: str, n: int, where: str) -> int | None:
    v = meta.get(key)
    if v is None:
        return None
    if not isinstance(v, int) or not 0 <= v < n:
        raise ValueError(f"{where}: {key} = {v!r} is not a token id of the {n}-token vocabulary")
    return v


def load(path: str) -> tuple[Any, dict, list[int], str | None]:
    """(tokenizers.Tokenizer, tokenizer_config-like dict, eos ids, chat template) of a GGUF file."""
    from tokenizers import AddedToken, processors
    meta = _core.GgufFile(path).metadata("tokenizer.")
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: no tokenizer (tokenizer.ggml.tokens is missing or not a list of strings)")
    n = len(tokens)
    types = meta.get("tokenizer.ggml.token_type") or [1] * n
    if len(types) != n:
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {n} tokens")
    unk = _id(meta, "tokenizer.ggml.unknown_token_id", n, path)
    if kind == "gpt2":
        merges = meta.get("tokenizer.ggml.merges")
        if not isinstance(merges, list):
            raise ValueError(f"{path}: a gpt2 tokenizer without tokenizer.ggml.merges")
        tok = _bpe(tokens, merges, str(meta.get("tokenizer.ggml.pre", "default")), path)
        add_bos_default = False
    elif kind == "llama":
        scores = meta.get("tokenizer.ggml.scores")
        if not isinstance(scores, list) or len(scores) != n:
            raise ValueError(f"{path}: a llama (sentencepiece) tokenizer needs tokenizer.ggml.scores for every token")
        tok = _spm(tokens, [float(s) for s in scores], bool(meta.get("tokenizer.ggml.add_space_prefix", True)), unk)
        add_bos_default = True
    else:
        raise ValueError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (gpt2, llama)")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED])
    bos = _id(meta, "tokenizer.ggml.bos_token_id", n, path)
    eos = _id(meta, "tokenizer.ggml.eos_token_id", n, path)
    eot = _id(meta, "tokenizer.ggml.eot_token_id", n, path)
    pad = _id(meta, "tokenizer.ggml.padding_token_id", n, path)
    if bos is not None and meta.get("tokenizer.ggml.add_bos_token", add_bos_default):
        tok.post_processor = processors.TemplateProcessing(single=f"{tokens[bos]}:0 $A:0",
                                                           special_tokens=[(tokens[bos], bos)])
    config = {"bos_token": tokens[bos] if bos is not None else None,
              "eos_token": tokens[eos] if eos is not None else None,
              "pad_token": tokens[pad] if pad is not None else None,
              "unk_token": tokens[unk] if unk is not None else None}
    eos_ids = [i for i in dict.fromkeys([eos, eot]) if i is not None]
    template = meta.get("tokenizer.chat_template")
    return tok, config, eos_ids, template if isinstance(template, str) else None
