"""ToolCallReader: tool calls read as their text arrives (node/client/grammars.py), which the
gateway streams as OpenAI's tool-call deltas."""

from __future__ import annotations

import json
import random

from node.client.grammars import TOOL_CLOSE, TOOL_OPEN, ToolCall, ToolCallReader, parse_tool_calls

# Two calls as tool_call_grammar writes them; the first one's arguments hold the close tag, the
# end marker and non-ASCII text inside strings, where they end nothing.
ARGS = json.dumps({"city": "Zürich}\n</tool_call>", "n": [1, {"a": "}"}]}, ensure_ascii=False)
TEXT = (f'{TOOL_OPEN}{{"name": "get_weather", "arguments": {ARGS}}}{TOOL_CLOSE}\n'
        f'{TOOL_OPEN}{{"name": "add", "arguments": {{"a": 1, "b": -2}}}}{TOOL_CLOSE}')
WANT = [ToolCall("get_weather", ARGS), ToolCall("add", '{"a": 1, "b": -2}')]


def feed_in_pieces(text: str, seed: int) -> tuple[ToolCallReader, list[tuple[str, int, str]]]:
    rng, reader, events, i = random.Random(seed), ToolCallReader(), [], 0
    while i < len(text):
        k = rng.randint(1, 7)
        events += reader.feed(text[i:i + k])
        i += k
    return reader, events


def test_any_split_reads_the_calls_parse_finds_with_their_text_as_generated() -> None:
    assert parse_tool_calls(TEXT) == WANT  # non-ASCII kept as written, not re-escaped
    for seed in range(100):
        reader, events = feed_in_pieces(TEXT, seed)
        assert not reader.broken and reader.closed == 2 and reader.calls == WANT
        # each call's name once, before any of its arguments, which assemble into its text
        assert [(k, v) for kind, k, v in events if kind == "call"] == [(0, "get_weather"), (1, "add")]
        for k, call in enumerate(WANT):
            mine = [(n, kind, v) for n, (kind, i, v) in enumerate(events) if i == k]
            assert mine[0][1] == "call" and "".join(v for _, kind, v in mine[1:]) == call.arguments
        assert len([e for e in events if e[0] == "arguments"]) > 2  # in pieces, as they came


def test_text_answers_and_cut_calls() -> None:
    reader = ToolCallReader()
    assert reader.feed("<tool") == [] and not reader.broken  # could still be a call
    assert reader.feed("kit>") == [] and reader.broken  # it is not
    assert parse_tool_calls("The weather is fine.") is None
    cut = TEXT[:TEXT.index('"n": [')]
    reader, events = feed_in_pieces(cut, 0)
    assert reader.closed == 0 and reader.names == ["get_weather"] and not reader.broken
    assert "".join(v for kind, _, v in events if kind == "arguments") == cut[cut.index('{"city"'):]
    assert parse_tool_calls(cut) is None  # a call the budget cut short is no call
    assert parse_tool_calls(TEXT + "\n" + TOOL_OPEN + '{"name": "add", "argu') == WANT
