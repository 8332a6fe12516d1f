"""The jinja2 sandbox chat templates render in: transformers' environment, hardened.

Mirrors `transformers.utils.chat_template_utils._cached_compile_jinja_template`: an
`ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)` with loopcontrols and the
`{% generation %}` block (AssistantTracker), transformers' `tojson` filter and its globals
`raise_exception`, `strftime_now`, `dict` and `namespace`. A template is untrusted code, so beyond
what jinja2's sandbox refuses (underscore and internal attributes, mutating lists and dicts, ranges
over MAX_RANGE): unsafe attribute access fails at once instead of yielding an undefined, `*` and
`**` cannot build huge values, `lipsum` is bounded, and every call and operator checks the render
deadline (best effort: a loop that calls nothing, over an already built sequence, is not
interrupted).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.runtime
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_SEQUENCE_ITEMS = 1 << 24  # longest str/list a template may build with `*`
_DEADLINE: ContextVar[float] = ContextVar("chat_template_deadline", default=math.inf)


class TemplateRaised(TemplateError):
    """raise_exception() from the template (transformers raises a plain TemplateError)."""


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Renders inside this block fail with a TemplateError once `seconds` have passed."""
    token = _DEADLINE.set(time.monotonic() + seconds)
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def _check_deadline() -> None:
    if time.monotonic() > _DEADLINE.get():
        raise TemplateError("rendering took too long")


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> str:
    if n > 1000 or max > 1000:
        raise SecurityError("lipsum() is limited to 1000 paragraphs of 1000 words")
    return str(jinja2.utils.generate_lorem_ipsum(n, html, min, max))


class _TemplateDict:
    """transformers' `dict` global: callable, but no attributes of the dict type to reach."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """transformers' `namespace`: underscore-prefixed attribute names are refused."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: B902 (jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"a namespace cannot hold the attribute {name!r}")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' AssistantTracker): its body renders
    as is; only the assistant-token mask of a tokenized render (never used here) would differ."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        call = self.call_method("_body")
        return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, with `*` and `**` checked and every call against the render deadline."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        _check_deadline()
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and \
                        len(seq) * n > MAX_SEQUENCE_ITEMS:
                    raise SecurityError(f"'*' would build over {MAX_SEQUENCE_ITEMS} items")
        elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and \
                right * math.log2(abs(left)) > 1 << 16:
            raise SecurityError("'**' result too large")
        return super().call_binop(context, operator, left, right)

    def call(self, context: jinja2.runtime.Context, obj: Any, /, *args: Any,
             **kwargs: Any) -> Any:
        _check_deadline()
        return super().call(context, obj, *args, **kwargs)

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} "
                            "object is unsafe")


def environment() -> jinja2.Environment:
    """A fresh sandbox environment for one template."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       dict=_TemplateDict(), namespace=_TemplateNamespace, lipsum=_lipsum)
    return env
