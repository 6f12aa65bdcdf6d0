"""The client's checks before it countersigns: a receipt that says the right counts but cannot
follow the receipts before it (a reused or falling seq, a repeated checkpoint, a changed price
or start, time going back, impossible times, anything after the final one) is disputed. Every
receipt here is properly signed by the server: only the ordering or the times lie."""

from __future__ import annotations

import struct
import time
from dataclasses import replace
from pathlib import Path

import pytest

from protocol.codec import Tensor
from protocol.identity import Identity
from protocol.messages import Step
from protocol.receipts import Receipt, receipt_id_for, sign_receipt, verify_receipt

from node.ledger.accounting import (
    MAX_CLOCK_SKEW_S,
    ClientAccount,
    SeqAllocator,
    ServerAccount,
    record,
    seq_floor,
)
from node.ledger.store import LEDGER_FILE, Ledger

SERVER = Identity.from_seed(b"s" * 32)
CLIENT = Identity.from_seed(b"c" * 32)
MODEL = "m@1"


def ids(values: list[int]) -> Tensor:
    return Tensor("int64", (1, len(values)), struct.pack(f"<{len(values)}q", *values))


class Session:
    """One session seen from both ends: the server issues, the client judges."""

    def __init__(self, seqs: SeqAllocator, session_id: str = "sess", **client: object) -> None:
        self.server = ServerAccount(SERVER, seqs, MODEL, 0, 2, CLIENT.peer_id, session_id, every_tokens=1,
                                    unit_price=0.5)
        self.client = ClientAccount(CLIENT, SERVER.peer_id, MODEL, 0, 2, session_id, **client)  # type: ignore[arg-type]
        self.steps = 0

    def step(self) -> None:
        step = Step(self.steps, ids([1, 2]), ids([2 * self.steps, 2 * self.steps + 1]))
        out = ids([7])
        self.server.record(step, out)
        self.client.record(step, out)
        self.steps += 1

    def issue(self, final: bool = False) -> Receipt:
        self.step()
        return self.server.issue(final=final)

    def judge(self, receipt: Receipt) -> str:
        """The dispute reason ("" when countersigned)."""
        got, sig, reason = self.client.judge(receipt.to_bytes())
        assert got is not None, reason  # every receipt here verifies
        assert (sig is None) == bool(reason)
        return reason


def resigned(receipt: Receipt, **changes: object) -> Receipt:
    """``receipt`` with ``changes``, signed again by its server (the id follows the seq)."""
    r = replace(receipt, **changes)  # type: ignore[arg-type]
    r = replace(r, receipt_id=receipt_id_for(r.swarm_id, r.server, r.client, r.seq))
    return verify_receipt(sign_receipt(SERVER, r))


async def prepared(ledger: Ledger | None = None) -> SeqAllocator:
    seqs = SeqAllocator(ledger)
    await seqs.prepare(SERVER.peer_id, CLIENT.peer_id)
    return seqs


async def test_an_honest_session_is_countersigned_throughout() -> None:
    s = Session(await prepared())
    for final in (False, False, True):
        assert s.judge(s.issue(final)) == ""
    assert [st for _, st, _ in s.client.receipts] == ["countersigned"] * 3


async def test_a_seq_the_clients_ledger_already_holds_is_disputed(tmp_path: Path) -> None:
    """A server that lost its numbers (killed before storing, ledger restored) issues seq 1
    again to a client whose ledger holds seqs 1..3: the floor read at open refuses it."""
    with Ledger.open(tmp_path / LEDGER_FILE, CLIENT) as ledger:
        earlier = Session(await prepared(), "earlier")
        for _ in range(3):
            record(ledger, earlier.issue(), "countersigned")
        floor = await seq_floor(ledger, SERVER.peer_id, CLIENT.peer_id)
        assert floor == 4
        amnesiac = Session(await prepared(), "later", seq_floor=floor)  # numbers from 1 again
        reason = amnesiac.judge(amnesiac.issue())
    assert "seq 1 is not above the 3 this client already holds" in reason


async def test_a_seq_that_does_not_rise_within_the_session_is_disputed() -> None:
    s = Session(await prepared())
    first = s.issue()
    assert s.judge(first) == ""
    second = s.issue()
    assert "seq" in s.judge(resigned(second, seq=first.seq - 1 if first.seq > 1 else 0))


async def test_a_repeated_checkpoint_is_disputed() -> None:
    s = Session(await prepared())
    assert s.judge(s.issue()) == ""
    assert "checkpoint 0 is not above" in s.judge(resigned(s.issue(), checkpoint=0))


async def test_a_changed_unit_price_is_disputed() -> None:
    s = Session(await prepared())
    assert s.judge(s.issue()) == ""
    assert "unit_price 5.0" in s.judge(resigned(s.issue(), unit_price=5.0))


async def test_a_changed_start_time_is_disputed() -> None:
    s = Session(await prepared())
    first = s.issue()
    assert s.judge(first) == ""
    assert "started_at" in s.judge(resigned(s.issue(), started_at=first.started_at - 1.0))


async def test_time_going_back_is_disputed() -> None:
    s = Session(await prepared())
    s.server.started_at -= 10.0
    first = s.issue()
    assert s.judge(first) == ""
    assert "ended_at" in s.judge(resigned(s.issue(), ended_at=first.ended_at - 0.5))


async def test_an_end_in_the_future_is_disputed() -> None:
    s = Session(await prepared())
    later = time.time() + MAX_CLOCK_SKEW_S + 3600
    assert "in the future" in s.judge(resigned(s.issue(), ended_at=later))


async def test_a_start_before_the_session_opened_is_disputed() -> None:
    s = Session(await prepared())
    assert "before the session opened" in s.judge(resigned(s.issue(), started_at=time.time() - 86400))


async def test_a_receipt_after_the_final_one_is_disputed() -> None:
    s = Session(await prepared())
    assert s.judge(s.issue(final=True)) == ""
    s.server.final_issued = False
    assert "after the final one" in s.judge(s.issue())


@pytest.mark.parametrize("lie", ["seq", "checkpoint"])
async def test_a_disputed_lie_still_binds_the_receipts_after_it(lie: str) -> None:
    """A receipt disputed for its counts is still the server's word: the next must follow it."""
    s = Session(await prepared())
    first = s.issue()
    assert s.judge(resigned(first, prefill_tokens=first.prefill_tokens + 1,
                            work_units=first.work_units + 2)) != ""
    second = s.issue()
    stale = {"seq": {"seq": first.seq}, "checkpoint": {"checkpoint": first.checkpoint}}[lie]
    assert lie in s.judge(resigned(second, **stale))
