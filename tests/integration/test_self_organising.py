"""Nodes choose their layers, clients route by speed, and a draining node loses nothing."""

from __future__ import annotations

import os
import signal


from node.client.swarm import SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from protocol.identity import Identity
from node.devtools.localswarm import start_node, stop_all
from protocol.receipts import Receipt

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140]


def _start(root, name, model, *, layers=None, boot=(), extra=()):
    node = start_node(root / name, model=str(model), layers=layers, bootstrap=list(boot), extra_args=list(extra))
    node.wait_ready(120)
    return node


async def test_nodes_without_layers_cover_the_model(tiny_model, tmp_path):
    nodes = []
    try:
        for i in range(3):
            boot = [nodes[0].addr] if nodes else []
            nodes.append(_start(tmp_path, f"n{i}", tiny_model, boot=boot, extra=["--max-layers", "2"]))
        spans = sorted((n.info["start"], n.info["end"]) for n in nodes)
        assert spans == [(0, 2), (2, 4), (4, 6)]
        source = resolve_model(str(tiny_model))
        async with SwarmClient.open([nodes[2].addr]) as client:
            await client.wait_for_route(source.model_id, 60)
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=6)
        assert result.token_ids[0] == reference_greedy(source, PROMPT, 6)
    finally:
        stop_all(nodes)


async def test_new_node_fills_the_weakest_layers_and_clients_prefer_it(tiny_model, tmp_path):
    source = resolve_model(str(tiny_model))
    nodes = []
    try:
        a = _start(tmp_path, "a", tiny_model, layers=(0, 3))
        slow = _start(tmp_path, "slow", tiny_model, layers=(3, 6), boot=[a.addr], extra=["--throttle-ms", "150"])
        nodes += [a, slow]
        # Layers 3:6 have the least throughput (the slow node): a node told nothing goes there.
        new = _start(tmp_path, "new", tiny_model, boot=[a.addr], extra=["--max-layers", "3"])
        nodes.append(new)
        assert (new.info["start"], new.info["end"]) == (3, 6)
        async with SwarmClient.open([a.addr]) as client:
            route = await client.wait_for_route(source.model_id, 60)
            records = {r.peer_id: r for r in await client.records(source.model_id)}
            assert records[slow.peer_id].throughput < records[new.peer_id].throughput
            assert [h.peer_id for h in route] == [a.peer_id, new.peer_id]
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=6, route=route)
        assert result.token_ids[0] == reference_greedy(source, PROMPT, 6)
    finally:
        stop_all(nodes)


async def test_sigterm_drains_without_losing_the_session_or_its_receipt(tiny_model, tmp_path):
    source = resolve_model(str(tiny_model))
    a = _start(tmp_path, "a", tiny_model, layers=(0, 3))
    b = _start(tmp_path, "b", tiny_model, layers=(3, 6), boot=[a.addr], extra=["--throttle-ms", "20"])
    nodes = [a, b]
    try:
        async with SwarmClient.open([a.addr], data_dir=tmp_path / "agent") as client:
            await client.wait_for_route(source.model_id, 60)
            seen = []

            def on_tokens(tokens):
                seen.append(tokens)
                if len(seen) == 3:
                    os.kill(b.proc.pid, signal.SIGTERM)  # leave while the session runs

            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=30, on_tokens=on_tokens)
            assert result.failovers == 0
            assert result.token_ids[0] == reference_greedy(source, PROMPT, 30)
            assert b.proc.wait(60) == 0
            # Once drained and withdrawn, b is no longer offered to new sessions.
            assert b.peer_id not in {r.peer_id for r in await client.records(source.model_id)}
            me = client.identity.peer_id
    finally:
        stop_all(nodes)
    with Ledger.open(tmp_path / "agent" / "ledger.sqlite", Identity.load_or_create(tmp_path / "agent")) as ledger:
        mine = [(Receipt.from_bytes(e.receipt), e.status) for e in ledger.entries()]
    with Ledger.open(b.data_dir / "ledger.sqlite", Identity.load_or_create(b.data_dir)) as ledger:
        theirs = [(Receipt.from_bytes(e.receipt), e.status) for e in ledger.entries()]
    final = [(r, s) for r, s in theirs if r.client == me and r.final]
    assert len(final) == 1 and final[0][1] == "countersigned"
    assert final[0][0].decode_tokens == 29
    assert final[0] in mine
