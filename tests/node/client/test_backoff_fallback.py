"""When every replica of a span is backed off, routing tries them again instead of giving up
(issue 15's chaos run: one SIGSTOP under 8 sessions shut out healthy replicas for minutes), but
never a node the client caught lying."""

from __future__ import annotations

import time

import pytest

from node.client.errors import NoRoute

from tests.node.client.inproc import open_swarm, reference

PROMPT = [1, 504, 3458, 282, 4649]


async def test_backed_off_replicas_are_tried_again_when_nothing_else_serves(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 3), (0, 3), (3, 6)]) as swarm:
        client = swarm.client()
        await client.records(swarm.model_id)
        now = time.monotonic()
        for node in swarm.nodes[:2]:  # both replicas of 0:3 stalled a moment ago
            client.health.failed(node.peer_id, now)
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=4)
        assert result.token_ids[0] == reference(tiny_llama, PROMPT, 4)
        assert result.route[0].peer_id in {n.peer_id for n in swarm.nodes[:2]}


async def test_a_distrusted_node_is_never_the_fallback(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        client = swarm.client()
        await client.records(swarm.model_id)
        client.health.distrust(swarm.nodes[0].peer_id, time.monotonic(), 3600.0)
        with pytest.raises(NoRoute) as err:
            await client.generate(swarm.model_id, [PROMPT], max_new_tokens=2)
        assert err.value.missing == [(0, 3)]


async def test_a_peer_that_just_refused_is_not_asked_again_in_the_same_generation(tiny_llama):
    # The fallback must not turn one refusal into a retry loop on the same peer (each refused
    # open may be a strike there): the generation ends with that peer's own error.
    from protocol.errors import NotAllowed

    from node.serve.server import ServerLimits

    async with open_swarm(tiny_llama, [(0, 6)], limits=ServerLimits(allow_peers=frozenset())) as swarm:
        client = swarm.client()
        with pytest.raises(NotAllowed):
            await client.generate(swarm.model_id, [PROMPT], max_new_tokens=2)
        assert swarm.net.streams_opened == 1  # asked once, not again through the fallback
