"""The sampling seed: a caller that gives none gets a fresh random one per request (before, every
such request sampled with seed 0, so everyone's "random" answers were the same); a given seed is
kept, so runs that pass one stay reproducible; greedy requests are unaffected."""

from __future__ import annotations

import json

import pytest

from protocol.messages import SamplingParams

from node.client.textgen import TextModel, generate_text, with_fresh_seed
from node.http.gateway import Gateway

from tests.node.client.inproc import open_swarm


@pytest.fixture(scope="module")
def text_model(tiny_llama) -> TextModel:
    return TextModel.load(str(tiny_llama.path))


async def _parse(gw: Gateway, body: dict):
    async def receive() -> dict:
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    return await gw.parse("/v1/completions", receive)


async def test_the_gateway_draws_a_seed_per_request_unless_given(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        gw = Gateway(swarm.client("gateway"), [text_model])
        body = {"model": text_model.model_id, "prompt": [1, 2, 3], "temperature": 1.0}
        seeds = [(await _parse(gw, body)).sampling.seed for _ in range(8)]
        assert None not in seeds and len(set(seeds)) == len(seeds)  # 63 random bits each
        assert (await _parse(gw, {**body, "seed": 5})).sampling.seed == 5
        assert (await _parse(gw, {**body, "temperature": 0})).sampling.seed is None  # greedy: no randomness


def test_with_fresh_seed():
    drawn = {with_fresh_seed(SamplingParams(temperature=0.7)).seed for _ in range(8)}
    assert None not in drawn and len(drawn) == 8
    assert all(0 <= s < 2**63 for s in drawn)
    assert with_fresh_seed(SamplingParams(temperature=0.7, seed=0)).seed == 0
    assert with_fresh_seed(SamplingParams(temperature=0.0)).seed is None


async def test_generate_text_sends_a_fresh_seed(tiny_llama, text_model):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        client = swarm.client("agent")
        sent: list[SamplingParams] = []
        real = client.generate

        async def recording(*args, **kwargs):
            sent.append(kwargs["sampling"])
            return await real(*args, **kwargs)

        client.generate = recording  # type: ignore[method-assign]
        for _ in range(2):
            await generate_text(client, text_model, "hi", raw=True, max_new_tokens=2,
                                sampling=SamplingParams(temperature=1.0))
        await generate_text(client, text_model, "hi", raw=True, max_new_tokens=2,
                            sampling=SamplingParams(temperature=1.0, seed=7))
    assert sent[0].seed is not None and sent[1].seed is not None and sent[0].seed != sent[1].seed
    assert sent[2].seed == 7
