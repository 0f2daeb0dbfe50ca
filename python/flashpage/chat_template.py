"""Chat templates rendered the way transformers' apply_chat_template renders them: a sandboxed
jinja2 environment with trim_blocks and lstrip_blocks, loop controls, the {% generation %} tag,
and the helpers templates call (raise_exception, strftime_now, tojson).

A template is code, and a model directory can ship a hostile or broken one: rendering is
bounded. Every loop iteration, call and filter spends one unit of a budget (TemplateLimits.
max_operations) and the clock (max_seconds); every string or list a template builds, and the
output, is at most max_output_chars long, checked before the big multiplications, paddings and
format widths that could allocate gigabytes in one expression; recursion ends at Python's
limit. Over a bound, rendering stops with TemplateBudgetError."""

from __future__ import annotations

import contextvars
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes as nodes
import jinja2.sandbox
import jinja2.visitor


class ChatTemplateError(ValueError):
    """The template refused the messages (its raise_exception) or could not be rendered."""


class TemplateBudgetError(ChatTemplateError):
    """Rendering went over one of TemplateLimits' bounds."""


@dataclass(frozen=True)
class TemplateLimits:
    max_operations: int = 1_000_000  # loop iterations + calls + filters
    max_seconds: float = 5.0
    max_output_chars: int = 4 << 20  # also the largest string or list built on the way


class _Budget:
    def __init__(self, limits: TemplateLimits) -> None:
        self.limits = limits
        self.left = limits.max_operations
        self.deadline = time.monotonic() + limits.max_seconds

    def spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise TemplateBudgetError(f"the chat template did more than {self.limits.max_operations} "
                                      "operations (loop iterations and calls)")
        if self.left % 1024 == 0 and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"the chat template ran for more than {self.limits.max_seconds} s")

    def size(self, value: Any) -> Any:
        if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > self.limits.max_output_chars:
            raise TemplateBudgetError(f"the chat template built a value of {len(value)} items, over the limit of "
                                      f"{self.limits.max_output_chars}")
        return value


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("flashpage_template_budget", default=None)
_WIDE = re.compile(r"\d{6,}")  # a format width of 100,000 or more: no template needs one


def _spend(value: Any = None) -> Any:
    b = _budget.get()
    if b is not None:
        b.spend()
        b.size(value)
    return value


def _check_args(args: tuple, kwargs: dict) -> None:
    """Before a call: no integer argument (a width, a count) beyond the output limit."""
    b = _budget.get()
    if b is None:
        return
    for a in (*args, *kwargs.values()):
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.limits.max_output_chars:
            raise TemplateBudgetError(f"the chat template passed {a} to a call, over the limit of "
                                      f"{b.limits.max_output_chars}")


def _bounded_iter(iterable: Any):
    for x in iterable:
        _spend()
        yield x


def _bounded_concat(*parts: Any) -> str:
    b = _budget.get()
    total = sum(len(p) if isinstance(p, str) else 16 for p in parts)
    if b is not None and total > b.limits.max_output_chars:
        raise TemplateBudgetError(f"the chat template built a string of {total} characters, over the limit of "
                                  f"{b.limits.max_output_chars}")
    return "".join(str(p) for p in parts)


class _Bound(jinja2.visitor.NodeTransformer):
    """Rewrites a parsed template: each for loop iterates through _bounded_iter, and `~`
    concatenation goes through _bounded_concat."""

    def _call(self, name: str, args: list, like: nodes.Node) -> nodes.Call:
        call = nodes.Call(nodes.Name(name, "load"), args, [], None, None)
        return call.set_lineno(like.lineno)

    def visit_For(self, node: nodes.For) -> nodes.Node:
        node = self.generic_visit(node)
        node.iter = self._call("__fp_iter", [node.iter], node)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        node = self.generic_visit(node)
        return self._call("__fp_concat", node.nodes, node)


class _BoundedEnvironment(jinja2.sandbox.ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "+", "%"])

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        tree = _Bound().visit(tree)
        tree.set_environment(self)
        return tree

    def call(self, context, obj, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        _spend()
        _check_args(args, kwargs)
        return _spend(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        fmt = super().wrap_str_format(value)
        if fmt is not None and _WIDE.search(value.__self__):
            raise TemplateBudgetError("the chat template formats with a width of 100,000 or more")
        return fmt

    def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
        b = _budget.get()
        if b is not None:
            limit = b.limits.max_output_chars
            seq, count = (left, right) if isinstance(right, int) else (right, left)
            if operator == "*" and isinstance(seq, (str, list, tuple)) and isinstance(count, int) \
                    and len(seq) * count > limit:
                raise TemplateBudgetError(f"the chat template multiplied a sequence to {len(seq) * count} items, "
                                          f"over the limit of {limit}")
            if operator == "**" and isinstance(right, int) and abs(right) > 4096:
                raise TemplateBudgetError(f"the chat template raised to the power {right}")
            if operator == "%" and isinstance(left, str) and _WIDE.search(left):
                raise TemplateBudgetError("the chat template formats with a width of 100,000 or more")
        return _spend(super().call_binop(context, operator, left, right))


def _bounded_filter(f: Any) -> Any:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        _spend()
        _check_args(args, kwargs)
        if f is _FORMAT and args and isinstance(args[0], str) and _WIDE.search(args[0]):
            raise TemplateBudgetError("the chat template formats with a width of 100,000 or more")
        return _spend(f(*args, **kwargs))
    if hasattr(f, "jinja_pass_arg"):  # pass_context / pass_environment / pass_eval_context
        wrapped.jinja_pass_arg = f.jinja_pass_arg  # type: ignore[attr-defined]
    return wrapped


_FORMAT = jinja2.filters.FILTERS["format"]


class _GenerationTag(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %} marks assistant text for training masks; rendering
    just keeps the body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render", []), [], [], body).set_lineno(lineno)

    def _render(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True,
                              extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _bounded_filter(_tojson)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["__fp_iter"] = _bounded_iter
    env.globals["__fp_concat"] = _bounded_concat
    try:
        return env.from_string(template)
    except (jinja2.TemplateError, RecursionError, MemoryError) as e:
        raise ChatTemplateError(f"the chat template does not parse: {e}") from e


# Names the renderer passes itself; a caller's keyword arguments may not replace them.
RESERVED_KWARGS = frozenset({"messages", "add_generation_prompt", "tools", "documents", "bos_token", "eos_token",
                             "chat_template", "tokenize"})


def render(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
           tools: list[dict] | None = None, documents: list[dict] | None = None,
           limits: TemplateLimits | None = None, **kwargs: Any) -> str:
    """The prompt text for messages ([{"role": ..., "content": ...}, ...]), within limits."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ChatTemplateError("messages must be a list of dicts, each with a 'role'")
    limits = limits or TemplateLimits()
    token = _budget.set(_Budget(limits))
    try:
        out: list[str] = []
        size = 0
        for piece in _compile(template).generate(messages=messages, tools=tools, documents=documents,
                                                 add_generation_prompt=add_generation_prompt, **kwargs):
            size += len(piece)
            if size > limits.max_output_chars:
                raise TemplateBudgetError(f"the chat template's output exceeds {limits.max_output_chars} characters")
            out.append(piece)
        return "".join(out)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template failed on these messages: {e}") from e
    except RecursionError:
        raise TemplateBudgetError("the chat template recursed too deeply") from None
    except MemoryError:
        raise TemplateBudgetError("the chat template ran out of memory") from None
    except Exception as e:  # noqa: BLE001 - the template's own Python error ({{ 1 // 0 }}, 'a' + [1], ...)
        raise ChatTemplateError(f"the chat template failed on these messages: {type(e).__name__}: {e}") from e
    finally:
        _budget.reset(token)
