"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from flashpage import _core
from flashpage.outputs import CompletionOutput, RequestOutput
from flashpage.sampling_params import SamplingParams
from flashpage.tokenizer import Tokenizer

PromptType = str | dict[str, Any] | Sequence[int]


class LLM:
    """A model on this machine's CPU, with its KV cache, scheduler and sampler.

    ``kv_cache_memory_bytes`` sizes the KV cache; without it, ``kv_cache_memory_fraction`` of
    the memory the OS reports available is used. A sequence's logits are always bitwise
    independent of what shares its batch and of how its prompt is chunked (batch invariance).
    ``verbose`` prints the start-up report (weights mapped/loaded, KV-cache sizing) to stderr.
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        *,
        dtype: str = "auto",
        load_format: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        enable_prefix_caching: bool = True,
        kv_cache_memory_bytes: int | None = None,
        kv_cache_memory_fraction: float = 0.25,
        seed: int = 0,
        skip_tokenizer_init: bool = False,
        verbose: bool = True,
    ) -> None:
        if not os.path.isdir(model):
            raise FileNotFoundError(f"{model}: not a directory (flashpage loads local Hugging Face model directories)")
        self.llm_engine = _core.Engine(
            model, dtype=dtype, load_format=load_format, max_model_len=max_model_len or 0,
            block_size=block_size, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, enable_prefix_caching=enable_prefix_caching,
            kv_cache_bytes=kv_cache_memory_bytes or 0, kv_cache_memory_fraction=kv_cache_memory_fraction,
            seed=seed, verbose=verbose)
        self.model_info: dict = self.llm_engine.info
        self.tokenizer: Tokenizer | None = None
        tok_path = tokenizer or model
        if not skip_tokenizer_init and (tokenizer or os.path.isfile(os.path.join(model, "tokenizer.json"))):
            self.tokenizer = Tokenizer(tok_path)
        self._next_id = 0

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def _prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]} instead")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self._prompt_ids(str(prompt["prompt"]))
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return None, [int(t) for t in prompt]

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt, batched; outputs come in prompt order."""
        if prompt_token_ids is not None:
            items: list[PromptType] = [{"prompt_token_ids": list(p)} for p in prompt_token_ids]
        elif prompts is None:
            raise ValueError("generate() needs prompts or prompt_token_ids")
        elif isinstance(prompts, (str, dict)) or (
                isinstance(prompts, Sequence) and len(prompts) > 0 and isinstance(prompts[0], int)):
            items = [prompts]  # one prompt
        else:
            items = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = ([sampling_params] * len(items) if isinstance(sampling_params, SamplingParams)
                  else list(sampling_params))
        if len(params) != len(items):
            raise ValueError(f"got {len(params)} SamplingParams for {len(items)} prompts")

        max_len = int(self.model_info["max_model_len"])
        pending: dict[int, tuple[int, RequestOutput, SamplingParams]] = {}
        results: list[RequestOutput] = []
        try:
            for i, (item, sp) in enumerate(zip(items, params)):
                text, ids = self._prompt_ids(item)
                core_id = self.llm_engine.add_request(
                    np.asarray(ids, dtype=np.int32), **sp.engine_kwargs(max(1, max_len - len(ids))))
                out = RequestOutput(str(self._next_id), text, ids,
                                    [CompletionOutput(index=0, text="", token_ids=[])])
                self._next_id += 1
                pending[core_id] = (i, out, sp)
                results.append(out)
            while pending:
                ids_, tokens, reasons = self.llm_engine.step()
                for rid, tok, reason in zip(ids_.tolist(), tokens.tolist(), reasons):
                    entry = pending.get(rid)
                    if entry is None:
                        continue
                    _, out, sp = entry
                    comp = out.outputs[0]
                    if tok >= 0:
                        comp.token_ids.append(tok)
                    if reason is not None:
                        self._finish(out, sp, reason)
                        del pending[rid]
        except BaseException:
            for rid in pending:  # leave the engine clean for the next call
                self.llm_engine.abort_request(rid)
            raise
        return results

    def _finish(self, out: RequestOutput, sp: SamplingParams, reason: str) -> None:
        comp = out.outputs[0]
        comp.finish_reason = reason
        if reason == "stop" and comp.token_ids and comp.token_ids[-1] in (sp.stop_token_ids or []):
            comp.stop_reason = comp.token_ids[-1]
        if self.tokenizer is not None:
            comp.text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=sp.skip_special_tokens)
        out.finished = True
