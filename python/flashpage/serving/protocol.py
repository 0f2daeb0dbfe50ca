"""OpenAI API request bodies (the fields flashpage honours; unknown fields are ignored as
OpenAI's own server does) and their translation into SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flashpage.sampling_params import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (as a string) -> bias in [-100, 100]
    prompt_logprobs: int | None = None  # vLLM's extra field
    priority: int = Field(default=0, ge=-(2**31), le=2**31 - 1)  # vLLM's extra field: lower runs first
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """Raises ValueError naming the field for impossible values."""
        given = {k: v for k, v in dict(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty).items() if v is not None}
        bias = None
        if self.logit_bias:
            try:
                bias = {int(t): v for t, v in self.logit_bias.items()}
            except ValueError:
                raise ValueError("logit_bias: keys must be token ids (integers as strings)") from None
        return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              logit_bias=bias, prompt_logprobs=self._prompt_logprobs(logprobs),
                              include_stop_str_in_output=self.include_stop_str_in_output,
                              ignore_eos=self.ignore_eos, max_tokens=max_tokens, min_tokens=self.min_tokens,
                              logprobs=logprobs, skip_special_tokens=self.skip_special_tokens, **given)

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        return self.prompt_logprobs


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    def _prompt_logprobs(self, logprobs: int | None) -> int | None:
        # As vLLM: echo with logprobs scores the echoed prompt too (its tokens lead the
        # choice's logprobs), so the engine must compute the prompt's logprobs.
        if self.prompt_logprobs is None and self.echo:
            return logprobs
        return self.prompt_logprobs


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: str | None = None  # vLLM's field: refused (the server renders only its own)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto"] | dict | None = None

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template sees them; content given as parts keeps its text."""
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "".join(p.get("text", "") for p in m.content if p.get("type") == "text")
            out.append(d)
        return out
