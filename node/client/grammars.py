"""Grammars for constrained decoding (SPEC 9.8), built on the client without any grammar engine.

The node that samples compiles them with llguidance (node/engine/grammar.py); here they are
only llguidance's JSON form, ``{"grammars": [...]}``, written as text:

    json_schema_grammar(schema)     output that parses and validates against a JSON schema
    json_object_grammar()           any JSON object
    tool_call_grammar(tools, ...)   tool calls as <tool_call>{"name", "arguments"}</tool_call>

JSON comes out compact (``{"a": 1, "b": [2, 3]}``): llguidance's default flexible whitespace
lets a small model fill its whole budget with blank lines before it closes a brace.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

__all__ = [
    "TOOL_CLOSE", "TOOL_OPEN", "ToolCall", "json_object_grammar", "json_schema_grammar",
    "parse_tool_calls", "tool_call_grammar",
]

# How one tool call is written (the Hermes format, which Qwen's and many other models' chat
# templates use for tools): the gateway writes past calls the same way into the conversation.
TOOL_OPEN = "<tool_call>\n"
TOOL_CLOSE = "\n</tool_call>"
_COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


def _compact(schema: Mapping[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": {**_COMPACT, **schema.get("x-guidance", {})}}


def json_schema_grammar(schema: Mapping[str, Any]) -> str:
    """Output that is one JSON value valid under ``schema`` (a JSON Schema, as a mapping)."""
    if not isinstance(schema, Mapping):
        raise ValueError("a JSON schema must be an object")
    return json.dumps({"grammars": [{"json_schema": _compact(schema)}]})


def json_object_grammar() -> str:
    """Output that is one JSON object (OpenAI's ``response_format: json_object``)."""
    return json_schema_grammar({"type": "object"})


def _call_schema(name: str, parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    return {"type": "object", "properties": {"name": {"const": name},
                                             "arguments": dict(parameters or {"type": "object"})},
            "required": ["name", "arguments"], "additionalProperties": False}


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], *, required: bool, parallel: bool = True,
                      only: str | None = None) -> str:
    """Tool calls, each ``<tool_call>\\n{"name": N, "arguments": {...}}\\n</tool_call>`` with
    ``arguments`` valid under that function's ``parameters`` schema.

    ``tools``: ``{"name", "parameters"}`` per function. ``required``: at least one call
    (OpenAI's ``required`` and a named ``tool_choice``), else a plain text answer is allowed
    too (``auto``; such text may not begin with ``<``, which is how a reader tells the two
    apart as the tokens come). ``parallel``: several calls in a row; ``only``: that function.
    """
    chosen = [t for t in tools if only is None or t["name"] == only]
    if not chosen:
        raise ValueError(f"no tool named {only!r}" if only else "no tools")
    schema = {"anyOf": [_call_schema(t["name"], t.get("parameters")) for t in chosen]}
    if len(chosen) == 1:
        schema = _call_schema(chosen[0]["name"], chosen[0].get("parameters"))
    call = f"{json.dumps(TOOL_OPEN)} %json {json.dumps(_compact(schema))} {json.dumps(TOOL_CLOSE)}"
    calls = "call (\"\\n\" call)*" if parallel else "call"
    lines = [f"calls: {calls}", f"call: {call}"]
    if required:
        lines.insert(0, "start: calls")
    else:
        lines.insert(0, "start: calls | TEXT")
        lines.append(r"TEXT: /[^<](.|\n)*/")
    return json.dumps({"grammars": [{"lark_grammar": "\n".join(lines) + "\n"}]})


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI gives it


_CALL = re.compile(re.escape(TOOL_OPEN) + r"(.*?)" + re.escape(TOOL_CLOSE), re.S)


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in ``text`` if it consists of tool calls (as ``tool_call_grammar`` writes
    them), else None (a text answer)."""
    if not text.startswith(TOOL_OPEN):
        return None
    calls = []
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        calls.append(ToolCall(obj["name"], json.dumps(obj.get("arguments", {}))))
    return calls or None
