"""The offline API, shaped like vLLM's: LLM(model).generate(prompts, SamplingParams)."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from flashpage import _core
from flashpage.engine import LLMEngine, PromptType
from flashpage.engine_args import EngineArgs
from flashpage.models import resolve_model
from flashpage.outputs import RequestOutput
from flashpage.sampling_params import SamplingParams
from flashpage.tokenizer import Tokenizer


class LLM:
    """A model on this machine's CPU, with its KV cache, scheduler and sampler.

    ``kv_cache_memory_bytes`` sizes the KV cache; without it, ``kv_cache_memory_fraction`` of
    the memory the OS reports available is used. A sequence's logits are always bitwise
    independent of what shares its batch and of how its prompt is chunked (batch invariance).
    ``compute_dtype``: "auto" computes a bf16 checkpoint in bf16 (bf16 products, fp32 sums; what
    transformers and vLLM do) where the CPU has bf16 dot products (AVX512-BF16, AMX), "float32"
    keeps fp32 arithmetic (bf16 weights widened). ``verbose`` prints the start-up report (weights mapped/loaded, KV-cache sizing) to stderr.
    """

    def __init__(self, model: str = "", tokenizer: str | None = None, **engine_options: Any) -> None:
        """model: a local Hugging Face model directory, a .gguf file, or "" for the tiny model
        that ships in the wheel (stories260K). engine_options: the fields of
        flashpage.engine_args.EngineArgs (vLLM's names: dtype, max_model_len, max_num_seqs,
        scheduling_policy, seed, quantization, tensor_parallel_size, ...)."""
        args = EngineArgs.from_kwargs(model, tokenizer=tokenizer, **engine_options)
        self.engine_args = args
        model = resolve_model(model)
        args.check_quantization(model)
        gguf = model.endswith(".gguf")
        if not gguf:  # GPTQ / AWQ: repacked once into flashpage's format
            from flashpage.convert import converted_for_cpu
            model = converted_for_cpu(model)
        self.core = _core.Engine(model, **args.core_kwargs())
        self.model_info: dict = self.core.info
        self.tokenizer: Tokenizer | None = None
        tok_path = tokenizer or model
        if not args.skip_tokenizer_init and (tokenizer or gguf or os.path.isfile(os.path.join(model, "tokenizer.json"))):
            self.tokenizer = Tokenizer(tok_path)
        self.llm_engine = LLMEngine(self.core, self.tokenizer, seed=args.seed, scheduling_policy=args.scheduling_policy)
        self._next_id = 0

    def get_tokenizer(self) -> Tokenizer | None:
        return self.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
        priority: Sequence[int] | None = None,
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
        if priority is not None and len(priority) != len(items):
            raise ValueError(f"got {len(priority)} priorities for {len(items)} prompts")
        return self._run(items, params, priority, use_tqdm)

    def chat(
        self,
        messages: list[dict] | Sequence[list[dict]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict] | None = None,
    ) -> list[RequestOutput]:
        """Generates replies to one conversation ([{"role": ..., "content": ...}, ...]) or a
        list of them, rendered with the model's chat template (or chat_template)."""
        if self.tokenizer is None:
            raise ValueError("chat() needs a tokenizer")
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts: list[PromptType] = []
        for conv in conversations:
            text = self.tokenizer.apply_chat_template(
                list(conv), chat_template=chat_template, add_generation_prompt=add_generation_prompt,
                tools=tools, **(chat_template_kwargs or {}))
            # The template writes the special tokens (BOS included): add none when encoding.
            prompts.append({"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, items: list[PromptType], params: list[SamplingParams], priority: Sequence[int] | None,
             use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for i, (item, sp) in enumerate(zip(items, params)):
                rid = str(self._next_id)
                self._next_id += 1
                engine.add_request(rid, item, sp, priority=priority[i] if priority else 0)
                ids.append(rid)
            done: dict[str, RequestOutput] = {}
            bar = _progress(len(ids)) if use_tqdm else None
            while len(done) < len(ids) and engine.has_unfinished_requests():
                for out in engine.step():
                    if out.error is not None:  # the request's own code failed (a logits processor)
                        raise out.error
                    if out.finished:
                        done[out.request_id] = out
                        if bar is not None:
                            bar.update(out)
            if bar is not None:
                bar.close()
        except BaseException:
            for rid in ids:  # leave the engine clean for the next call
                engine.abort_request(rid)
            raise
        return [done[rid] for rid in ids]


class _progress:
    """vLLM's progress bar: prompts done, with input and output tokens per second."""

    def __init__(self, total: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="Processed prompts", dynamic_ncols=True,
                        postfix="est. speed input: 0.00 toks/s, output: 0.00 toks/s")
        self.start = time.perf_counter()
        self.prompt_tokens = self.output_tokens = 0

    def update(self, out: RequestOutput) -> None:
        self.prompt_tokens += len(out.prompt_token_ids)
        self.output_tokens += sum(len(c.token_ids) for c in out.outputs)
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.postfix = (f"est. speed input: {self.prompt_tokens / elapsed:.2f} toks/s, "
                            f"output: {self.output_tokens / elapsed:.2f} toks/s")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
