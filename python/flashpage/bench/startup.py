"""Start-up benchmark: seconds from process start to the first generated token, for a model
shape written once as a bf16 safetensors checkpoint of random weights (so the real loading
path runs: config.json parsed, safetensors mapped, weights read in place).

    python -m flashpage.bench.startup [--shape 1.1b] [--repeats 3]

The child process is a fresh Python interpreter that imports flashpage, builds an LLM and
generates one token from a 16-token prompt; the parent times it from spawn to the line the
child prints when the token arrives. Runs after the first find the checkpoint in the page
cache (warm start), as on a server that restarts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {
    "110m": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                 intermediate_size=2048),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                 intermediate_size=5632),
}

CHILD = r"""
import sys, time
from flashpage import LLM, SamplingParams
llm = LLM(sys.argv[1], max_model_len=2048, kv_cache_memory_bytes=1 << 30)
llm.generate({"prompt_token_ids": list(range(1, 17))}, SamplingParams(temperature=0, max_tokens=1))
print("first-token", llm.model_info["load_seconds"], flush=True)
"""


def config_for(shape: str) -> dict:
    return dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5,
                rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False, bos_token_id=1,
                eos_token_id=2, torch_dtype="bfloat16", **SHAPES[shape])


def write_checkpoint(shape: str, root: str) -> str:
    """A bf16 safetensors checkpoint of random weights (cached under root)."""
    import numpy as np

    path = os.path.join(root, f"llama-{shape}-bf16")
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    os.makedirs(path, exist_ok=True)
    c = config_for(shape)
    H, I, V, L = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    D = H // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I)})
    # safetensors layout written directly: an 8-byte header length, the JSON header, the data.
    header, offset = {}, 0
    for name, shp in shapes.items():
        n = int(np.prod(shp)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    tmp = os.path.join(path, "model.safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for name, shp in shapes.items():
            if len(shp) == 1:
                f.write(np.full(shp, 0x3F80, np.uint16).tobytes())  # 1.0 in bf16
                continue
            for row in range(0, shp[0], 1024):  # bounded memory
                x = rng.standard_normal((min(1024, shp[0] - row), shp[1]), dtype=np.float32) * 0.02
                f.write((x.view(np.uint32) >> 16).astype(np.uint16).tobytes())
    os.replace(tmp, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f)
    return path


def time_to_first_token(path: str) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, path], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("first-token"):
            elapsed = time.perf_counter() - t0
            load = float(line.split()[1])
            proc.wait()
            return elapsed, load
    proc.wait()
    raise RuntimeError(f"the child exited with {proc.returncode} before a first token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="1.1b", choices=sorted(SHAPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/flashpage-bench"))
    args = ap.parse_args()
    path = write_checkpoint(args.shape, args.cache)
    size = os.path.getsize(os.path.join(path, "model.safetensors"))
    runs = [time_to_first_token(path) for _ in range(args.repeats)]
    ttft = statistics.median(r[0] for r in runs)
    load = statistics.median(r[1] for r in runs)
    print(f"{args.shape}: {size / 2**30:.2f} GiB bf16 checkpoint; process start -> first token "
          f"{ttft:.2f} s (median of {args.repeats}; engine construction {load:.2f} s), runs: "
          + ", ".join(f"{r[0]:.2f}" for r in runs))


if __name__ == "__main__":
    main()
