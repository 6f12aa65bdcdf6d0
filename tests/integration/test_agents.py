"""What agents use, through the gateway and the official ``openai`` package, in front of three
real node processes serving the tiny model: structured output and tool calls generated under a
grammar on the last node (SPEC 9.8), and a 400 naming every field the gateway cannot honour."""

from __future__ import annotations

import functools
import json

import httpx
import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.integration.test_gateway import _in_thread, _oa, open_gateway

PROMPTS = ["Describe a person.", "Give me a city and its population.", "What is 2 + 2?",
           "Write a haiku about the sea."]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "address": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
        "required": ["city", "zip"], "additionalProperties": False},
    "pets": {"type": "array", "items": {"enum": ["cat", "dog", "fish"]}, "maxItems": 3}},
    "required": ["name", "age", "address", "pets"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -999, "maximum": 999},
                                     "b": {"type": "integer", "minimum": -999, "maximum": 999}},
    "required": ["a", "b"], "additionalProperties": False}}}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"], "add": ADD["function"]["parameters"]}


async def test_json_mode_and_schema_always_validate(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        oa = _oa(base)
        chat = functools.partial(oa.chat.completions.create, model=model.model_id, max_tokens=200)
        for i, prompt in enumerate(PROMPTS):
            messages = [{"role": "user", "content": prompt}]
            free = await _in_thread(lambda: chat(messages=messages, max_tokens=30, temperature=0))
            with pytest.raises(ValueError):  # the random model writes no JSON unless made to
                json.loads(free.choices[0].message.content)
            resp = await _in_thread(lambda: chat(messages=messages, response_format={"type": "json_object"},
                                                 temperature=0 if i % 2 else 1.0, seed=i))
            text = resp.choices[0].message.content
            if resp.choices[0].finish_reason == "stop":  # a random model may write one key forever
                assert isinstance(json.loads(text), dict)
            else:
                assert text.startswith("{") and resp.usage.completion_tokens == 200
            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
            raw = await _in_thread(lambda: chat.func.__self__.with_raw_response.create(
                model=model.model_id, max_tokens=200, messages=messages, response_format=fmt,
                temperature=0 if i % 2 else 0.9, seed=10 + i))
            ChatCompletion.model_validate(json.loads(raw.text))  # the openai package's own type
            resp = raw.parse()
            assert resp.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(resp.choices[0].message.content), PERSON)
            chunks = await _in_thread(lambda: list(chat(messages=messages, response_format=fmt, stream=True,
                                                        temperature=0)))
            jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in chunks)), PERSON)


async def test_tool_calls_streamed_and_not_and_the_result_round_trip(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        oa = _oa(base)
        chat = functools.partial(oa.chat.completions.create, model=model.model_id, max_tokens=200,
                                 temperature=0)
        messages = [{"role": "user", "content": "What is the weather in Paris?"}]
        for choice, parallel in [("required", False), ({"type": "function", "function": {"name": "add"}}, True),
                                 ("required", True)]:
            resp = await _in_thread(lambda: chat(messages=messages, tools=[WEATHER, ADD], tool_choice=choice,
                                                 parallel_tool_calls=parallel))
            msg = resp.choices[0].message
            assert resp.choices[0].finish_reason == "tool_calls" and msg.content is None
            assert msg.tool_calls and (parallel or len(msg.tool_calls) == 1)
            for call in msg.tool_calls:
                assert call.type == "function" and call.id.startswith("call_")
                if isinstance(choice, dict):
                    assert call.function.name == "add"
                jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
            # The stream's tool-call deltas, keyed by index, assemble into the same calls.
            chunks = await _in_thread(lambda: list(chat(messages=messages, tools=[WEATHER, ADD], tool_choice=choice,
                                                        parallel_tool_calls=parallel, stream=True)))
            calls: dict[int, dict] = {}
            pieces: dict[int, int] = {}
            for c in chunks:
                for d in (c.choices[0].delta.tool_calls or []) if c.choices else []:
                    got = calls.setdefault(d.index, {"name": "", "arguments": ""})
                    got["name"] += (d.function.name or "") if d.function else ""
                    got["arguments"] += (d.function.arguments or "") if d.function else ""
                    pieces[d.index] = pieces.get(d.index, 0) + bool(d.function and d.function.arguments)
                    assert (d.id is not None) == (pieces[d.index] == 0)  # the id and name come first, once
            assert [calls[i] for i in sorted(calls)] == [
                {"name": t.function.name, "arguments": t.function.arguments} for t in msg.tool_calls]
            assert all(n > 1 for n in pieces.values()), pieces  # the arguments come as they are generated
            assert chunks[-1].choices[0].finish_reason == "tool_calls"

        # The round trip: the call and its result go back, and the model answers in text.
        first = await _in_thread(lambda: chat(messages=messages, tools=[WEATHER], tool_choice="required"))
        call = first.choices[0].message.tool_calls[0]
        history = [*messages, first.choices[0].message.model_dump(exclude_none=True),
                   {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
        answer = await _in_thread(lambda: chat(messages=history, tools=[WEATHER], tool_choice="none", max_tokens=8))
        assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls
        plain = await _in_thread(lambda: chat(messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=1))
        assert answer.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the call and result were read
        auto = await _in_thread(lambda: chat(messages=messages, tools=[WEATHER], max_tokens=60))
        if auto.choices[0].message.tool_calls:  # the model may answer either way: both well-formed
            jsonschema.validate(json.loads(auto.choices[0].message.tool_calls[0].function.arguments),
                                SCHEMAS["get_weather"])
        else:
            assert not auto.choices[0].message.content.startswith("<")
        # Streamed under "auto", the same answer: its text deltas or its tool-call deltas.
        streamed = await _in_thread(lambda: list(chat(messages=messages, tools=[WEATHER], max_tokens=60, stream=True)))
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        deltas = [d for c in streamed if c.choices for d in (c.choices[0].delta.tool_calls or [])]
        assert streamed[-1].choices[0].finish_reason == auto.choices[0].finish_reason
        if auto.choices[0].message.tool_calls:
            assert "".join(d.function.arguments or "" for d in deltas) == auto.choices[0].message.tool_calls[0].function.arguments
        else:
            assert not deltas and text == auto.choices[0].message.content


UNSUPPORTED = [
    ("n", 9), ("top_logprobs", 2), ("top_logprobs", 21), ("presence_penalty", 2.5),
    ("frequency_penalty", "high"), ("logit_bias", {"x": 10}), ("logit_bias", {"5": 101}), ("store", True), ("audio", {"voice": "x"}),
    ("functions", [{"name": "f"}]), ("tool_choice", "required"), ("response_format", {"type": "xml"}),
]


async def test_every_unsupported_field_is_a_400_naming_it(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        async with httpx.AsyncClient(base_url=base, timeout=60) as http:
            body = {"model": model.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "temperature": 0}
            for field, value in UNSUPPORTED:
                r = await http.post("/chat/completions", json={**body, field: value})
                assert r.status_code == 400, (field, r.text)
                assert r.json()["error"]["param"] == field
            # Their no-op values are accepted.
            ok = body | {"user": "agent-7", "logprobs": False, "presence_penalty": 0, "logit_bias": {}}
            assert (await http.post("/chat/completions", json=ok)).status_code == 200
            # What was answered shows in the gateway's own health and metrics.
            root = base.removesuffix("/v1")
            health = (await http.get(f"{root}/health")).json()
            assert health["status"] == "ok" and health["models"] == [model.model_id]
            metrics = (await http.get(f"{root}/metrics")).text
            assert f'shiza_gateway_requests_total{{endpoint="/v1/chat/completions",status="400"}} {len(UNSUPPORTED)}.0' in metrics
            assert 'shiza_gateway_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in metrics
            assert f'shiza_gateway_time_to_first_token_seconds_count{{model="{model.model_id}"}} 1.0' in metrics
            assert f'shiza_gateway_completion_tokens_total{{model="{model.model_id}"}} 2.0' in metrics
        with pytest.raises(openai.BadRequestError, match="echo"):
            await _in_thread(lambda: _oa(base).completions.create(model=model.model_id, prompt="a", echo=True,
                                                                  logprobs=1))
        oa = _oa(base)
        plain = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt="Once upon",
                                                               max_tokens=4, temperature=0))
        echoed = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt="Once upon",
                                                                max_tokens=4, temperature=0, echo=True))
        assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
        chunks = await _in_thread(lambda: list(oa.completions.create(model=model.model_id, prompt="Once upon",
                                                                     max_tokens=4, temperature=0, echo=True,
                                                                     stream=True)))
        assert "".join(c.choices[0].text for c in chunks) == echoed.choices[0].text


async def test_n_choices_share_the_prompt_streamed_and_not(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        oa = _oa(base)
        messages = [{"role": "user", "content": "Tell me a story."}]
        chat = functools.partial(oa.chat.completions.create, model=model.model_id, messages=messages, max_tokens=12)
        one = await _in_thread(lambda: chat(temperature=0))
        greedy = await _in_thread(lambda: chat(temperature=0, n=3))
        assert [c.index for c in greedy.choices] == [0, 1, 2]
        assert {c.message.content for c in greedy.choices} == {one.choices[0].message.content}
        assert greedy.usage.completion_tokens == 3 * one.usage.completion_tokens
        sampled = await _in_thread(lambda: chat(temperature=1.0, seed=4, n=3))
        assert len({c.message.content for c in sampled.choices}) > 1  # rows sample independently
        chunks = await _in_thread(lambda: list(chat(temperature=1.0, seed=4, n=3, stream=True)))
        texts = ["", "", ""]
        for c in chunks:
            for ch in c.choices:
                texts[ch.index] += ch.delta.content or ""
        assert texts == [c.message.content for c in sampled.choices]
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
        people = await _in_thread(lambda: chat(temperature=1.0, n=3, response_format=fmt, max_tokens=200))
        for c in people.choices:  # each row under its own grammar state
            jsonschema.validate(json.loads(c.message.content), PERSON)
        done = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt="Once", n=2,
                                                              max_tokens=5, temperature=0))
        assert [c.index for c in done.choices] == [0, 1] and done.choices[0].text == done.choices[1].text


async def test_logprobs_match_transformers(tiny_swarm, tiny_model, tmp_path):
    """Computed on the sampling node (SPEC 9.9), through window steps too (the gateway speculates
    by default): each token's and the top tokens' log-probabilities equal transformers'
    log-softmax within 1e-4."""
    import torch
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        oa = _oa(base)
        prompt = model.tokenizer.encode("one two three one two three one two")
        with torch.inference_mode():
            first_id = int(ref_model(input_ids=torch.tensor([prompt])).logits[0, -1].argmax())
        done = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt=prompt, max_tokens=10,
                                                              temperature=0, logprobs=3))
        chat = await _in_thread(lambda: oa.chat.completions.create(
            model=model.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
            logprobs=True, top_logprobs=2))
        streamed = await _in_thread(lambda: list(oa.chat.completions.create(
            model=model.model_id, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0,
            logprobs=True, top_logprobs=2, stream=True)))
        # logit_bias, applied on the sampling node: +100 all but forces a token, -100 bans one.
        forced = model.tokenizer.encode(" Paris", add_special_tokens=False)[-1]
        biased = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt="x", max_tokens=4,
                                                                temperature=0, logit_bias={str(forced): 100}))
        assert biased.choices[0].text == model.tokenizer.decode([forced] * 4)
        banned = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt=prompt, max_tokens=1,
                                                                temperature=0, logprobs=1,
                                                                logit_bias={str(first_id): -100}))
    ids = list(prompt)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == done.usage.completion_tokens - (done.choices[0].finish_reason == "stop")
    for j, token in enumerate(lp.tokens):
        with torch.inference_mode():
            ref = torch.log_softmax(ref_model(input_ids=torch.tensor([ids])).logits[0, -1].float(), dim=-1)
        best = int(ref.argmax())
        assert token == model.tokenizer.decode([best])
        assert abs(lp.token_logprobs[j] - float(ref[best])) < 1e-4
        top = ref.topk(3)
        expected = {model.tokenizer.decode([int(t)]): float(v) for t, v in zip(top.indices, top.values)}
        assert lp.top_logprobs[j].keys() == expected.keys()
        assert all(abs(lp.top_logprobs[j][k] - v) < 1e-4 for k, v in expected.items())
        ids.append(best)
    content = chat.choices[0].logprobs.content
    assert content and all(len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6
                           for c in content)  # greedy: the chosen token is the most likely
    assert "".join(c.token for c in content) == chat.choices[0].message.content
    got = [c for ch in streamed if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in got] == [(c.token, c.logprob) for c in content]
    # streamed, each chunk carries its own tokens' log-probabilities, not all of them at the end
    carrying = [ch.choices[0] for ch in streamed if ch.choices and ch.choices[0].logprobs]
    assert len(carrying) > 1
    assert all("".join(c.token for c in ch.logprobs.content) == ch.delta.content for ch in carrying if ch.delta.content)
    assert banned.choices[0].logprobs.tokens[0] != lp.tokens[0]  # the greedy first token, banned


async def test_penalties_on_the_sampling_node_match_a_reference(tiny_swarm, tiny_model, tmp_path):
    """presence_penalty / frequency_penalty (SPEC 9.10) through the gateway, greedy, speculating
    by default: the tokens are transformers' greedy tokens under OpenAI's penalty rule, computed
    here from the raw logits, and differ from the unpenalized ones (negative penalties: the tiny
    random model does not repeat itself unasked)."""
    import torch
    from transformers import AutoModelForCausalLM

    ref_model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        oa = _oa(base)
        prompt = model.tokenizer.encode("one two three one two three one two")
        plain = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt=prompt, max_tokens=12,
                                                               temperature=0))
        done = await _in_thread(lambda: oa.completions.create(model=model.model_id, prompt=prompt, max_tokens=12,
                                                              temperature=0, presence_penalty=-1.7,
                                                              frequency_penalty=-0.3))
    ids, counts = list(prompt), torch.zeros(ref_model.config.vocab_size)
    want = []
    for _ in range(done.usage.completion_tokens):
        with torch.inference_mode():
            logits = ref_model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        best = int((logits + 0.3 * counts + 1.7 * (counts > 0).float()).argmax())
        counts[best] += 1
        want.append(best)
        ids.append(best)
    assert done.choices[0].text == model.tokenizer.decode(want)
    assert done.choices[0].text != plain.choices[0].text

