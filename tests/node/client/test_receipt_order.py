"""The client's side of settlement against real SpanServers in this process: a server that
numbers its receipts again from 1 (it lost its ledger, or was killed before storing) gets them
disputed by a client whose ledger holds the earlier ones, and the client stores its verdict
before sending it (a countersignature the server holds is always in the client's ledger)."""

from __future__ import annotations

import pytest

from protocol.receipts import Receipt

from node.ledger.accounting import SeqAllocator
from node.ledger.store import LEDGER_FILE, Ledger, LedgerError

from tests.node.client.inproc import identity, open_swarm, reference

PROMPT = [1, 504, 3458, 282, 4649, 314]


async def test_receipts_numbered_again_from_one_are_disputed(tiny_llama, tmp_path):
    async with open_swarm(tiny_llama, [(0, 6)], receipt_every=4) as swarm:  # the node keeps no ledger
        node = swarm.nodes[0]
        with Ledger.open(tmp_path / LEDGER_FILE, identity("agent")) as ledger:
            client = swarm.client(ledger=ledger)
            first = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=6)
            await swarm.settle()
            assert node.server.stats.receipts == {"countersigned": len(first.receipts)}
            before = {e.receipt_id: e for e in ledger.entries()}
            node.server.accounting.seqs = SeqAllocator(None)  # a restart that forgot its numbers
            node.server.accepting = True
            again = await client.generate(swarm.model_id, [PROMPT], max_new_tokens=6)
            await swarm.settle()
            after = {e.receipt_id: e for e in ledger.entries()}
    assert again.token_ids[0] == reference(tiny_llama, PROMPT, 6)  # served; just not paid twice
    assert set(again.receipts) & set(first.receipts)  # the same ids, reissued with other content
    assert node.server.stats.receipts["countersigned"] == len(first.receipts)
    assert node.server.stats.receipts["disputed"] == len(again.receipts)
    assert after == before  # the client's record of the first generation is untouched
    assert all(e.status == "countersigned" for e in after.values())


class FailingLedger:
    """A client ledger whose writes fail (a full disk); reads work."""

    def __init__(self, inner: Ledger) -> None:
        self.inner = inner

    def append(self, **kwargs):  # noqa: ANN003, ANN201
        raise LedgerError("disk full")

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self.inner, name)


async def test_the_client_countersigns_only_what_it_could_store(tiny_llama, tmp_path):
    async with open_swarm(tiny_llama, [(0, 6)], data_dir=tmp_path / "nodes", receipt_every=4) as swarm:
        node = swarm.nodes[0]
        with Ledger.open(tmp_path / LEDGER_FILE, identity("agent")) as ledger:
            client = swarm.client(ledger=FailingLedger(ledger))  # type: ignore[arg-type]
            with pytest.raises(LedgerError, match="disk full"):
                await client.generate(swarm.model_id, [PROMPT], max_new_tokens=6)
            await swarm.settle()
        with Ledger.open(tmp_path / "nodes" / "node0.sqlite", identity("node0")) as server_ledger:
            kept = server_ledger.entries()
    assert kept, "the server stored the receipt it sent"
    assert [e.status for e in kept if e.status == "countersigned"] == []
    assert all(Receipt.from_bytes(e.receipt).client_sig == b"" for e in kept)
