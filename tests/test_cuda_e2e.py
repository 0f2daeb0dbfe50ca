"""The engine end to end on the GPU (device="cuda"): greedy continuations against transformers,
a batch against each prompt alone, the OpenAI server on --device cuda, and the defined error
for a model the CUDA attention kernels cannot run. Needs a CUDA GPU, torch with CUDA and
transformers; skipped elsewhere (tools/gpu_check.sh runs it on the device machine).

SmolLM2-135M's weights (a 98 MB GGUF in ../shared) do not travel to the device machine, so the
model here is SmolLM2-135M's architecture with random weights written by transformers: the same
shapes (576 hidden, 9 query / 3 KV heads of 64, 30 layers, 49152 vocabulary), the same code
paths, and a reference that computes the same function."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from flashpage import LLM, SamplingParams, _core

pytestmark = pytest.mark.skipif(not _core.cuda_info()["available"], reason="needs a CUDA GPU")

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2, initializer_range=0.1)
STEPS = 64
# bf16 on the GPU against an fp32 reference: a greedy path may part only where the reference's
# best two tokens were this close (a near tie that rounding can flip).
NEAR_TIE = 0.05


@pytest.fixture(scope="module")
def smol_random(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE)).to(torch.bfloat16)
    out = str(tmp_path_factory.mktemp("smol-random"))
    model.save_pretrained(out)
    # A word-level tokenizer over the same ids ("t0" ... "t49151"), for the server's text side.
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SMOLLM2_SHAPE["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(out, "tokenizer.json"))
    return out


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, SMOLLM2_SHAPE["vocab_size"], size=int(rng.integers(4, 40))).tolist() for _ in range(n)]


def _reference(path: str, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy tokens in fp32 on the GPU, and the logits that chose them."""
    import torch
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                              attn_implementation="eager").cuda().eval()
    tokens, logits = [], []
    with torch.no_grad():
        out = model(torch.tensor([prompt], device="cuda"), use_cache=True)
        for _ in range(STEPS):
            row = out.logits[0, -1].float().cpu().numpy()
            logits.append(row)
            tokens.append(int(row.argmax()))
            out = model(torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=out.past_key_values,
                        use_cache=True)
    return tokens, logits


def _assert_same_path(got: list[int], want: list[int], want_logits: list[np.ndarray], what: str) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            gap = float(want_logits[i][w] - want_logits[i][g])
            assert gap < NEAR_TIE, f"{what}: token {i} is {g}, transformers chose {w} by a margin of {gap:.3f}"
            return
    assert len(got) == len(want), what


def _generate(llm: LLM, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                                          use_tqdm=False)]


def test_greedy_continuations_follow_transformers_and_a_batch_equals_each_alone(smol_random):
    llm = LLM(smol_random, device="cuda", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.3)
    assert llm.model_info["backend"].startswith("cuda:")
    prompts = _prompts(16)
    batched = _generate(llm, prompts)
    for k, p in enumerate(prompts):
        want, want_logits = _reference(smol_random, p) if k < 4 else (None, None)
        alone = _generate(llm, [p])[0]
        if want is not None:
            _assert_same_path(alone, want, want_logits, f"prompt {k} alone against transformers")
            _assert_same_path(batched[k], want, want_logits, f"prompt {k} in a batch of 16 against transformers")
        assert batched[k] == alone, f"prompt {k}: batched {batched[k][:8]}... alone {alone[:8]}..."


def test_the_openai_server_answers_on_the_gpu(smol_random):
    httpx = pytest.importorskip("httpx")
    from test_openai_server import _free_port, wait_healthy
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "flashpage.cli", "serve", smol_random, "--device", "cuda",
                             "--port", str(port), "--grpc-port", "0", "--max-model-len", "512",
                             "--gpu-memory-utilization", "0.3", "--served-model-name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, timeout=120)
        r = httpx.post(f"{url}/v1/completions", json={"model": "smol", "prompt": "t5 t6 t7 t8", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-2000:]


def test_a_model_the_attention_kernels_cannot_run_is_refused_by_name():
    from model_fixtures import STORIES
    if not os.path.isdir(STORIES):
        pytest.skip("stories260K is not present")
    # stories260K has head_dim 8; the CUDA attention kernels take 64 or 128.
    with pytest.raises(RuntimeError, match="CUDA attention does not support head_dim 8"):
        LLM(STORIES, device="cuda", gpu_memory_utilization=0.3)
