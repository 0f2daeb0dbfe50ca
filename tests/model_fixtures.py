"""Random-weight tiny checkpoints written by transformers at test time, one per supported
variant, and a driver that runs our engine step by step with greedy sampling and keeps the
logits of every sampled position."""

from __future__ import annotations

import os

import numpy as np
import pytest

# ../shared beside the checkout; on the GPU machine (where only the checkout travels) a shared/
# inside it, or $FLASHPAGE_SHARED.
_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SHARED = os.environ.get("FLASHPAGE_SHARED") or next(
    (p for p in (os.path.join(_REPO, "..", "shared"), os.path.join(_REPO, "shared")) if os.path.isdir(p)),
    os.path.join(_REPO, "..", "shared"))
STORIES = os.path.join(SHARED, "models", "stories260K")
SMOLLM_DIR = os.path.join(SHARED, "models", "smollm2-135m-instruct")

_BASE = dict(vocab_size=320, hidden_size=64, intermediate_size=144, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rms_norm_eps=1e-5, initializer_range=0.15)

# name -> (transformers config class, overrides)
VARIANTS: dict[str, tuple[str, dict]] = {
    "llama_gqa": ("LlamaConfig", {}),
    "llama3_rope": ("LlamaConfig", dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "linear_rope": ("LlamaConfig", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralConfig", dict(sliding_window=None)),
    "qwen2_bias": ("Qwen2Config", dict(num_key_value_heads=1)),
    "qwen3_qk_norm": ("Qwen3Config", dict(head_dim=32)),
    "tied": ("LlamaConfig", dict(tie_word_embeddings=True, num_key_value_heads=4)),
}


def transformers_or_skip():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.set_num_threads(2)
    return torch, transformers


def make_checkpoint(variant: str, out_dir: str, dtype: str = "float32") -> str:
    """Writes a random-weight checkpoint of `variant` to out_dir (safetensors + config.json)."""
    torch, transformers = transformers_or_skip()
    cls_name, overrides = VARIANTS[variant]
    config = getattr(transformers, cls_name)(**{**_BASE, **overrides})
    torch.manual_seed(sorted(VARIANTS).index(variant))
    model = transformers.AutoModelForCausalLM.from_config(config)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(out_dir)
    return out_dir


def hf_model(path: str):
    """The transformers model of a checkpoint, in float32 with eager attention (the reference)."""
    torch, transformers = transformers_or_skip()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def hf_greedy(model, prompt: list[int], steps: int) -> tuple[list[int], list[np.ndarray]]:
    """Greedy decoding with transformers' KV cache: tokens and the logits that chose them."""
    torch, _ = transformers_or_skip()
    tokens, logits = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(steps):
            row = out.logits[0, -1].float().numpy()
            logits.append(row)
            tokens.append(int(row.argmax()))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return tokens, logits


def run_greedy(engine, prompts: list[list[int]], max_tokens: int, first_id: int = 1 << 40,
               feed: list[list[int]] | None = None) -> list[tuple[list[int], list[np.ndarray]]]:
    """Runs `prompts` together through engine.scheduler + engine.execute with greedy sampling
    (or, with `feed`, forcing those tokens); returns each prompt's tokens and sampled logits."""
    sched = engine.scheduler
    for i, p in enumerate(prompts):
        sched.add_request(first_id + i, np.asarray(p, np.int32), max_tokens=max_tokens, ignore_eos=True)
    results: list[tuple[list[int], list[np.ndarray]]] = [([], []) for _ in prompts]
    while sched.has_unfinished:
        step = sched.schedule()
        if step.num_seqs == 0:
            sched.update(np.zeros(0, np.int32))
            continue
        logits = np.from_dlpack(engine.execute(step))
        sampled = logits.argmax(axis=1).astype(np.int32)
        for row, rid in enumerate(step.request_ids.tolist()):
            if step.do_sample[row]:
                toks, rows = results[rid - first_id]
                rows.append(logits[row].copy())
                if feed is not None:
                    sampled[row] = feed[rid - first_id][len(rows) - 1]
        ids, toks, _ = sched.update(sampled)
        for rid, tok in zip(ids.tolist(), toks.tolist()):
            if tok >= 0:
                results[rid - first_id][0].append(tok)
    return results
