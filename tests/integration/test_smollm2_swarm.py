"""The real model: three node processes serving SmolLM2 0:10, 10:20, 20:30 on loopback."""

from __future__ import annotations

import pytest

from node.client.swarm import SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.devtools.localswarm import start_chain, stop_all
from node.client.textgen import TextModel, generate_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_swarm(tmp_path_factory):
    resolve_model("smollm2-135m")  # convert once before three processes want it
    nodes = start_chain(tmp_path_factory.mktemp("smol"), [(0, 10), (10, 20), (20, 30)], timeout_s=300)
    yield nodes
    assert stop_all(nodes) == [0, 0, 0]


async def test_pipeline_equals_transformers_and_knows_paris(smol_swarm):
    model = TextModel.load("smollm2-135m")
    async with SwarmClient.open([smol_swarm[2].addr]) as client:
        route = await client.wait_for_route(model.model_id, 120, num_layers=model.num_layers)
        assert [(h.start, h.end) for h in route] == [(0, 10), (10, 20), (20, 30)]
        text, prompt_ids, result = await generate_text(
            client, model, "What is the capital of France?", max_new_tokens=16, route=route)
        # Without an EOS stop, for the token-for-token comparison with transformers.
        raw = await client.generate(model.model_id, [prompt_ids], max_new_tokens=12, route=route)
    assert "Paris" in text
    source = resolve_model("smollm2-135m")
    assert raw.token_ids[0] == reference_greedy(source, prompt_ids, 12)
    assert result.token_ids[0] == reference_greedy(source, prompt_ids, len(result.token_ids[0]))


async def test_padded_batch_on_the_real_model(smol_swarm):
    model = TextModel.load("smollm2-135m")
    prompts = [model.encode("What is the capital of France?"), model.encode("Name a colour.")]
    async with SwarmClient.open([smol_swarm[0].addr]) as client:
        await client.wait_for_route(model.model_id, 120, num_layers=model.num_layers)
        batch = await client.generate(model.model_id, prompts, max_new_tokens=8)
    source = resolve_model("smollm2-135m")
    assert batch.token_ids == reference_greedy(source, prompts, 8)
