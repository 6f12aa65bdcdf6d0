"""Generation through a pipeline of three real node processes equals one-process transformers."""

from __future__ import annotations

import json
import subprocess
import sys


from node.client.swarm import SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from protocol.messages import SamplingParams

PROMPT_A = [1, 504, 3458, 282, 4649, 314, 5140, 30]
PROMPT_B = [1, 9690, 198, 28, 7]


async def test_three_nodes_equal_reference_greedy(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT_A, 12)
    async with SwarmClient.open([tiny_swarm[1].addr]) as client:
        route = await client.wait_for_route(source.model_id, 60)
        assert [(h.peer_id, h.start, h.end) for h in route] == [
            (n.peer_id, n.info["start"], n.info["end"]) for n in tiny_swarm
        ]
        result = await client.generate(source.model_id, [PROMPT_A], max_new_tokens=12, route=route)
    assert result.token_ids[0] == expected
    assert result.ttft_s > 0


async def test_padded_batch_equals_each_prompt_alone(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    async with SwarmClient.open([tiny_swarm[0].addr]) as client:
        await client.wait_for_route(source.model_id, 60)
        batch = await client.generate(source.model_id, [PROMPT_A, PROMPT_B], max_new_tokens=8)
        alone_b = await client.generate(source.model_id, [PROMPT_B], max_new_tokens=8)
    assert batch.token_ids[0] == reference_greedy(source, PROMPT_A, 8)
    assert batch.token_ids[1] == alone_b.token_ids[0] == reference_greedy(source, PROMPT_B, 8)


async def test_seeded_sampling_is_reproducible(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    hot = lambda seed: SamplingParams(temperature=1.5, top_p=0.95, seed=seed)  # noqa: E731
    async with SwarmClient.open([tiny_swarm[2].addr]) as client:
        await client.wait_for_route(source.model_id, 60)
        a = await client.generate(source.model_id, [PROMPT_A], max_new_tokens=16, sampling=hot(7))
        b = await client.generate(source.model_id, [PROMPT_A], max_new_tokens=16, sampling=hot(7))
        c = await client.generate(source.model_id, [PROMPT_A], max_new_tokens=16, sampling=hot(8))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_generate_cli_json(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    proc = subprocess.run(
        [sys.executable, "-m", "node", "generate", "--model", str(tiny_model), "--raw", "--json",
         "--max-new-tokens", "6", "--bootstrap", tiny_swarm[0].addr, "The capital of France is"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["token_ids"] == reference_greedy(source, out["prompt_token_ids"], 6)[: len(out["token_ids"])]
    assert [(r["start"], r["end"]) for r in out["route"]] == [(0, 2), (2, 4), (4, 6)]
    assert {r["peer"] for r in out["route"]} == {n.peer_id for n in tiny_swarm}
    assert set(out) >= {"text", "prompt_token_ids", "token_ids", "route", "ttft_s", "tokens_per_s"}


def test_generate_cli_names_missing_layers(tiny_swarm, tmp_path):
    from node.engine.testing import make_tiny_model

    other = make_tiny_model(tmp_path / "other", seed=5, num_layers=4)
    proc = subprocess.run(
        [sys.executable, "-m", "node", "generate", "--model", str(other), "--raw", "--wait", "3",
         "--bootstrap", tiny_swarm[0].addr, "hello"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 3
    assert "missing layers" in proc.stderr
