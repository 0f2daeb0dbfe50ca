"""Decode steps run padded to a fixed size (cuda_graph_max_batch: what CUDA graphs replay). On the
CPU the padded steps run as they come, so this checks the runner's half of the graphs: padding
rows that write no KV and whose logits nobody sees, block tables widened to max_model_len, the
attention planned for max_model_len, and the steps that must not be padded (prefills, chunks,
copy-on-write forks, prompt logprobs) running as before. The CPU kernels are batch-invariant, so
every token and logprob must be the same bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flashpage import LLM, SamplingParams
from model_fixtures import STORIES

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")


def _run(graph_max_batch: int) -> list:
    llm = LLM(STORIES, max_num_seqs=16, max_model_len=256, cuda_graph_max_batch=graph_max_batch)
    assert llm.model_info["cuda_graph_max_batch"] == graph_max_batch and not llm.model_info["cuda_graphs"]
    rng = np.random.default_rng(5)
    outs = []
    # 11 sequences (padded to 16), then 5 (to 8), 3 (to 4) and one (1) as they finish at
    # different lengths; greedy with logprobs, sampled with seeds, forks, prompt logprobs.
    prompts = [{"prompt_token_ids": rng.integers(3, 500, size=int(rng.integers(2, 40))).tolist()} for _ in range(11)]
    params = [SamplingParams(temperature=0, max_tokens=int(8 + 6 * i), ignore_eos=True, logprobs=2)
              for i in range(len(prompts))]
    params[3] = SamplingParams(temperature=0.9, top_p=0.9, seed=7, max_tokens=30, ignore_eos=True, n=2)
    params[4] = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, prompt_logprobs=1)
    for o in llm.generate(prompts, params, use_tqdm=False):
        for c in o.outputs:
            lps = [sorted((t, lp.logprob) for t, lp in d.items()) for d in c.logprobs or []]
            outs.append((c.token_ids, lps))
        if o.prompt_logprobs:
            outs.append([sorted((t, lp.logprob) for t, lp in d.items()) for d in o.prompt_logprobs if d])
    one = llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    outs.append(one[0].outputs[0].token_ids)
    return outs


def test_padded_decode_steps_change_no_token_and_no_logprob():
    assert _run(16) == _run(0)


def test_impossible_graph_sizes_are_refused():
    with pytest.raises(ValueError, match="cuda_graph_max_batch"):
        LLM(STORIES, cuda_graph_max_batch=-1)
