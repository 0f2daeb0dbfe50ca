"""OpenAI API request bodies (the fields flashpage honours; unknown fields are ignored as
OpenAI's own server does) and their translation into SamplingParams."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from flashpage.sampling_params import SamplingParams
from flashpage.structured_outputs import StructuredOutputsParams


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
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs (and its older
    # guided_* fields), in the extra body.
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def constraint(self) -> tuple[str, StructuredOutputsParams] | None:
        """(the field it came from, the constraint) of the request, if any; ValueError naming
        the field for a malformed one, or for two at once."""
        found: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None:
            kind = rf.get("type")
            if kind == "json_object":
                found.append(("response_format", {"json_object": True}))
            elif kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    raise ValueError("response_format.json_schema: an object with the schema in 'schema' is required")
                found.append(("response_format", {"json": spec.get("schema", {})}))
            elif kind != "text":
                raise ValueError(f"response_format.type: {kind!r} is not one of text, json_object, json_schema")
        if self.structured_outputs is not None:
            found.append(("structured_outputs", dict(self.structured_outputs)))
        for name in ("json", "regex", "choice", "grammar"):
            if getattr(self, f"guided_{name}") is not None:
                found.append((f"guided_{name}", {name: getattr(self, f"guided_{name}")}))
        if not found:
            return None
        if len(found) > 1:
            raise ValueError(f"{found[0][0]}: give one constraint, not also {found[1][0]}")
        field, spec = found[0]
        try:
            return field, StructuredOutputsParams(**spec)
        except TypeError as e:  # an unknown key
            raise ValueError(f"{field}: {e}") from None
        except ValueError as e:
            raise ValueError(f"{field}: {e}") from None

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
        constraint = self.constraint()
        return SamplingParams(n=self.n, seed=self.seed, stop=self.stop, stop_token_ids=self.stop_token_ids,
                              structured_outputs=constraint[1] if constraint else None,
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
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool = True

    def named_tool(self) -> dict[str, Any] | None:
        """The tool of tool_choice {"type": "function", "function": {"name": ...}}; ValueError
        naming the field when it is not among the tools."""
        if not isinstance(self.tool_choice, dict):
            return None
        name = (self.tool_choice.get("function") or {}).get("name")
        if self.tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ValueError("tool_choice: {\"type\": \"function\", \"function\": {\"name\": ...}} is the form of a "
                             "named tool")
        for tool in self.tools or []:
            if (tool.get("function") or {}).get("name") == name:
                return tool
        raise ValueError(f"tool_choice: the function {name!r} is not among the request's tools")

    def check_tools(self) -> None:
        for i, tool in enumerate(self.tools or []):
            fn = tool.get("function") if isinstance(tool, dict) else None
            if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not isinstance(
                    fn.get("name"), str) or not isinstance(fn.get("parameters", {}), dict):
                raise ValueError(f"tools[{i}]: a tool is {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                 "\"parameters\": {...}}}")
        if self.tool_choice in ("required",) or isinstance(self.tool_choice, dict):
            if not self.tools:
                raise ValueError("tool_choice: a required or named tool choice needs tools")

    def plain_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template sees them; content given as parts keeps its text."""
        out = []
        for m in self.messages:
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                d["content"] = "".join(p.get("text", "") for p in m.content if p.get("type") == "text")
            out.append(d)
        return out
