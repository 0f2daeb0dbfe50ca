"""Tool calls parsed out of a model's text (vLLM's --tool-call-parser names): Hermes / Qwen
`<tool_call>{...}</tool_call>`, Llama 3 JSON (`{"name": ..., "parameters": ...}`, `;`-separated,
after an optional `<|python_tag|>`), and Mistral `[TOOL_CALLS] [{...}, ...]`.

One scanner serves the whole text and every streamed prefix of it, so streaming cannot disagree
with the non-streamed result: a call's arguments are the model's own JSON text of its arguments
object (not re-serialized), and what has been streamed of them is always a prefix of that text.
Content is what precedes the first call; text after the calls is not content (as vLLM)."""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = ""

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: tuple[str, ...]  # what opens the calls section ("" : the text itself, when it starts with "{")
    noise: tuple[str, ...]  # separators and markers between calls, skipped
    args_keys: tuple[str, ...] = ("arguments", "parameters")
    id_alphabet: str = "hex"


FORMATS = {
    "hermes": ToolFormat("hermes", ("<tool_call>",), ("<tool_call>", "</tool_call>", ",")),
    "llama3_json": ToolFormat("llama3_json", ("<|python_tag|>", ""), ("<|python_tag|>", ";", ",")),
    "mistral": ToolFormat("mistral", ("[TOOL_CALLS]",), ("[TOOL_CALLS]", "[", "]", ","), id_alphabet="alnum9"),
}


def parser_for_template(template: str | None) -> str | None:
    """The format a chat template writes tool calls in, when it says."""
    if not template:
        return None
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3_json"
    return None


def new_call_id(fmt: ToolFormat) -> str:
    if fmt.id_alphabet == "alnum9":  # Mistral's templates require 9 alphanumerics
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"chatcmpl-tool-{secrets.token_hex(12)}"


@dataclass
class _Call:
    name: str | None = None
    args_start: int | None = None  # index of the arguments object's "{" in the text
    args_end: int | None = None  # one past its "}"
    args_value: str | None = None  # arguments given as a JSON string instead of an object
    end: int | None = None  # one past the call object's "}"


@dataclass
class Parsed:
    content: str  # text before the calls (all of it when there are none)
    calls: list[_Call] = field(default_factory=list)
    in_calls: bool = False  # the calls section has begun
    error: bool = False  # the calls section is not what the format says


def _skip_string(text: str, i: int) -> int:
    """From the index after an opening quote, the index after the closing one (-1: not closed)."""
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return -1


def _skip_value(text: str, i: int) -> int:
    """From the start of a JSON value, one past its end (-1: the text ends inside it)."""
    n = len(text)
    if i >= n:
        return -1
    if text[i] == '"':
        return _skip_string(text, i + 1)
    if text[i] in "{[":
        depth = 0
        while i < n:
            c = text[i]
            if c == '"':
                i = _skip_string(text, i + 1)
                if i < 0:
                    return -1
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return -1
    j = i
    while j < n and text[j] not in ",}] \t\r\n":
        j += 1
    return j if j < n else -1


def _ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def _scan_call(text: str, i: int, fmt: ToolFormat, call: _Call) -> int:
    """Reads one call object from its "{"; fills `call` as far as the text goes; returns one past
    its "}", -1 where the text ends inside it, -2 where it is not a call object."""
    n = len(text)
    i += 1
    while True:
        i = _ws(text, i)
        if i >= n:
            return -1
        if text[i] == "}":
            return i + 1 if call.name is not None and (call.args_start is not None or call.args_value is not None) \
                else -2
        if text[i] == ",":
            i += 1
            continue
        if text[i] != '"':
            return -2
        k = _skip_string(text, i + 1)
        if k < 0:
            return -1
        key = json.loads(text[i:k])
        i = _ws(text, k)
        if i >= n:
            return -1
        if text[i] != ":":
            return -2
        i = _ws(text, i + 1)
        if i >= n:
            return -1
        if key in fmt.args_keys and text[i] == "{":
            call.args_start = i
        end = _skip_value(text, i)
        if end < 0:
            return -1
        value = text[i:end]
        if key == "name":
            try:
                call.name = json.loads(value)
            except ValueError:
                return -2
            if not isinstance(call.name, str):
                return -2
        elif key in fmt.args_keys:
            if call.args_start is not None and call.args_end is None and text[i] == "{":
                call.args_end = end
            elif text[i] == '"':  # arguments as a JSON string holding JSON
                call.args_value = json.loads(value)
            else:
                return -2
        i = end


def scan(text: str, fmt: ToolFormat) -> Parsed:
    """The calls in `text` (or in a prefix of a longer text: partial calls included)."""
    start = -1
    for marker in fmt.start:
        if marker == "":
            if text.lstrip().startswith("{"):
                start = len(text) - len(text.lstrip())
                break
            continue
        k = text.find(marker)
        if k >= 0 and (start < 0 or k < start):
            start = k
    if start < 0:
        # No calls (yet): hold back a tail that may be the start of a marker.
        hold = max([j for m in fmt.start if m for j in range(1, len(m)) if text.endswith(m[:j])] or [0])
        return Parsed(text[:len(text) - hold])
    parsed = Parsed(text[:start], in_calls=True)
    i, n = start, len(text)
    while True:
        i = _ws(text, i)
        if i >= n:
            return parsed
        noise = next((m for m in fmt.noise if text.startswith(m, i)), None)
        if noise is not None:
            i += len(noise)
            continue
        if any(m.startswith(text[i:]) for m in fmt.noise):  # a marker still arriving
            return parsed
        if text[i] != "{":
            parsed.error = not parsed.calls  # after calls: text that is not a call ends them (ignored)
            return parsed
        call = _Call()
        end = _scan_call(text, i, fmt, call)
        if end == -2:
            parsed.error = True
            return parsed
        parsed.calls.append(call)
        if end == -1:  # the text ends inside it
            return parsed
        call.end = end
        i = end


def _arguments(text: str, call: _Call) -> str:
    if call.args_value is not None:
        return call.args_value
    return text[call.args_start:call.args_end]


class ToolParser:
    """A format's parser: `extract` for a whole text; `stream` for one streamed response."""

    def __init__(self, name: str | ToolFormat) -> None:
        if isinstance(name, ToolFormat):
            self.format = name
            return
        if name not in FORMATS:
            raise ValueError(f"unknown tool-call parser {name!r}; known: {', '.join(FORMATS)}")
        self.format = FORMATS[name]

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, tool calls) of a finished text; text that is not well-formed calls is
        content, as vLLM does."""
        p = scan(text, self.format)
        if not p.in_calls:
            return text, []
        calls = [c for c in p.calls if c.end is not None]
        if p.error or not calls or len(calls) != len(p.calls):
            return text, []
        return (p.content or None), [ToolCall(c.name or "", _arguments(text, c), new_call_id(self.format))
                                     for c in calls]

    def stream(self, first_only: bool = False) -> ToolCallStream:
        return ToolCallStream(self, first_only)


class ToolCallStream:
    """Feeds on a response's text as it grows; hands out OpenAI deltas (content and tool_calls)
    whose concatenation is `ToolParser.extract` of the final text."""

    def __init__(self, parser: ToolParser, first_only: bool = False) -> None:
        self.parser, self.first_only = parser, first_only
        self.text = ""
        self.content_sent = 0
        self.names_sent: list[str] = []  # ids of calls whose name went out
        self.args_sent: list[int] = []

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        """(content delta, tool_calls deltas) after `delta`; `final` at the last one."""
        self.text += delta
        if final:
            content, calls = self.parser.extract(self.text)
            return self._emit(content or "", [(c.name, c.arguments) for c in calls])
        p = scan(self.text, self.parser.format)
        if p.error:
            return "", []  # undecided until the end: extract() then says content or calls
        live = []
        for c in p.calls:
            if c.name is None:
                break
            if c.args_value is not None or c.args_start is None:
                live.append((c.name, ""))  # a string or not-yet-started arguments: at the end
                continue
            end = c.args_end if c.args_end is not None else len(self.text)
            live.append((c.name, self.text[c.args_start:end]))
        return self._emit(p.content, live)

    def _emit(self, content: str, calls: list[tuple[str, str]]) -> tuple[str, list[dict]]:
        """The new content, and each call's name once and the arguments not yet sent."""
        out_content = content[self.content_sent:] if not self.names_sent else ""
        self.content_sent = max(self.content_sent, len(content))
        deltas = []
        for index, (name, args) in enumerate(calls[:1] if self.first_only else calls):
            if index == len(self.names_sent):
                self.names_sent.append(new_call_id(self.parser.format))
                self.args_sent.append(0)
                deltas.append({"index": index, "id": self.names_sent[index], "type": "function",
                               "function": {"name": name, "arguments": ""}})
            new = args[self.args_sent[index]:]
            if new:
                self.args_sent[index] = len(args)
                if deltas and deltas[-1]["index"] == index:
                    deltas[-1]["function"]["arguments"] += new
                else:
                    deltas.append({"index": index, "function": {"arguments": new}})
        return out_content, deltas


def required_schema(tools: list[dict]) -> dict:
    """tool_choice "required": a JSON array of one or more calls of the given tools (vLLM's)."""
    variants = [{"type": "object", "additionalProperties": False, "required": ["name", "parameters"],
                 "properties": {"name": {"type": "string", "enum": [t["function"]["name"]]},
                                "parameters": t["function"].get("parameters") or {"type": "object"}}}
                for t in tools]
    return {"type": "array", "minItems": 1, "items": {"anyOf": variants}}


# tool_choice "required": the constrained output is a JSON array of {"name", "parameters"}.
_REQUIRED = ToolFormat("required", ("[",), ("[", "]", ","), args_keys=("parameters",))


class _NamedStream:
    """tool_choice naming a function: the constrained output is its arguments object."""

    def __init__(self, name: str) -> None:
        self.name, self.started = name, False

    def feed(self, delta: str, final: bool = False) -> tuple[str, list[dict]]:
        if not self.started:
            self.started = True
            return "", [{"index": 0, "id": new_call_id(FORMATS["hermes"]), "type": "function",
                         "function": {"name": self.name, "arguments": delta}}]
        return "", [{"index": 0, "function": {"arguments": delta}}] if delta else []


class ToolCalling:
    """How one chat request's output becomes tool calls: "auto" (the model's format, parsed),
    "required" (one or more calls, enforced by a JSON schema) or a named function (its
    arguments, enforced by its parameters' schema)."""

    def __init__(self, mode: str, parser: ToolParser | None = None, tool: dict | None = None,
                 tools: list[dict] | None = None, parallel: bool = True) -> None:
        self.mode, self.parser, self.tool, self.tools = mode, parser, tool, tools or []
        self.parallel = parallel  # parallel_tool_calls: False keeps the first call only

    @staticmethod
    def for_request(tools: list[dict] | None, tool_choice: str | dict | None, named: dict | None,
                    parser_name: str | None, parallel: bool = True) -> ToolCalling | None:
        """None where the output stays text (no tools, or tool_choice "none"). ValueError naming
        the field where "auto" has no parser to read the model's calls with."""
        if not tools or tool_choice == "none":
            return None
        if named is not None:
            return ToolCalling("named", tool=named)
        if tool_choice == "required":
            return ToolCalling("required", parser=ToolParser(_REQUIRED), tools=tools, parallel=parallel)
        if parser_name is None:
            raise ValueError('tool_choice: "auto" tool calling needs to know how this model writes calls: start '
                             "the server with --tool-call-parser (hermes, llama3_json, mistral)")
        return ToolCalling("auto", parser=ToolParser(parser_name), parallel=parallel)

    def constraint(self) -> dict | None:
        """The JSON schema the output must follow (required and named choices)."""
        if self.mode == "named":
            return self.tool["function"].get("parameters") or {"type": "object"}
        if self.mode == "required":
            schema = required_schema(self.tools)
            if not self.parallel:
                schema["maxItems"] = 1
            return schema
        return None

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        if self.mode == "named":
            return None, [ToolCall(self.tool["function"]["name"], text, new_call_id(FORMATS["hermes"]))]
        assert self.parser is not None
        content, calls = self.parser.extract(text)
        return content, calls if self.parallel else calls[:1]

    def stream(self) -> ToolCallStream | _NamedStream:
        if self.mode == "named":
            return _NamedStream(self.tool["function"]["name"])
        assert self.parser is not None
        return self.parser.stream(first_only=not self.parallel)

    @property
    def finish_reason(self) -> str:
        """With calls made: "tool_calls", except for a named function ("stop", as OpenAI)."""
        return "stop" if self.mode == "named" else "tool_calls"
