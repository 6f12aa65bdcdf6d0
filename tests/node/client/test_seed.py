"""A sampled generation without a seed draws a fresh one (issue 15: it was 0 for everyone)."""

from __future__ import annotations

from protocol.messages import SamplingParams

from tests.node.client.inproc import open_swarm

PROMPT = [1, 504, 3458, 282, 4649]


async def test_two_unseeded_sampled_generations_differ(tiny_llama):
    # Before: SwarmClient.generate sent seed None, every node sampled with seed 0, and every
    # caller asking for randomness got the same text. 12 tokens at temperature 1.5 over the tiny
    # model's vocabulary coincide by chance with negligible probability.
    sampling = SamplingParams(temperature=1.5)
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        client = swarm.client()
        texts = [(await client.generate(swarm.model_id, [PROMPT], max_new_tokens=12,
                                        sampling=sampling)).token_ids[0] for _ in range(3)]
        seeded = [(await client.generate(swarm.model_id, [PROMPT], max_new_tokens=12,
                                         sampling=SamplingParams(temperature=1.5, seed=7))).token_ids[0]
                  for _ in range(2)]
    assert len({tuple(t) for t in texts}) == 3
    assert seeded[0] == seeded[1]  # a given seed is still reproducible
