"""SwarmClient against real SpanServers and engines in this process (tests/node/client/inproc.py):
generation, failover and the client's errors, without node processes or libp2p."""

from __future__ import annotations

import pytest

from protocol.errors import Busy, ShizaError
from protocol.ids import INFERENCE_PROTOCOL

from node.client.errors import ClientError, InvalidRequest, LayersLost, NoRoute, PeerError, PeerUnreachable
from node.client.routing import Hop
from node.ledger.store import LEDGER_FILE, Ledger
from node.net.streams import StreamBroken
from node.serve.server import ServerLimits

from tests.node.client.inproc import identity, open_swarm, reference

PROMPT = [1, 504, 3458, 282, 4649, 314]


async def test_generation_through_three_servers_matches_the_reference_and_countersigns(tiny_llama, tmp_path):
    async with open_swarm(tiny_llama, [(0, 2), (2, 4), (4, 6)], data_dir=tmp_path) as swarm:
        with Ledger.open(tmp_path / LEDGER_FILE, identity("agent")) as ledger:
            client = swarm.client(ledger=ledger)
            result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=8)
            assert result.token_ids[0] == reference(tiny_llama, PROMPT, 8)
            assert [(h.start, h.end) for h in result.route] == [(0, 2), (2, 4), (4, 6)]
            assert result.failovers == 0 and result.steps == 8
            entries = list(ledger.entries())
        await swarm.settle()
        # One final receipt per hop, countersigned on both sides.
        assert len(result.receipts) == 3 and {e.status for e in entries} == {"countersigned"}
        assert {e.receipt_id for e in entries} == set(result.receipts)
        for node in swarm.nodes:
            assert node.server.stats.receipts == {"countersigned": 1}
            assert node.server.stats.sessions_open == 0  # every session was closed


async def test_a_batch_of_prompts_of_different_lengths_matches_each_reference(tiny_llama):
    prompts = [PROMPT, PROMPT[:3]]
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        result = await swarm.client().generate(swarm.model_id, prompts, max_new_tokens=5)
    assert result.token_ids == [reference(tiny_llama, p, 5) for p in prompts]


async def test_a_hop_whose_peer_dies_is_failed_over_and_the_text_is_unchanged(tiny_llama, tmp_path):
    new = 12
    async with open_swarm(tiny_llama, [(0, 3), (3, 6), (3, 6)], receipt_every=4) as swarm:
        with Ledger.open(tmp_path / LEDGER_FILE, identity("agent")) as ledger:
            client = swarm.client(ledger=ledger)
            route = await client.route(swarm.model_id)
            victim = route[1].peer_id
            seen: list[list[int]] = []

            def on_tokens(tokens: list[int]) -> None:
                seen.append(tokens)
                if len(seen) == 5:
                    swarm.net.drop_peer(victim)  # its streams are reset mid-session

            result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=new, route=route,
                                           on_tokens=on_tokens)
            entries = list(ledger.entries())
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, new)
    assert result.failovers == 1 and client.failovers_total == 1
    replacement = result.route[1].peer_id
    assert victim not in {h.peer_id for h in result.route} and replacement != victim
    assert client.health.failures(victim) == 1
    # The dead node's work up to its last checkpoint is countersigned; the replacement's
    # receipts count the replayed history as its own work.
    statuses = {(e.server, e.status) for e in entries}
    assert (victim, "countersigned") in statuses and (replacement, "countersigned") in statuses
    final = max((e for e in entries if e.server == replacement), key=lambda e: e.seq)
    assert final.final and final.prefill_tokens + final.decode_tokens == len(PROMPT) + new - 1


async def test_losing_the_only_server_of_some_layers_raises_layers_lost(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        client = swarm.client()
        lost = swarm.nodes[1].peer_id
        calls: list[list[int]] = []

        def on_tokens(tokens: list[int]) -> None:
            calls.append(tokens)
            if len(calls) == 3:
                swarm.net.drop_peer(lost)

        with pytest.raises(LayersLost) as err:
            await client.generate(swarm.model_id, [PROMPT], max_new_tokens=10, on_tokens=on_tokens)
        assert err.value.missing == [(3, 6)] and "3:6" in str(err.value)
        assert isinstance(err.value, NoRoute) and isinstance(err.value, ClientError)
        # The surviving node's session was closed and its receipt countersigned.
        await swarm.settle()
        assert swarm.nodes[0].server.stats.receipts == {"countersigned": 1}


@pytest.mark.proc
async def test_a_peer_that_refuses_surfaces_as_its_peer_error(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 6)], limits=ServerLimits(max_sessions=0)) as swarm:
        with pytest.raises(Busy) as err:
            await swarm.client().generate(swarm.model_id, [PROMPT], max_new_tokens=2)
    exc = err.value
    assert isinstance(exc, PeerError) and isinstance(exc, ClientError) and isinstance(exc, ShizaError)
    assert exc.code == Busy.code and exc.peer_id == swarm.nodes[0].peer_id
    assert swarm.nodes[0].peer_id in str(exc) and "sessions open" in exc.reason


async def test_an_unreachable_peer_is_peer_unreachable_never_stream_broken(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        client = swarm.client()
        gone = swarm.nodes[0].peer_id
        swarm.net.drop_peer(gone)
        with pytest.raises(PeerUnreachable) as err:
            await client.generate(swarm.model_id, [PROMPT], max_new_tokens=2, route=[Hop(gone, 0, 6)])
    assert not isinstance(err.value, StreamBroken) and err.value.code == 0 and err.value.peer_id == gone


async def test_no_coverage_is_no_route_naming_the_missing_layers(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 3)]) as swarm:
        with pytest.raises(NoRoute) as err:
            await swarm.client().generate(swarm.model_id, [PROMPT], max_new_tokens=2)
    assert err.value.missing == [(3, 6)]


@pytest.mark.parametrize("prompts, new", [([], 4), ([[]], 4), ([PROMPT], 0)])
async def test_bad_arguments_are_invalid_requests(tiny_llama, prompts, new):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        with pytest.raises(InvalidRequest) as err:
            await swarm.client().generate(swarm.model_id, prompts, max_new_tokens=new)
    assert isinstance(err.value, ValueError) and isinstance(err.value, ClientError)
    assert swarm.net.streams_opened == 0  # refused before any peer was asked


async def test_the_swarm_id_is_given_at_construction_and_cannot_be_poked_in(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 6)]) as swarm:
        client = swarm.client(swarm_id="private-abc")
        assert client.swarm_id == "private-abc"
        with pytest.raises(AttributeError):
            client.swarm_id = "public"  # type: ignore[misc]


# ---- spot checks: the checker judges, the client acts --------------------------------------------
async def _spot_swarm(swarm, liar_noise: float):
    """Three nodes serving the whole model; the first adds noise of ``liar_noise`` (relative to
    each output's largest magnitude) to its hidden states, as ``--corrupt-outputs`` does."""
    from node.engine.faults import FaultyEngine, Faults

    from tests.node.client.inproc import engine

    first = await swarm.add_node("first", engine(swarm.source, 0, 6, wrap=lambda e: FaultyEngine(
        e, Faults(corrupt_outputs=liar_noise))))
    others = [await swarm.add_node(f"other{i}", engine(swarm.source, 0, 6)) for i in range(2)]
    return first, others


def _route(first, second) -> list[Hop]:
    return [Hop(first.peer_id, 0, 3, (), (0, 6)), Hop(second.peer_id, 3, 6, (), (0, 6))]


async def test_a_spot_check_catches_a_lying_node_and_the_client_fails_it_over(tiny_llama):
    import random
    import time

    from node.client.spotcheck import SpotChecker
    from node.net.records import fetch_disputes

    async with open_swarm(tiny_llama, []) as swarm:
        liar, (honest_a, honest_b) = await _spot_swarm(swarm, 0.01)
        checker = SpotChecker(rate=1.0, rng=random.Random(0))
        client = swarm.client(spot_checker=checker)
        await client.records(swarm.model_id)  # witnesses come from the records the client knows
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=6,
                                       route=_route(liar, honest_a))
        # The generation went on with the witnesses' output: the text is the reference.
        assert result.token_ids[0] == reference(tiny_llama, PROMPT, 6)
        [dispute] = checker.disputes
        assert dispute.accused == liar.peer_id and dispute.step == 0
        assert set(dispute.witnesses) == {honest_a.peer_id, honest_b.peer_id}
        # What the client decided: replace it, avoid it, publish the dispute.
        assert liar.peer_id not in {h.peer_id for h in result.route} and result.failovers == 1
        assert liar.peer_id in client.health.avoided(time.monotonic() + 600)  # distrusted, not backed off
        found = await fetch_disputes(swarm.net.dht("a reader"), liar.peer_id)
        assert list(found) == [client.identity.peer_id]
        await swarm.settle()
        assert "countersigned" not in liar.server.stats.receipts  # its work was never countersigned


async def test_spot_checks_of_honest_nodes_agree_exactly(tiny_llama):
    import random

    from node.client.spotcheck import SpotChecker

    async with open_swarm(tiny_llama, []) as swarm:
        _, (honest_a, honest_b) = await _spot_swarm(swarm, 0.0)  # nobody lies
        checker = SpotChecker(rate=1.0, rng=random.Random(1))
        client = swarm.client(spot_checker=checker)
        await client.records(swarm.model_id)
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=4,
                                       route=_route(honest_a, honest_b))
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, 4)
    assert checker.checks == 8 and not checker.disputes and result.failovers == 0  # 4 steps x 2 hops
    assert checker.inconclusive == 0
    assert checker.agreeing_diffs and max(checker.agreeing_diffs) == 0.0


async def test_stream_yields_the_reference_tokens_and_raises_the_clients_errors(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        client = swarm.client()
        got = [tok async for tok in client.stream(swarm.model_id, PROMPT, max_new_tokens=5)]
        assert got == reference(tiny_llama, PROMPT, 5)
        swarm.net.drop_peer(swarm.nodes[1].peer_id)
        with pytest.raises(PeerUnreachable):  # itself, not inside an exception group
            async for _ in client.stream(swarm.model_id, PROMPT, max_new_tokens=5,
                                         route=[Hop(swarm.nodes[0].peer_id, 0, 3), Hop(swarm.nodes[1].peer_id, 3, 6)]):
                pass


async def test_open_refuses_an_unusable_swarm_key_or_listen_address_as_invalid_requests(tmp_path):
    from node.client.swarm import SwarmClient

    loose = tmp_path / "swarm.key"
    loose.write_text("ab" * 32 + "\n")
    loose.chmod(0o644)  # readable by others: refused
    for kwargs in ({"swarm_key": loose}, {"swarm_key": tmp_path / "missing.key"}, {"listen": "not a multiaddr"}):
        with pytest.raises(InvalidRequest):
            async with SwarmClient.open([], **kwargs):
                raise AssertionError("opened")


async def test_open_reports_a_corrupt_ledger_as_an_invalid_request_and_keeps_the_file(tmp_path):
    from node.client.swarm import SwarmClient
    from node.ledger import LEDGER_FILE

    (tmp_path / LEDGER_FILE).write_bytes(b"this is not a SQLite database" * 64)
    with pytest.raises(InvalidRequest, match="ledger"):
        async with SwarmClient.open([], data_dir=tmp_path):
            raise AssertionError("opened")
    assert (tmp_path / LEDGER_FILE).read_bytes() == b"this is not a SQLite database" * 64  # reported, not repaired


async def test_witnesses_routing_would_not_use_cannot_get_an_honest_node_accused(tiny_llama):
    """Two fakes advertise no cache room (never routed to), answer zeros and agree: they are no
    witnesses, so the honest node is never accused (issue 15)."""
    import random

    from protocol.codec import Tensor

    from node.client.spotcheck import SpotChecker

    from tests.node.client.inproc import engine, lying

    zeros = lying(lambda t: Tensor(t.dtype, t.shape, bytes(len(t.data))))
    async with open_swarm(tiny_llama, []) as swarm:
        honest = await swarm.add_node("honest", engine(tiny_llama, 0, 6))
        for i in range(2):
            await swarm.add_node(f"fake{i}", engine(tiny_llama, 0, 6, wrap=zeros), record={"cache_tokens_left": 0})
        checker = SpotChecker(rate=1.0, rng=random.Random(0))
        client = swarm.client(spot_checker=checker)
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=3)
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, 3)
    assert [h.peer_id for h in result.route] == [honest.peer_id] and result.failovers == 0
    assert not checker.disputes and checker.checks == 0  # nobody eligible to witness


# ---- opening a chain fails over like a step (issue 15) -------------------------------------------
async def test_a_dead_peer_whose_record_remains_is_routed_around_at_open_and_then_avoided(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 3), (3, 6), (3, 6)]) as swarm:
        client = swarm.client()
        dead = (await client.route(swarm.model_id))[1].peer_id
        # Killed: it opens no more sessions, but its record stays in the DHT until it expires
        # (the memory DHT forgets a dropped peer's provider entry, so only its handler goes).
        swarm.net.remove_handler(dead, INFERENCE_PROTOCOL)
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=4)
        assert result.token_ids[0] == reference(tiny_llama, PROMPT, 4)
        assert dead not in {h.peer_id for h in result.route} and result.failovers == 1
        assert client.health.failures(dead) == 1
        # The next generation does not choose the peer that just failed.
        again = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=4)
        assert dead not in {h.peer_id for h in again.route} and again.failovers == 0
        assert client.health.failures(dead) == 1


@pytest.mark.proc
async def test_a_busy_peer_at_open_is_replaced_by_another_for_its_layers(tiny_llama):
    async with open_swarm(tiny_llama, []) as swarm:
        busy = await swarm.add_node("busy", engine_of(tiny_llama, 0, 6), limits=ServerLimits(max_sessions=0))
        free = await swarm.add_node("free", engine_of(tiny_llama, 0, 6))
        client = swarm.client()
        await client.records(swarm.model_id)
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=3, route=[Hop(busy.peer_id, 0, 6)])
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, 3)
    assert [h.peer_id for h in result.route] == [free.peer_id]


def engine_of(source, start, end):
    from tests.node.client.inproc import engine

    return engine(source, start, end)


async def test_a_witness_that_cannot_be_reached_is_backed_off_and_not_asked_again(tiny_llama):
    import random

    from node.client.spotcheck import SpotChecker

    async with open_swarm(tiny_llama, [(0, 6), (0, 6), (0, 6)]) as swarm:
        checked, dead = swarm.nodes[0], swarm.nodes[2]
        swarm.net.remove_handler(dead.peer_id, INFERENCE_PROTOCOL)  # its record stays
        checker = SpotChecker(rate=1.0, rng=random.Random(0))
        client = swarm.client(spot_checker=checker)
        await client.records(swarm.model_id)
        result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=3,
                                       route=[Hop(checked.peer_id, 0, 6)])
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, 3) and not checker.disputes
    assert checker.checks == 3 and client.health.failures(dead.peer_id) == 1  # asked once, then avoided
