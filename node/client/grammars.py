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
    "TOOL_CLOSE", "TOOL_OPEN", "ToolCall", "ToolCallReader", "json_object_grammar", "json_schema_grammar",
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


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """The calls in ``text`` if it consists of tool calls (as ``tool_call_grammar`` writes
    them), else None (a text answer). Each call's arguments are its JSON text as generated, so a
    stream that carried them as they came (``ToolCallReader``) carried the same text; a call
    cut short (no close tag: the token budget ran out) is left out."""
    if not text.startswith(TOOL_OPEN):
        return None
    reader = ToolCallReader()
    reader.feed(text)
    calls = reader.calls[:reader.closed]
    for c in calls:
        try:
            json.loads(c.arguments)
        except ValueError:
            return None
    return calls or None


_HEAD = re.compile(r'\{"name": ("[^"\\]*"), "arguments": ')
_END = "}" + TOOL_CLOSE  # the call object's brace, then the close tag


class ToolCallReader:
    """Reads tool calls as their text arrives, so that a stream can carry each call's name as
    soon as it is known and its arguments as they are generated (OpenAI's tool-call deltas).

    ``feed(piece)`` returns what the piece completed: ``("call", index, name)`` once a call's
    name is known, ``("arguments", index, text)`` for each further part of its arguments' JSON
    text. It relies on the form ``tool_call_grammar`` forces: compact JSON, ``name`` before
    ``arguments``, and no newline inside the JSON (JSON escapes it inside strings), so the
    first ``}\n</tool_call>`` after the arguments ends the call. Text that is not in that form
    stops the reader (``broken``); ``calls`` holds what it read, equal to ``parse_tool_calls``
    of the whole text once every call is closed.
    """

    def __init__(self) -> None:
        self._buf = ""
        self._phase = "open"  # open -> head -> arguments -> (between -> open ...)
        self._args: list[str] = []
        self.names: list[str] = []
        self.closed = 0
        self.broken = False

    @property
    def calls(self) -> list[ToolCall]:
        return [ToolCall(n, a) for n, a in zip(self.names, self._args)]

    def feed(self, piece: str) -> list[tuple[str, int, str]]:
        events: list[tuple[str, int, str]] = []
        self._buf += piece
        while not self.broken:
            if self._phase in ("open", "between"):
                want = TOOL_OPEN if self._phase == "open" else "\n" + TOOL_OPEN
                if len(self._buf) < len(want):
                    self.broken = not want.startswith(self._buf)
                    break
                if not self._buf.startswith(want):
                    self.broken = True
                    break
                self._buf = self._buf[len(want):]
                self._phase = "head"
            elif self._phase == "head":
                m = _HEAD.match(self._buf)
                if m is None:
                    head = '{"name": "'
                    self.broken = not (head.startswith(self._buf) or self._buf.startswith(head)) or "\n" in self._buf
                    break
                self.names.append(json.loads(m.group(1)))
                self._args.append("")
                events.append(("call", len(self.names) - 1, self.names[-1]))
                self._buf = self._buf[m.end():]
                self._phase = "arguments"
            else:
                end = self._buf.find(_END)
                if end >= 0:
                    text, self._buf = self._buf[:end], self._buf[end + len(_END):]
                else:  # keep back what may be the start of the end
                    keep = next((k for k in range(min(len(_END) - 1, len(self._buf)), 0, -1)
                                 if _END.startswith(self._buf[-k:])), 0)
                    text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                if text:
                    self._args[-1] += text
                    events.append(("arguments", len(self.names) - 1, text))
                if end < 0:
                    break
                self.closed += 1
                self._phase = "between"
        return events
