"""Fuzzes what flashpage.tokenizer.Tokenizer reads from a model directory besides the vocabulary:
tokenizer_config.json (special tokens as strings or AddedToken dicts, named chat templates) and
generation_config.json (eos ids), plus a small tokenizer.json itself (the `tokenizers` parser).

Contract: Tokenizer(dir) succeeds or raises ValueError (FileNotFoundError for a missing file);
a tokenizer that loads has int eos/bos/special ids the core can take (0 <= id < 2**31), a str
or None chat template, and encodes, decodes and renders its template (ChatTemplateError, a
ValueError, when the template refuses) without any other exception.

Inputs, chosen by the first byte: tokenizer_config.json, generation_config.json, both (split by
the rest of the input), tokenizer.json, or a seed tokenizer_config.json whose fields are replaced
with edge values.

    python tests/fuzz/fuzz_tokenizer.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage"]):
    from flashpage import chat_template as ct
    from flashpage.tokenizer import Tokenizer

DIR = _harness.scratch_dir("tokenizer")
INT32_MAX = 2**31 - 1
# Each input renders with a small budget (the point is the parser, not slow templates).
LIMITS = getattr(ct, "TemplateLimits", None)
RENDER_KW = {"limits": LIMITS(max_operations=20_000, max_seconds=2.0, max_output_chars=1 << 16)} if LIMITS else {}


def _tiny_tokenizer_json() -> bytes:
    from tokenizers import AddedToken, Tokenizer as HF, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "hello", "world", "<0x41>", "a", "b"])}
    tok = HF(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<s>", special=True), AddedToken("</s>", special=True),
                            AddedToken("<|im_start|>", special=True)])
    return tok.to_str().encode()


TINY = _tiny_tokenizer_json()
_real = _harness.shared_files("models/stories260K/tokenizer.json")
BASE_TOKENIZER = _real[0].read_bytes() if _real else TINY


def _config_seeds() -> list[dict]:
    out = [{"bos_token": "<s>", "eos_token": {"content": "</s>", "special": True}, "unk_token": "<unk>",
            "chat_template": [{"name": "default", "template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"},
                              {"name": "tool_use", "template": "{{ tools }}"}]}]
    for p in _harness.shared_files("models/*/tokenizer_config.json") + _harness.shared_files(
            "tokenizers/*/tokenizer_config.json"):
        cfg = json.loads(p.read_text())
        cfg.pop("added_tokens_decoder", None)  # 140 KB of the same dict, for mistral
        out.append(cfg)
    return out


CONFIGS = _config_seeds()
GENERATION = [{"eos_token_id": [2, 3], "bos_token_id": 1}] + [
    json.loads(p.read_text()) for p in _harness.shared_files("*/*/generation_config.json")]
FIELDS = sorted(_harness.json_keys(CONFIGS) | {"chat_template", "name", "template", "content", "eos_token_id"})
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "a b"}, {"role": "user", "content": "again"}]


@atheris.instrument_func
def structured(fdp: atheris.FuzzedDataProvider) -> tuple[bytes, bytes | None]:
    cfg = copy.deepcopy(CONFIGS[fdp.ConsumeIntInRange(0, len(CONFIGS) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        field = fdp.PickValueInList(FIELDS)
        cfg[field] = copy.deepcopy(fdp.PickValueInList(_harness.EDGE_VALUES + [[{"name": None}], [{}], [1, {"x": 2}]]))
    gen = None
    if fdp.ConsumeBool():
        g = copy.deepcopy(GENERATION[fdp.ConsumeIntInRange(0, len(GENERATION) - 1)])
        g["eos_token_id"] = copy.deepcopy(fdp.PickValueInList(_harness.EDGE_VALUES))
        gen = _harness.dumps(g)
    return _harness.dumps(cfg), gen


def _write(name: str, data: bytes | None) -> None:
    p = DIR / name
    if data is None:
        p.unlink(missing_ok=True)
    else:
        p.write_bytes(data)


@atheris.instrument_func
def check(tokenizer_json: bytes, config: bytes | None, generation: bytes | None) -> None:
    _write("tokenizer.json", tokenizer_json)
    _write("tokenizer_config.json", config)
    _write("generation_config.json", generation)
    try:
        tok = Tokenizer(str(DIR))
    except ValueError as e:
        _harness.feedback(str(e).split("(", 1)[0])
        return
    for ids in (tok.eos_token_ids, tok.all_special_ids, [tok.bos_token_id or 0, tok.eos_token_id or 0]):
        assert all(type(i) is int and 0 <= i <= INT32_MAX for i in ids), ids
    for t in (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token, tok.chat_template):
        assert t is None or isinstance(t, str), t
    ids = tok.encode("hello world <s> a", add_special_tokens=True)
    assert isinstance(tok.decode(ids), str) and tok.vocab_size >= 0
    _harness.feedback(f"ok {len(tok.eos_token_ids)} {tok.bos_token is None} {tok.chat_template is None}")
    if tok.chat_template is not None:
        try:
            assert isinstance(tok.apply_chat_template(MESSAGES, **RENDER_KW), str)
        except ct.ChatTemplateError as e:
            _harness.feedback("template " + str(e)[:60])


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 5, data[1:]
    if mode == 0:
        check(BASE_TOKENIZER, rest, None)
    elif mode == 1:
        check(BASE_TOKENIZER, None, rest)
    elif mode == 2:
        cut = rest.find(b"\x00\x00")
        check(BASE_TOKENIZER, rest[:cut] if cut >= 0 else rest, rest[cut + 2:] if cut >= 0 else None)
    elif mode == 3:
        check(rest, None, None)
    else:
        config, generation = structured(atheris.FuzzedDataProvider(rest))
        check(BASE_TOKENIZER, config, generation)


def corpus() -> dict[str, bytes]:
    out = {f"config-{i}": b"\x00" + _harness.dumps(c) for i, c in enumerate(CONFIGS)}
    out.update({f"generation-{i}": b"\x01" + _harness.dumps(g) for i, g in enumerate(GENERATION)})
    out["both"] = b"\x02" + _harness.dumps(CONFIGS[0]) + b"\x00\x00" + _harness.dumps(GENERATION[0])
    out["tokenizer"] = b"\x03" + TINY
    out.update({f"structured-{i}": b"\x04" + bytes([i, 2, 7, 1, 8, 2, 8]) for i in range(len(CONFIGS))})
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, corpus(), [f'"{k}"'.encode() for k in FIELDS])
