"""Generation survives a node killed (SIGKILL) or stalled (SIGSTOP) mid-generation."""

from __future__ import annotations

import os
import signal
import time

import pytest

from node.client.swarm import LayersLost, SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from protocol.identity import Identity
from node.devtools.localswarm import start_chain, start_node, stop_all
from protocol.receipts import Receipt

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140]
NEW = 24


@pytest.fixture
def swarm(tiny_model, tmp_path):
    """A 0:3 node, and two nodes serving 3:6: one of them can be lost."""
    nodes = start_chain(tmp_path, [(0, 3), (3, 6), (3, 6)], model=str(tiny_model),
                        extra_args=["--receipt-every", "4"], timeout_s=120)
    yield nodes
    for n in nodes:
        if n.proc.poll() is None:
            os.kill(n.proc.pid, signal.SIGCONT)
    stop_all(nodes)


async def _generate_and_disrupt(swarm, tiny_model, tmp_path, sig, replay="exact"):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    by_peer = {n.peer_id: n for n in swarm}
    events = {}
    async with SwarmClient.open([swarm[0].addr], data_dir=tmp_path / "agent", step_timeout_s=3,
                                 replay=replay) as client:
        route = await client.wait_for_route(source.model_id, 60)
        victim = by_peer[route[1].peer_id]

        def on_tokens(tokens):
            events.setdefault("first", time.monotonic())
            n = events["n"] = events.get("n", 0) + 1
            if n == 8:
                os.kill(victim.proc.pid, sig)
                events["disrupted"] = time.monotonic()
            elif n == 9:
                events["resumed"] = time.monotonic()

        result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route,
                                       on_tokens=on_tokens)
    print(f"\n[failover {signal.Signals(sig).name}] kill to next token "
          f"{(events['resumed'] - events['disrupted']) * 1000:.0f} ms after 8 tokens of history")
    return result, expected, victim


@pytest.mark.parametrize("replay", ["exact", "merged"])
async def test_sigkill_mid_generation_gives_the_same_text(swarm, tiny_model, tmp_path, replay):
    result, expected, victim = await _generate_and_disrupt(swarm, tiny_model, tmp_path, signal.SIGKILL, replay)
    assert result.token_ids[0] == expected
    assert result.failovers == 1
    assert victim.peer_id not in {h.peer_id for h in result.route}
    # Receipts: the dead node's work up to its last checkpoint is countersigned in the client's
    # ledger; the replacement's receipt counts its replayed history as its own work.
    with Ledger.open(tmp_path / "agent" / "ledger.sqlite", Identity.load_or_create(tmp_path / "agent")) as ledger:
        receipts = [Receipt.from_bytes(e.receipt) for e in ledger.entries()]
    dead = [r for r in receipts if r.server == victim.peer_id]
    assert dead and max(r.decode_tokens for r in dead) >= 4
    replacement = result.route[1].peer_id
    final = max((r for r in receipts if r.server == replacement), key=lambda r: r.checkpoint)
    assert final.final and final.prefill_tokens + final.decode_tokens == len(PROMPT) + NEW - 1
    if replay == "exact":
        assert (final.prefill_tokens, final.decode_tokens) == (len(PROMPT), NEW - 1)


async def test_sigstop_stall_gives_the_same_text(swarm, tiny_model, tmp_path):
    result, expected, victim = await _generate_and_disrupt(swarm, tiny_model, tmp_path, signal.SIGSTOP)
    assert result.token_ids[0] == expected
    assert result.failovers == 1
    assert victim.peer_id not in {h.peer_id for h in result.route}


async def test_no_replacement_names_the_lost_layers(tiny_model, tmp_path):
    nodes = start_chain(tmp_path, [(0, 3), (3, 6)], model=str(tiny_model), timeout_s=120)
    try:
        source = resolve_model(str(tiny_model))
        async with SwarmClient.open([nodes[0].addr], data_dir=tmp_path / "agent", step_timeout_s=3) as client:
            await client.wait_for_route(source.model_id, 60)
            calls = []

            def on_tokens(tokens):
                calls.append(tokens)
                if len(calls) == 3:
                    nodes[1].kill()

            with pytest.raises(LayersLost) as err:
                await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, on_tokens=on_tokens)
        assert err.value.missing == [(3, 6)]
        assert "3:6" in str(err.value)
    finally:
        stop_all(nodes)
    # The surviving node's session was closed cleanly and its receipt countersigned.
    with Ledger.open(tmp_path / "agent" / "ledger.sqlite", Identity.load_or_create(tmp_path / "agent")) as ledger:
        statuses = {(Receipt.from_bytes(e.receipt).server, e.status) for e in ledger.entries()}
    assert (nodes[0].peer_id, "countersigned") in statuses


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_the_only_node_of_some_layers_restarted_takes_its_layers_back(tiny_model, tmp_path):
    """SIGKILL the only node serving 3:6 mid-generation and start it again (same data directory,
    same address, as a supervisor would). The failover has nobody else; it waits (bounded) for
    the failed peer's newer record and reopens there. Before, the generation ended in
    LayersLost at once, and for 60 s py-libp2p refused to dial the restarted node at all."""
    listen = ["--listen", f"/ip4/127.0.0.1/tcp/{_free_port()}"]
    nodes = start_chain(tmp_path, [(0, 3), (3, 6)], model=str(tiny_model), timeout_s=120,
                        node_args=[[], listen])
    restarted = []
    try:
        source = resolve_model(str(tiny_model))
        expected = reference_greedy(source, PROMPT, NEW)
        lost = nodes[1]
        async with SwarmClient.open([nodes[0].addr], data_dir=tmp_path / "agent", step_timeout_s=3) as client:
            await client.wait_for_route(source.model_id, 60)
            calls = []

            def on_tokens(tokens):
                calls.append(tokens)
                if len(calls) == 3:
                    lost.kill()
                    restarted.append(start_node(lost.data_dir, model=str(tiny_model), layers=(3, 6),
                                                bootstrap=[nodes[0].addr], extra_args=listen))

            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, on_tokens=on_tokens)
        assert result.token_ids[0] == expected
        assert result.failovers >= 1
        assert [h.peer_id for h in result.route] == [nodes[0].peer_id, lost.peer_id]
    finally:
        stop_all([*nodes, *restarted])


async def test_the_only_node_of_some_layers_stalled_then_going_on_takes_its_layers_back(tiny_model, tmp_path):
    """SIGSTOP the only node serving 3:6 mid-generation; SIGCONT it once the client has failed
    it over (it found nobody else). A stalled node publishes no newer record, so after a few
    seconds of waiting the failover tries it as it is, and the generation ends as without the
    stall. Before, it ended in LayersLost while that node served again."""
    import trio

    nodes = start_chain(tmp_path, [(0, 3), (3, 6)], model=str(tiny_model), timeout_s=120)
    try:
        source = resolve_model(str(tiny_model))
        expected = reference_greedy(source, PROMPT, NEW)
        stalled = nodes[1]
        async with SwarmClient.open([nodes[0].addr], data_dir=tmp_path / "agent", step_timeout_s=3) as client:
            await client.wait_for_route(source.model_id, 60)
            calls = []

            def on_tokens(tokens):
                calls.append(tokens)
                if len(calls) == 3:
                    os.kill(stalled.proc.pid, signal.SIGSTOP)

            async def go_on_after_the_failover():
                with trio.fail_after(60):
                    while client.failovers_total == 0:  # polling the client's state
                        await trio.sleep(0.05)
                os.kill(stalled.proc.pid, signal.SIGCONT)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(go_on_after_the_failover)
                result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, on_tokens=on_tokens)
        assert result.token_ids[0] == expected
        assert result.failovers >= 1
        assert [h.peer_id for h in result.route] == [nodes[0].peer_id, stalled.peer_id]
    finally:
        for n in nodes:
            if n.proc.poll() is None:
                os.kill(n.proc.pid, signal.SIGCONT)
        stop_all(nodes)
