"""Dispute records in a real DHT of libp2p hosts: stored, found, forgeries refused, reporters counted."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import trio

from tests.dht_swarm import dht_swarm
from node.net.records import fetch_disputes, select_dispute, validate_dispute
from node.serve.announce import Announcer, RecordState
from node.client.swarm import SwarmClient
from node.client.disputes import EXCLUDE_REPORTERS, DisputeWatch, publish_dispute
from protocol.ids import dispute_key
from protocol.codec import canonical_pack
from protocol.disputes import PURPOSE_DISPUTE, DisputeRecord, sign_dispute
from protocol.receipts import Receipt, countersign_receipt, receipt_id_for, sign_receipt
from protocol.errors import ShizaError
from protocol.identity import Identity
from protocol.messages import ServedSpan
from protocol.records import Hardware

MODEL = "tiny@0123456789abcdef"
WITNESS_IDS = (Identity.generate(), Identity.generate())
WITNESSES = tuple(w.peer_id for w in WITNESS_IDS)


def _receipt(server: Identity, client: Identity, *, session_id: str, cosign: bool, seq: int = 1,
             start: int = 0, end: int = 6, model_id: str = MODEL) -> bytes:
    now = time.time()
    receipt = sign_receipt(server, Receipt(
        receipt_id=receipt_id_for("public", server.peer_id, client.peer_id, seq), swarm_id="public",
        model_id=model_id, start=start, end=end, server=server.peer_id, client=client.peer_id,
        session_id=session_id, seq=seq, checkpoint=0, final=True, prefill_tokens=5, decode_tokens=3,
        work_units=8 * (end - start), started_at=now - 5, ended_at=now, unit_price=None,
        io_digest=b"\x04" * 32))
    return (countersign_receipt(client, receipt) if cosign else receipt).to_bytes()


def _evidence(reporter: Identity, accused: Identity) -> tuple[bytes, ...]:
    """What the reporter holds after a spot check: the accused's receipt for the session (which
    it disputes: not countersigned) and each witness's countersigned receipt for its replay."""
    return (_receipt(accused, reporter, session_id="s1", cosign=False),
            *(_receipt(w, reporter, session_id=f"w{i}", cosign=True) for i, w in enumerate(WITNESS_IDS)))


def _dispute(reporter: Identity, accused: Identity, *, created_at: float | None = None, step: int = 3,
             evidence: tuple[bytes, ...] | None = None, witnesses: tuple[str, ...] = WITNESSES) -> DisputeRecord:
    return sign_dispute(reporter, DisputeRecord(
        swarm_id="public", model_id=MODEL, start=0, end=6, step=step, session_id="s1", accused=accused.peer_id,
        witnesses=witnesses, reporter=reporter.peer_id, input_digest=b"\x01" * 32, accused_digest=b"\x02" * 32,
        witness_digest=b"\x03" * 32, max_abs_diff=0.5, tolerance=1e-2,
        created_at=time.time() if created_at is None else created_at,
        evidence=_evidence(reporter, accused) if evidence is None else evidence,
    ))


def test_validator_refuses_forged_misplaced_stale_and_future_records():
    reporter, other, accused_id = Identity.generate(), Identity.generate(), Identity.generate()
    accused = accused_id.peer_id
    good = _dispute(reporter, accused_id)
    key = dispute_key(accused, reporter.peer_id)
    validate_dispute(key, good.to_bytes())
    forged = replace(good, signature=other.sign(PURPOSE_DISPUTE, canonical_pack(good.body_wire())))
    bad = [
        (key, forged.to_bytes()),  # the reporter's name, another key's signature
        (dispute_key(other.peer_id, reporter.peer_id), good.to_bytes()),  # key names another accused
        (dispute_key(accused, other.peer_id), good.to_bytes()),  # key names another reporter
        (key, _dispute(reporter, accused_id, created_at=time.time() - 25 * 3600).to_bytes()),
        (key, _dispute(reporter, accused_id, created_at=time.time() + 3600).to_bytes()),
        (key, b"\x80"),
    ]
    for k, v in bad:
        with pytest.raises(ShizaError):
            validate_dispute(k, v)
    newer = _dispute(reporter, accused_id, created_at=good.created_at + 10, step=4)
    assert select_dispute(key, [good.to_bytes(), newer.to_bytes()]) == 1
    assert select_dispute(key, [forged.to_bytes(), good.to_bytes()]) == 1


async def test_disputes_are_stored_found_and_forgeries_refused():
    async with AsyncExitStack() as stack:
        ids, hosts, dhts = await dht_swarm(stack, 3)
        accused, reporter = ids[0].peer_id, ids[1]
        # Forged: names reporter ids[1], signed by ids[2]; refused by the DHT.
        claim = _dispute(reporter, ids[0])
        forged = replace(claim, signature=ids[2].sign(PURPOSE_DISPUTE, canonical_pack(claim.body_wire())))
        with pytest.raises(ShizaError):
            await dhts[2].put(dispute_key(accused, reporter.peer_id), forged.to_bytes())
        # Valid, but at a key naming another accused.
        with pytest.raises(ShizaError):
            await dhts[1].put(dispute_key(ids[2].peer_id, reporter.peer_id), claim.to_bytes())
        with trio.fail_after(10):
            assert await fetch_disputes(dhts[2], accused) == {}

        with trio.fail_after(10):
            assert await publish_dispute(dhts[1], claim)
            found = await fetch_disputes(dhts[2], accused)
        assert list(found) == [reporter.peer_id] and found[reporter.peer_id] == claim


@pytest.mark.proc
async def test_distinct_reporters_exclude_a_peer_from_routing():
    async with AsyncExitStack() as stack:
        # 0, 1: nodes serving the whole model; 2..4: reporters; 5: the client.
        ids, hosts, dhts = await dht_swarm(stack, 6)
        accused, honest = ids[0].peer_id, ids[1].peer_id
        async with trio.open_nursery() as nursery:
            for i in (0, 1):
                state = RecordState(
                    addrs=tuple(hosts[i].addrs), spans=(ServedSpan(MODEL, 0, 6, 6),),
                    hardware=Hardware("cpu", "test cpu", 8 << 30, 4 << 30), throughput=50.0,
                    cache_tokens_left=4096,
                )
                await nursery.start(Announcer(ids[i], dhts[i], state, ttl_s=60, provide_keys=(MODEL,)).serve)

            # One reporter, many records: counted once. A second reporter: still below the bar.
            now = time.time()
            with trio.fail_after(20):
                for k in range(3):
                    assert await publish_dispute(dhts[2], _dispute(ids[2], ids[0], created_at=now + k, step=k))
                assert await publish_dispute(dhts[3], _dispute(ids[3], ids[0]))
            client = SwarmClient(hosts[5], dhts[5], ids[5])
            with trio.fail_after(20):
                await client.route(MODEL)
                records = client.known_records(MODEL)
            assert client.disputes.reporters(accused) == {ids[2].peer_id, ids[3].peer_id}
            assert accused not in client.disputes.excluded()
            assert {c.peer_id for c in client._candidates(records, MODEL)} == {accused, honest}
            assert EXCLUDE_REPORTERS == 3

            # A third distinct reporter: excluded once the cache (a minute) is refreshed.
            with trio.fail_after(20):
                assert await publish_dispute(dhts[4], _dispute(ids[4], ids[0]))
                await client.route(MODEL)
            assert accused not in client.disputes.excluded()  # cached answer still in force
            client.disputes = DisputeWatch(dhts[5])
            with trio.fail_after(20):
                for _ in range(3):
                    hops = await client.route(MODEL)
                    assert [h.peer_id for h in hops] == [honest]
            assert client.disputes.reporters(accused) == {ids[2].peer_id, ids[3].peer_id, ids[4].peer_id}
            assert client.disputes.excluded() == {accused}
            assert {c.peer_id for c in client._candidates(records, MODEL)} == {honest}
            nursery.cancel_scope.cancel()


def test_a_dispute_counts_only_with_receipts_of_the_accused_and_the_witnesses():
    # Before: a record naming invented witnesses, with nothing to show, was stored and counted;
    # three keys of one attacker excluded an honest node for 24 h.
    reporter, accused, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    key = dispute_key(accused.peer_id, reporter.peer_id)
    validate_dispute(key, _dispute(reporter, accused).to_bytes())
    invented = (Identity.generate().peer_id, Identity.generate().peer_id)
    accused_receipt, *witness_receipts = _evidence(reporter, accused)
    lies = {
        "no evidence": _dispute(reporter, accused, evidence=()),
        "invented witnesses": _dispute(reporter, accused, witnesses=invented),
        "witness receipts not countersigned": _dispute(reporter, accused, evidence=(
            accused_receipt, *(_receipt(w, reporter, session_id="w", cosign=False) for w in WITNESS_IDS))),
        "receipts of another client": _dispute(reporter, accused, evidence=(
            _receipt(accused, stranger, session_id="s1", cosign=False),
            *(_receipt(w, stranger, session_id="w", cosign=True) for w in WITNESS_IDS))),
        "the accused's receipt for another session": _dispute(reporter, accused, evidence=(
            _receipt(accused, reporter, session_id="other", cosign=False), *witness_receipts)),
        "witness receipts for other layers": _dispute(reporter, accused, evidence=(
            accused_receipt, *(_receipt(w, reporter, session_id="w", cosign=True, end=3) for w in WITNESS_IDS))),
        "a receipt with a forged server signature": _dispute(reporter, accused, evidence=(
            replace(Receipt.from_bytes(accused_receipt), server_sig=bytes(64)).to_bytes(), *witness_receipts)),
    }
    for what, record in lies.items():
        with pytest.raises(ShizaError):
            validate_dispute(key, record.to_bytes())
            pytest.fail(f"accepted a dispute with {what}")
