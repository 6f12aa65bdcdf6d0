"""Five real nodes: a client bootstrapped from any one finds all; stopped nodes disappear."""

from __future__ import annotations

import pytest

from tests.polling import eventually

from node.client.swarm import SwarmClient
from node.engine.registry import resolve_model
from node.devtools.localswarm import start_node

SPANS = [(0, 2), (2, 4), (4, 6), (0, 3), (3, 6)]


@pytest.fixture(scope="module")
def five_nodes(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("five")
    nodes = []
    try:
        # A chain of bootstraps, not a star: node i knows only node i-1 at start.
        for i, span in enumerate(SPANS):
            boot = [nodes[-1].addr] if nodes else []
            nodes.append(start_node(root / f"n{i}", model=str(tiny_model), layers=span,
                                    bootstrap=boot, extra_args=["--record-ttl", "6"]))
            nodes[-1].wait_ready(120)
        yield nodes
    finally:
        for n in nodes:
            n.kill()


async def _peers_seen(client, model_id, want, timeout=60):
    """Poll (bounded) until the set of live records equals ``want``; return the last set."""
    seen: set = set()

    async def look() -> bool:
        seen.clear()
        seen.update((r.peer_id, r.spans[0].start, r.spans[0].end) for r in await client.records(model_id))
        return seen == want

    try:
        await eventually(look, timeout_s=timeout, interval_s=0.3, what="the live records")
    except AssertionError:
        pass  # the caller compares what was seen last
    return seen


async def test_any_bootstrap_finds_every_node_and_stopped_nodes_disappear(five_nodes, tiny_model):
    model_id = resolve_model(str(tiny_model)).model_id
    everyone = {(n.peer_id, *SPANS[i]) for i, n in enumerate(five_nodes)}
    for node in five_nodes:
        async with SwarmClient.open([node.addr]) as client:
            assert await _peers_seen(client, model_id, everyone) == everyone

    # Graceful stop: the record is withdrawn (draining) before the process exits.
    assert five_nodes[3].stop() == 0
    # A crash: no withdrawal, the record expires (TTL 6 s) and is never trusted past expiry.
    five_nodes[4].kill()
    remaining = {(n.peer_id, *SPANS[i]) for i, n in enumerate(five_nodes[:3])}
    async with SwarmClient.open([five_nodes[0].addr]) as client:
        assert await _peers_seen(client, model_id, remaining) == remaining
