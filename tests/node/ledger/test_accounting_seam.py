"""Accounting end to end in one process: SpanServers issue receipts, the client checks each
against what it sent and received and countersigns it (or disputes it), and both ledgers end up
with the same story. In-memory streams (tests/node/client/inproc.py), no node processes."""

from __future__ import annotations

from protocol.receipts import Receipt, verify_receipt

from node.ledger.store import LEDGER_FILE, Ledger

from tests.node.client.inproc import identity, open_swarm, reference

PROMPT = [1, 504, 3458, 282, 4649, 314]
NEW = 10


def _entries(path, owner: str) -> dict[str, tuple[str, Receipt]]:
    with Ledger.open(path, identity(owner)) as ledger:
        return {e.receipt_id: (e.status, Receipt.from_bytes(e.receipt)) for e in ledger.entries()}


async def test_both_ledgers_hold_the_same_countersigned_receipts_for_the_work_done(tiny_llama, tmp_path):
    async with open_swarm(tiny_llama, [(0, 2), (2, 6)], data_dir=tmp_path, receipt_every=4) as swarm:
        with Ledger.open(tmp_path / LEDGER_FILE, identity("agent")) as ledger:
            result = await swarm.client(ledger=ledger).generate(swarm.model_id, [PROMPT], max_new_tokens=NEW)
        await swarm.settle()
        nodes = swarm.nodes
    assert result.token_ids[0] == reference(tiny_llama, PROMPT, NEW)
    client_side = _entries(tmp_path / LEDGER_FILE, "agent")
    assert set(client_side) == set(result.receipts) and {s for s, _ in client_side.values()} == {"countersigned"}
    for node in nodes:
        server_side = _entries(tmp_path / f"{node.name}.sqlite", node.name)
        mine = {rid: v for rid, v in client_side.items() if v[1].server == node.peer_id}
        assert set(server_side) == set(mine) and len(mine) >= 3  # checkpoints every 4 tokens, and a final
        for rid, (status, receipt) in server_side.items():
            assert status == "countersigned"
            verify_receipt(receipt, require_countersigned=True)  # the client's signature, checked by the server
        final = max((r for _, r in server_side.values()), key=lambda r: r.checkpoint)
        # Cumulative: the final receipt counts the whole session, prefill then one token a step.
        assert final.final and (final.prefill_tokens, final.decode_tokens) == (len(PROMPT), NEW - 1)
        assert final.work_units == (len(PROMPT) + NEW - 1) * (final.end - final.start)
        assert [r.seq for _, r in sorted(server_side.values(), key=lambda v: v[1].checkpoint)] == list(
            range(1, len(server_side) + 1))


async def test_a_client_of_another_swarm_disputes_and_one_of_the_same_swarm_countersigns(tiny_llama, tmp_path):
    """The defect behind a gateway built without its node's swarm id: receipts of a private swarm
    judged by a client that thinks it is in the public one are disputed. Given the swarm id at
    construction, the client countersigns them."""
    private = "private-" + "ab" * 16
    async with open_swarm(tiny_llama, [(0, 6)], data_dir=tmp_path, swarm_id=private) as swarm:
        for name, swarm_id in (("outsider", "public"), ("member", private)):
            with Ledger.open(tmp_path / f"{name}.client.sqlite", identity(name)) as ledger:
                client = swarm.client(name, ledger=ledger, swarm_id=swarm_id)
                result = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=3)
                assert result.token_ids[0] == reference(tiny_llama, PROMPT, 3)  # served either way
        await swarm.settle()
        server = swarm.nodes[0]
    outsider = _entries(tmp_path / "outsider.client.sqlite", "outsider")
    member = _entries(tmp_path / "member.client.sqlite", "member")
    assert [s for s, _ in outsider.values()] == ["disputed"]
    assert [s for s, _ in member.values()] == ["countersigned"]
    with Ledger.open(tmp_path / f"{server.name}.sqlite", identity(server.name)) as ledger:
        by_id = {e.receipt_id: e for e in ledger.entries()}
    [(out_id, _)] = outsider.items()
    [(member_id, _)] = member.items()
    assert by_id[out_id].status == "disputed" and "swarm" in by_id[out_id].reason
    assert by_id[member_id].status == "countersigned"
    assert server.server.stats.receipts == {"disputed": 1, "countersigned": 1}
