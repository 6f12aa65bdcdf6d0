"""What agent frameworks send beyond plain chat: structured output and tool calls (OpenAI's
shapes), turned into a conversation, a grammar (SPEC 9.8) and back into OpenAI's answer.

    response_format   {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema":
                      {"name", "schema", "strict"}}: the output parses (and validates) every time
    tools             [{"type": "function", "function": {"name", "description", "parameters"}}]
    tool_choice       "auto" (default with tools) | "none" | "required" | {"type": "function",
                      "function": {"name"}}
    parallel_tool_calls  true (default): several calls in one answer

Tools reach the model through its chat template when the template renders ``tools``, else as a
system message that lists them and shows the call format; past calls and tool results (role
``tool``) are written into the conversation in the same format (node/client/grammars.py). The
arguments of every call are generated under the function's JSON schema, so they validate.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from node.client.grammars import (
    TOOL_CLOSE, TOOL_OPEN, ToolCall, json_object_grammar, json_schema_grammar, parse_tool_calls,
    tool_call_grammar,
)

__all__ = ["BadField", "Tools", "output_grammar", "parse_tools", "render_conversation", "answer_kind", "tool_call_id", "tool_calls_json"]

MAX_TOOLS = 64
MAX_NAME = 64


class BadField(ValueError):
    """A request field the gateway cannot honour: a 400 naming ``param``."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Tools:
    functions: tuple[Mapping[str, Any], ...]  # OpenAI's "function" objects
    choice: str  # "auto", "required", "none" or "function"
    only: str | None = None  # the named function of a {"type": "function"} choice
    parallel: bool = True

    @property
    def active(self) -> bool:
        """Whether the answer may hold tool calls."""
        return self.choice != "none"

    @property
    def required(self) -> bool:
        return self.choice in ("required", "function")

    def grammar(self) -> str | None:
        if not self.active:
            return None
        specs = [{"name": f["name"], "parameters": f.get("parameters")} for f in self.functions]
        return tool_call_grammar(specs, required=self.required, parallel=self.parallel, only=self.only)


def parse_tools(body: Mapping[str, Any]) -> Tools | None:
    """The request's tools, checked; None when it has none."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if body.get("functions") is not None or body.get("function_call") is not None:
        raise BadField("functions", "'functions' and 'function_call' are deprecated: use 'tools' and "
                                    "'tool_choice'")
    if not tools:
        if choice not in (None, "none"):
            raise BadField("tool_choice", "'tool_choice' needs 'tools'")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadField("tools", f"'tools' must be a list of at most {MAX_TOOLS} tools")
    functions = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(fn, dict):
            raise BadField("tools", f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > MAX_NAME or not all(
                c.isalnum() or c in "_-" for c in name):
            raise BadField("tools", f"tools[{i}].function.name must be 1-{MAX_NAME} letters, digits, _ or -")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadField("tools", f"tools[{i}].function.parameters must be a JSON schema object")
        functions.append(fn)
    if len({f["name"] for f in functions}) != len(functions):
        raise BadField("tools", "two tools have the same name")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise BadField("parallel_tool_calls", "'parallel_tool_calls' must be a boolean")
    if choice is None or choice in ("auto", "none", "required"):
        return Tools(tuple(functions), choice or "auto", parallel=parallel)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise BadField("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' or "
                                      "{'type': 'function', 'function': {'name': ...}}")
    if name not in {f["name"] for f in functions}:
        raise BadField("tool_choice", f"'tool_choice' names {name!r}, which is not among 'tools'")
    return Tools(tuple(functions), "function", only=name, parallel=parallel)


def output_grammar(body: Mapping[str, Any], tools: Tools | None) -> str | None:
    """The grammar the answer is generated under: the tools' or the response format's."""
    fmt = body.get("response_format")
    grammar = None
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            grammar = json_object_grammar()
        elif kind == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise BadField("response_format", "'response_format.json_schema' needs a 'name'")
            if schema is not None and not isinstance(schema, dict):
                raise BadField("response_format", "'response_format.json_schema.schema' must be an object")
            grammar = json_schema_grammar(schema if schema is not None else {})
        elif kind != "text":
            raise BadField("response_format", "'response_format.type' must be 'text', 'json_object' or "
                                              "'json_schema'")
    if tools is not None and tools.active:
        if grammar is not None:
            raise BadField("response_format", "'response_format' and 'tools' together are not supported")
        return tools.grammar()
    return grammar


def _system_text(functions: Sequence[Mapping[str, Any]]) -> str:
    listed = json.dumps([{"type": "function", "function": dict(f)} for f in functions])
    return ("You may call functions to answer. They are listed here as JSON:\n" + listed + "\n"
            "To call one, answer only with " + TOOL_OPEN
            + '{"name": <function name>, "arguments": <arguments as a JSON object>}' + TOOL_CLOSE)


def _call_text(calls: Any, where: str) -> str:
    if not isinstance(calls, list):
        raise BadField("messages", f"{where}.tool_calls must be a list")
    parts = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise BadField("messages", f"{where}.tool_calls: each call needs function.name")
        try:
            args = json.loads(fn.get("arguments") or "{}")
        except ValueError:
            raise BadField("messages", f"{where}.tool_calls: arguments must be JSON text") from None
        parts.append(TOOL_OPEN + json.dumps({"name": fn["name"], "arguments": args}) + TOOL_CLOSE)
    return "\n".join(parts)


def render_conversation(messages: Sequence[Mapping[str, Any]], contents: Sequence[str],
                        tools: Tools | None, template_takes_tools: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The conversation for the chat template (each message's text content given) and the
    tools for a template that renders them (None otherwise): past tool calls become call text,
    tool results stay in role ``tool``; without a tools-aware template, a system message lists
    the tools."""
    conv: list[dict[str, Any]] = []
    for i, (m, text) in enumerate(zip(messages, contents)):
        role = "system" if m["role"] == "developer" else m["role"]
        if role == "assistant" and m.get("tool_calls"):
            calls = _call_text(m["tool_calls"], f"messages[{i}]")
            text = f"{text}\n{calls}" if text else calls
        conv.append({"role": role, "content": text})
    if tools is None or not tools.active:
        return conv, None
    if template_takes_tools:
        return conv, [{"type": "function", "function": dict(f)} for f in tools.functions]
    system = _system_text(tools.functions)
    if conv and conv[0]["role"] == "system":
        conv[0] = {"role": "system", "content": conv[0]["content"] + "\n\n" + system}
    else:
        conv.insert(0, {"role": "system", "content": system})
    return conv, None


def tool_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def answer_kind(tools: Tools | None) -> str:
    """What a streamed answer is before its first piece: "text", "calls", or "?" when the
    first character will tell (``auto``: a text answer may not begin with ``<``)."""
    if tools is None or not tools.active:
        return "text"
    return "calls" if tools.required else "?"


def tool_calls_json(calls: Sequence[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's ``tool_calls`` of an assistant message, each with a fresh id."""
    return [{"id": tool_call_id(), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def answer_calls(text: str, tools: Tools | None) -> list[ToolCall] | None:
    """The tool calls the answer consists of, or None for a text answer."""
    if tools is None or not tools.active:
        return None
    return parse_tool_calls(text)
