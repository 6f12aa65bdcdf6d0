"""Constrained decoding in the span engine (SPEC 9.8): the last span chooses only what a grammar
allows, in plain steps, window steps and batched decodes, and resumes a grammar mid-text."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

from node.client.grammars import json_schema_grammar, parse_tool_calls, tool_call_grammar
from node.engine.errors import BadInput
from node.engine.span import SpanEngine

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"], "additionalProperties": False}},
    "required": ["name", "age", "address"], "additionalProperties": False}
EOS = {0, 2}


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return Tokenizer.from_file(str(tiny_llama.path / "tokenizer.json"))


def _validate(obj, schema):
    """A small JSON-schema check of what SCHEMA uses (types, bounds, enums, required, extra)."""
    kind = schema.get("type")
    if "enum" in schema:
        assert obj in schema["enum"]
    if kind == "object":
        assert isinstance(obj, dict)
        assert set(schema.get("required", ())) <= set(obj)
        assert set(obj) <= set(schema["properties"])
        for k, v in obj.items():
            _validate(v, schema["properties"][k])
    elif kind == "string":
        assert isinstance(obj, str) and len(obj) <= schema.get("maxLength", 10**9)
    elif kind == "integer":
        assert isinstance(obj, int) and schema.get("minimum", -10**9) <= obj <= schema.get("maximum", 10**9)
    elif kind == "array":
        assert isinstance(obj, list) and len(obj) <= schema.get("maxItems", 10**9)
        for v in obj:
            _validate(v, schema["items"])


def _decode(engines, sid, prompt, n, grammar=None, temperature=0.0, seed=0, start=None):
    for e in engines:
        e.open_session(sid, 1, 256, sampling={"temperature": temperature, "seed": seed, "grammar": grammar,
                                              "grammar_start": start or len(prompt)} if grammar else
                       {"temperature": temperature, "seed": seed})
    ids, pos, out = torch.tensor([prompt]), torch.arange(len(prompt))[None], []
    for _ in range(n):
        x = ids
        for e in engines:
            x = e.step(sid, x, pos)
        out.append(int(x[0]))
        if out[-1] in EOS:
            break
        ids, pos = x[:, None], pos[:, -1:] + 1
    return out


@pytest.mark.parametrize("temperature,seed", [(0.0, 0), (1.0, 1), (1.0, 2), (0.7, 3)])
def test_constrained_output_always_parses_and_validates(tiny_llama, tok, temperature, seed):
    engines = [SpanEngine.load(tiny_llama, 0, 3), SpanEngine.load(tiny_llama, 3, 6)]
    prompt = tok.encode("Describe a person as JSON:").ids
    free = _decode(engines, "free", prompt, 40, temperature=temperature, seed=seed)
    with pytest.raises(ValueError):  # the random model left alone writes no JSON
        json.loads(tok.decode([t for t in free if t not in EOS]))
    out = _decode(engines, "c", prompt, 200, json_schema_grammar(SCHEMA), temperature, seed)
    assert out[-1] in EOS  # the grammar completed and the model had to stop
    _validate(json.loads(tok.decode(out[:-1])), SCHEMA)


def test_tool_calls_validate_and_parse(tiny_llama, tok):
    tools = [{"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}},
        {"name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a"]}}]
    engine = [SpanEngine.load(tiny_llama, 0, 6)]
    prompt = tok.encode("Call a tool:").ids
    out = _decode(engine, "t", prompt, 200, tool_call_grammar(tools, required=True, parallel=False))
    assert out[-1] in EOS
    calls = parse_tool_calls(tok.decode(out[:-1]))
    assert calls is not None and len(calls) == 1 and calls[0].name in {"get_weather", "add"}
    args = json.loads(calls[0].arguments)
    _validate(args, next(t for t in tools if t["name"] == calls[0].name)["parameters"])
    out = _decode(engine, "n", prompt, 200, tool_call_grammar(tools, required=True, only="add"),
                  temperature=1.0, seed=5)
    assert {c.name for c in parse_tool_calls(tok.decode(out[:-1]))} == {"add"}


def test_windows_never_keep_a_draft_the_grammar_forbids(tiny_llama, tok):
    """Greedy constrained windows give the plain constrained tokens, whatever the drafts."""
    engines = [SpanEngine.load(tiny_llama, 0, 2), SpanEngine.load(tiny_llama, 2, 6)]
    grammar = json_schema_grammar(SCHEMA)
    prompt = tok.encode("JSON please:").ids
    expected = _decode(engines, "plain", prompt, 200, grammar)
    for e in engines:
        e.open_session("w", 1, 256, sampling={"grammar": grammar, "grammar_start": len(prompt)})
    x = torch.tensor([prompt])
    for e in engines:
        x = e.step("w", x, torch.arange(len(prompt))[None])
    out, kept, held, rejected = [int(x[0])], len(prompt), len(prompt), 0
    assert expected[-1] in EOS
    while out[-1] not in EOS and len(out) < len(expected):
        assert out == expected[:len(out)]
        at = len(out)
        # The right drafts, but every third one replaced by a token outside JSON ("Hello").
        drafts = [tok.encode("Hello").ids[0] if (at + j) % 3 == 2 else t
                  for j, t in enumerate(expected[at:at + 4])] or [5]
        x = torch.tensor([[out[-1], *drafts]])
        for e in engines:
            x = e.step("w", x, torch.arange(kept, kept + len(drafts) + 1)[None],
                       keep=kept if held != kept else None, draft=torch.tensor([drafts]))
        answer = x[0].tolist()
        a = 0
        while a < len(drafts) and answer[a] == drafts[a]:
            a += 1
        rejected += a < len(drafts)
        new = answer[:a + 1]
        if any(t in EOS for t in new):  # as the client does: the text ends at its end token
            new = new[:next(i for i, t in enumerate(new) if t in EOS) + 1]
        out += new
        held, kept = kept + len(drafts) + 1, kept + a + 1
    assert out == expected
    assert rejected > 2


def test_a_session_opened_mid_text_resumes_the_grammar(tiny_llama, tok):
    """A failover's replacement gets the text so far (grammar_prefix) and a replay of the
    cache: it goes on exactly as the first session would have."""
    engine = SpanEngine.load(tiny_llama, 0, 6)
    grammar = json_schema_grammar(SCHEMA)
    prompt = tok.encode("JSON:").ids
    expected = _decode([engine], "a", prompt, 200, grammar)
    cut = len(expected) // 2
    engine.open_session("b", 1, 256, sampling={"grammar": grammar, "grammar_start": len(prompt),
                                               "grammar_prefix": [expected[:cut]]})
    ids = prompt + expected[:cut]
    x = engine.step("b", torch.tensor([ids]), torch.arange(len(ids))[None])  # the replay
    out = [int(x[0])]
    while out[-1] not in EOS:
        x = engine.step("b", x[:, None], torch.tensor([[len(ids) + len(out) - 1]]))
        out.append(int(x[0]))
    assert expected[:cut] + out == expected
    # Without the prefix the grammar would start over at the replay's end: a gap, refused
    # before any forward runs.
    engine.open_session("c", 1, 256, sampling={"grammar": grammar, "grammar_start": len(prompt)})
    engine.step("c", torch.tensor([prompt[:-1]]), torch.arange(len(prompt) - 1)[None])  # a chunk
    with pytest.raises(BadInput, match="expects the token of position"):
        engine.step("c", torch.tensor([[prompt[-1], 5]]), torch.tensor([[len(prompt) - 1, len(prompt)]]))
    assert engine._get("c").length == len(prompt) - 1


def test_batched_decodes_keep_each_sessions_grammar(tiny_llama, tok):
    engine = SpanEngine.load(tiny_llama, 0, 6)
    grammar = json_schema_grammar(SCHEMA)
    prompt = tok.encode("JSON:").ids
    alone = _decode([engine], "alone", prompt, 200, grammar)
    free = _decode([engine], "free_alone", prompt, len(alone))
    for sid, g in (("g", grammar), ("f", None)):
        engine.open_session(sid, 1, 256, sampling={"grammar": g, "grammar_start": len(prompt)} if g else None)
    toks = {sid: [int(engine.step(sid, torch.tensor([prompt]), torch.arange(len(prompt))[None])[0])]
            for sid in ("g", "f")}
    while len(toks["g"]) < len(alone):
        n = len(toks["g"])
        items = [(sid, torch.tensor([[toks[sid][-1]]]), torch.tensor([[len(prompt) + n - 1]]), None)
                 for sid in ("g", "f")]
        for sid, res in zip(("g", "f"), engine.step_batch(items)):
            assert not isinstance(res, Exception), res
            toks[sid].append(int(res[0]))
    assert toks["g"] == alone
    assert toks["f"] == free


def test_bad_grammars_are_bad_input(tiny_llama):
    engine = SpanEngine.load(tiny_llama, 0, 6)
    for grammar, match in [("not json", "not JSON"), ('{"x": 1}', "grammars"),
                           ('{"grammars": [{"json_schema": {"type": "nope"}}]}', "does not compile")]:
        with pytest.raises(BadInput, match=match):
            engine.open_session("s", 1, 64, sampling={"grammar": grammar, "grammar_start": 1})
    # A span that does not sample ignores the grammar (only the last span chooses tokens).
    SpanEngine.load(engine.source, 0, 3).open_session("s", 1, 64, sampling={"grammar": "x", "grammar_start": 1})


def _reference_logprobs(source, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=torch.float32)
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("window", [False, True])
def test_logprobs_are_transformers_log_softmax(tiny_llama, tok, window):
    """SPEC 9.9: the chosen token's log-probability and the top k, as transformers computes them
    (temperature 1, no grammar), in plain and window steps alike."""
    engines = [SpanEngine.load(tiny_llama, 0, 3), SpanEngine.load(tiny_llama, 3, 6)]
    prompt = tok.encode("The weather today").ids
    for e in engines:
        e.open_session("lp", 1, 64, sampling={"temperature": 1.0, "seed": 3, "logprobs": 5})
    x = torch.tensor([prompt])
    for e in engines:
        x = e.step("lp", x, torch.arange(len(prompt))[None])
    assert engines[0].take_logprobs("lp") is None  # only the sampling span reports them
    values, ids = engines[1].take_logprobs("lp")
    text = prompt + [int(x[0])]
    if window:  # one more pass: the next token and two drafts
        drafts = [5, 6]
        x = torch.tensor([[int(x[0]), *drafts]])
        for e in engines:
            x = e.step("lp", x, torch.arange(len(prompt), len(prompt) + 3)[None], draft=torch.tensor([drafts]))
        values, ids = engines[1].take_logprobs("lp")
    ref = _reference_logprobs(tiny_llama, text + ([5, 6] if window else []))
    from node.engine.tensors import to_torch

    values, ids = to_torch(values), to_torch(ids)
    rows = ref[-3:] if window else ref[len(prompt) - 1:len(prompt)]
    chosen = x[0] if window else x
    values, ids = values.reshape(len(rows), -1), ids.reshape(len(rows), -1)
    for r, (v, i) in enumerate(zip(values, ids)):
        assert abs(float(v[0]) - float(rows[r][int(chosen.reshape(-1)[r])])) < 1e-4
        top = rows[r].topk(5)
        assert i.tolist() == top.indices.tolist()
        assert torch.allclose(v[1:], top.values, atol=1e-4)
    assert engines[1].take_logprobs("lp") is None  # taken once
