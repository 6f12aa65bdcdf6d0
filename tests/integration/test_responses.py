"""``POST /v1/responses`` through the official ``openai`` package and the OpenAI Agents SDK, in
front of three real node processes serving the tiny model."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
from openai.types.responses import Response

from tests.integration.test_agents import PERSON, WEATHER
from tests.integration.test_gateway import _in_thread, _oa, open_gateway

TOOL = {"type": "function", **WEATHER["function"]}  # the Responses API's flat form


async def test_text_json_tools_and_previous_response_id(tiny_swarm, tiny_model, tmp_path):
    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        oa = _oa(base)
        create = oa.responses.create
        raw = await _in_thread(lambda: create.__self__.with_raw_response.create(
            model=model.model_id, input="Say hello.", instructions="Be brief.", max_output_tokens=12,
            temperature=0))
        Response.model_validate(json.loads(raw.text))  # the openai package's own type
        first = raw.parse()
        assert first.status in ("completed", "incomplete") and first.output[0].type == "message"
        assert first.output_text and first.usage.output_tokens <= 12
        # Streamed: the same text, as OpenAI's events.
        events = await _in_thread(lambda: list(create(model=model.model_id, input="Say hello.",
                                                      instructions="Be brief.", max_output_tokens=12,
                                                      temperature=0, stream=True)))
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] in ("response.completed", "response.incomplete")
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == first.output_text
        assert events[-1].response.output_text == first.output_text
        assert [e.sequence_number for e in events] == list(range(len(events)))

        # A conversation continued by id: the earlier turn is in the prompt.
        follow = await _in_thread(lambda: create(model=model.model_id, input="And again?", max_output_tokens=4,
                                                 previous_response_id=first.id, temperature=0))
        alone = await _in_thread(lambda: create(model=model.model_id, input="And again?", max_output_tokens=4,
                                                temperature=0))
        assert follow.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
        try:
            await _in_thread(lambda: create(model=model.model_id, input="x", previous_response_id="resp_nope"))
            raise AssertionError("no error")
        except openai.NotFoundError as exc:
            assert "resp_nope" in str(exc)

        # Structured output and a function call with its output across turns.
        fmt = {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}}
        person = await _in_thread(lambda: create(model=model.model_id, input="A person:", text=fmt,
                                                 max_output_tokens=200, temperature=0.8))
        jsonschema.validate(json.loads(person.output_text), PERSON)
        called = await _in_thread(lambda: create(model=model.model_id, input="Weather in Oslo?", tools=[TOOL],
                                                 tool_choice="required", max_output_tokens=200, temperature=0))
        call = called.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
        answered = await _in_thread(lambda: create(
            model=model.model_id, previous_response_id=called.id, tools=[TOOL], tool_choice="none",
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"celsius": 3}'}],
            max_output_tokens=6, temperature=0))
        assert answered.output[0].type == "message" and answered.output_text
        streamed = await _in_thread(lambda: list(create(model=model.model_id, input="Weather in Oslo?", tools=[TOOL],
                                                        tool_choice="required", max_output_tokens=200,
                                                        temperature=0, stream=True)))
        done = [e.item for e in streamed if e.type == "response.output_item.done"]
        assert [(i.name, i.arguments) for i in done] == [(call.name, call.arguments)]
        # the call's item opens once its name is known, then its arguments come as generated
        kinds = [e.type for e in streamed]
        pieces = [e.delta for e in streamed if e.type == "response.function_call_arguments.delta"]
        assert len(pieces) > 1 and "".join(pieces) == call.arguments
        assert kinds.index("response.output_item.added") < kinds.index("response.function_call_arguments.delta")
        added = next(e.item for e in streamed if e.type == "response.output_item.added")
        assert (added.call_id, added.name) == (done[0].call_id, call.name)
        for bad in ({"include": ["reasoning.encrypted_content"]}, {"background": True},
                    {"tools": [{"type": "web_search"}]}):
            try:
                await _in_thread(lambda: create(model=model.model_id, input="x", **bad))
                raise AssertionError(f"no error for {bad}")
            except openai.BadRequestError as exc:
                assert exc.body["param"] == next(iter(bad))


async def test_an_agents_sdk_agent_calls_a_python_tool(tiny_swarm, tiny_model, tmp_path):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, RunConfig, Runner, function_tool

    calls = []

    @function_tool
    def get_weather(city: Literal["Paris", "Oslo", "Rome"], metric: bool) -> str:
        """The weather in a city.

        Args:
            city: the city.
            metric: degrees Celsius rather than Fahrenheit.
        """
        calls.append((city, metric))
        return get_weather_result(city, metric)

    def get_weather_result(city, metric):
        return f"It is 21 degrees {'C' if metric else 'F'} in {city}."

    async with open_gateway(tiny_swarm, tiny_model, tmp_path / "gw") as (_, base, model):
        client = openai.AsyncOpenAI(base_url=base, api_key="none", max_retries=0, timeout=120)
        agent = Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                      tool_use_behavior="stop_on_first_tool",  # a random model's prose would not end
                      model=OpenAIResponsesModel(model.model_id, client),
                      model_settings=ModelSettings(tool_choice="required", max_tokens=200, temperature=0))

        def run():
            import asyncio

            return asyncio.run(Runner.run(agent, "What is the weather in Paris?", max_turns=2,
                                          run_config=RunConfig(tracing_disabled=True)))

        result = await _in_thread(run)
    assert calls, "the agent never called its tool"
    assert result.final_output == get_weather_result(*calls[0])
    assert all(c in ("Paris", "Oslo", "Rome") and isinstance(m, bool) for c, m in calls)
