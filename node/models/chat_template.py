"""Chat templates rendered as transformers renders them, with jinja2 alone.

transformers (``apply_chat_template``) compiles a template in an immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the loop-controls extension, a ``{% generation %}`` block
(it marks the assistant's tokens for training masks; rendering just emits the body), a
``tojson`` filter that does not HTML-escape, and the globals ``raise_exception`` and
``strftime_now``. It renders with ``messages``, ``tools``, ``documents``,
``add_generation_prompt`` and the tokenizer's named special tokens (``bos_token``, ...). The same
environment here gives the same text, so prompts tokenize to the same ids with or without
transformers installed.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any, Callable, Mapping, Sequence

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from node.models.errors import ModelError


class ChatTemplateError(ModelError):
    """The template does not compile, or it rejects this conversation (``raise_exception``)."""


class _GenerationBlock(jinja2.ext.Extension):
    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """The compiled template (cached: a gateway renders the same one for every request)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e}") from None


def render_chat(source: str, messages: Sequence[Mapping[str, Any]], *,
                add_generation_prompt: bool, special_tokens: Mapping[str, str],
                tools: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The conversation as text, ready to tokenize without adding special tokens."""
    template = compile_template(source)
    try:
        return template.render(messages=list(messages), tools=list(tools) if tools else None, documents=None,
                               add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(str(e)) from None
