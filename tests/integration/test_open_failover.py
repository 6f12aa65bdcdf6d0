"""A node killed (SIGKILL) after it published its record does not take new generations with it
(issue 15): its record stays in the DHT until it expires, so routes keep naming it; opening the
chain must fail over as a step does (another chain for its layers), and the client must not
choose the peer that just failed again."""

from __future__ import annotations

import os
import signal

import pytest

from node.client.routing import Hop
from node.client.swarm import SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.devtools.localswarm import start_chain, stop_all

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140]
NEW = 6


@pytest.fixture
def swarm(tiny_model, tmp_path):
    """A 0:3 node, and two nodes serving 3:6: one of them is killed."""
    nodes = start_chain(tmp_path, [(0, 3), (3, 6), (3, 6)], model=str(tiny_model), timeout_s=120)
    yield nodes
    stop_all(nodes)


async def test_a_killed_node_whose_record_remains_is_routed_around_when_opening(swarm, tiny_model, tmp_path):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    by_peer = {n.peer_id: n for n in swarm}
    async with SwarmClient.open([swarm[0].addr], data_dir=tmp_path / "agent", step_timeout_s=5) as client:
        route = await client.wait_for_route(source.model_id, 60)
        victim = by_peer[route[1].peer_id]
        os.kill(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        # The route still names the dead node (its record has not expired): opening fails over.
        result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route)
        assert result.token_ids[0] == expected
        assert result.failovers == 1 and victim.peer_id not in {h.peer_id for h in result.route}
        assert client.health.failures(victim.peer_id) == 1
        # The next generation, routed afresh from the DHT (which still holds the dead node's
        # record), does not choose it again.
        again = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW)
        assert again.token_ids[0] == expected
        assert again.failovers == 0 and victim.peer_id not in {h.peer_id for h in again.route}
    # A client that never saw it fail, given a route through it, fails over too.
    async with SwarmClient.open([swarm[0].addr], data_dir=tmp_path / "other", step_timeout_s=5) as other:
        await other.wait_for_route(source.model_id, 60)
        through_dead = [route[0], Hop(victim.peer_id, route[1].start, route[1].end, route[1].addrs)]
        fresh = await other.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=through_dead)
        assert fresh.token_ids[0] == expected and victim.peer_id not in {h.peer_id for h in fresh.route}
