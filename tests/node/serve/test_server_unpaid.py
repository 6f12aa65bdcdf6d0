"""Unpaid work counts against the client (SPEC 17): real SpanServers and clients in this
process (tests/node/client/inproc.py). A client that disputes every receipt is served until its
disputed work passes the node's ``max_unpaid_work_units``, gets a strike there, and its further
opens are refused (each a strike) until it is banned; an honest client of the same node, which
countersigns, is never refused."""

from __future__ import annotations

import pytest

from protocol.errors import RateLimited

from node.client.errors import ClientError
from node.ledger.accounting import ServerAccount, SeqAllocator, UnpaidWork
from node.serve.limits import PeerLimits
from node.serve.server import ServerLimits

from tests.node.client.inproc import identity, open_swarm, reference

PROMPT = [1, 504, 3458, 282, 4649, 314]
NEW = 3
WORK = (len(PROMPT) + NEW - 1) * 6  # work units of one generation's session on layers 0:6
LIMITS = ServerLimits(max_unpaid_work_units=2 * WORK,
                      peer=PeerLimits(strikes_to_ban=3, strike_window_s=600, ban_s=600))


async def test_a_client_that_disputes_every_receipt_is_banned_after_its_budget(tiny_llama):
    async with open_swarm(tiny_llama, [(0, 6)], swarm_id="private-" + "ab" * 16, limits=LIMITS) as swarm:
        server = swarm.nodes[0].server
        # Judging receipts as the public swarm's, this client disputes every one (a wrong swarm).
        cheat = swarm.client("cheat", swarm_id="public", step_timeout_s=10)
        honest = swarm.client("honest", swarm_id="private-" + "ab" * 16, step_timeout_s=10)
        cheat_id = identity("cheat").peer_id
        for _ in range(3):  # 3 x WORK: past the budget of 2 x WORK within the third session
            result = await cheat.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW)
            assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
            await swarm.settle()
            server.accepting = True
        assert server.stats.receipts == {"disputed": 3}
        assert server.unpaid.of(cheat_id) == 3 * WORK
        assert server.peers.banned_for(cheat_id) == 0  # one strike so far, when it crossed
        refused = []
        for _ in range(2):  # a fresh client each time (one avoids a peer that refused it)
            again = swarm.client("cheat", swarm_id="public", step_timeout_s=10)
            with pytest.raises(ClientError) as exc:
                await again.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW)
            refused.append(exc.value)
        assert all(isinstance(e, RateLimited) and "unpaid" in str(e) for e in refused), refused
        assert server.peers.banned_for(cheat_id) > 0  # three strikes: banned
        # The honest client is served throughout.
        for _ in range(2):
            result = await honest.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW)
            assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
        await swarm.settle()
        assert server.unpaid.of(identity("honest").peer_id) == 0
        assert server.peers.banned_for(identity("honest").peer_id) == 0


def test_a_later_countersigned_checkpoint_pays_for_the_disputed_ones() -> None:
    unpaid, seqs = UnpaidWork(), SeqAllocator(None)
    a = ServerAccount(identity("server"), seqs, "m@1", 0, 2, "C", "s1")
    assert unpaid.judged("C", a, 100, paid=False) == 100  # checkpoint 0 disputed
    assert unpaid.judged("C", a, 150, paid=False) == 150  # checkpoint 1 disputed: 50 more
    assert unpaid.judged("C", a, 200, paid=True) == 0  # checkpoint 2 countersigned: covers all
    assert unpaid.judged("C", a, 260, paid=False) == 60  # the final left without a signature
    b = ServerAccount(identity("server"), seqs, "m@1", 0, 2, "C", "s2")
    assert unpaid.judged("C", b, 40, paid=True) == 20  # paid work since offsets what is owed
    assert unpaid.judged("C", b, 100, paid=True) == 0 and unpaid.of("C") == 0


async def test_a_restarted_node_rebuilds_unpaid_work_from_its_ledger(tiny_llama, tmp_path):
    """Before: unpaid work lived in memory only, so restarting a node forgave every cheat."""
    async with open_swarm(tiny_llama, [(0, 6)], swarm_id="private-" + "ab" * 16, limits=LIMITS,
                          data_dir=tmp_path) as swarm:
        node = swarm.nodes[0]
        cheat = swarm.client("cheat", swarm_id="public", step_timeout_s=10)
        honest = swarm.client("honest", swarm_id="private-" + "ab" * 16, step_timeout_s=10)
        for client in (cheat, honest, cheat):
            await client.generate(swarm.model_id, [PROMPT], max_new_tokens=NEW)
            await swarm.settle()
            node.server.accepting = True
        live = node.server.unpaid
        restored = UnpaidWork.restored(node.ledger.entries(), node.identity.peer_id)
    assert live.of(identity("cheat").peer_id) == 2 * WORK
    assert restored.of(identity("cheat").peer_id) == 2 * WORK
    assert restored.of(identity("honest").peer_id) == 0
