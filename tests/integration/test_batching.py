"""Concurrent generations through three real nodes (their steps batched) equal each run alone."""

from __future__ import annotations

import trio

from node.client.swarm import PREFILL_CHUNK, SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from protocol.messages import SamplingParams

PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 5140, 30],
    [1, 9690, 198, 28, 7],
    [1, 42],
    [1, 3000, 3001, 3002, 3003, 3004, 3005, 3006, 3007, 3008, 3009],
    [1] + [(7 * i) % 40000 + 100 for i in range(PREFILL_CHUNK + 40)],  # chunked prefill
]
NEW = [12, 7, 10, 9, 6]


async def test_concurrent_generations_equal_solo(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    hot = SamplingParams(temperature=1.2, top_p=0.9, seed=5)
    async with SwarmClient.open([tiny_swarm[0].addr]) as client:
        route = await client.wait_for_route(source.model_id, 60)
        solo_hot = await client.generate(source.model_id, [PROMPTS[0]], max_new_tokens=10,
                                         sampling=hot, route=route)
        got: dict[int, list[int]] = {}

        async def one(i: int, prompt: list[int], n: int, sampling: SamplingParams) -> None:
            res = await client.generate(source.model_id, [prompt], max_new_tokens=n,
                                        sampling=sampling, route=route)
            got[i] = res.token_ids[0]

        async with trio.open_nursery() as nursery:
            for i, (p, n) in enumerate(zip(PROMPTS, NEW)):
                nursery.start_soon(one, i, p, n, SamplingParams())
            nursery.start_soon(one, 99, PROMPTS[0], 10, hot)  # sampled rows share batches too
    for i, (p, n) in enumerate(zip(PROMPTS, NEW)):
        assert got[i] == reference_greedy(source, p, n), i
    assert got[99] == solo_hot.token_ids[0]
