"""Capacity records in a real DHT of libp2p hosts: published, refreshed, withdrawn, validated."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack
from dataclasses import replace

import pytest
import trio

from tests.polling import eventually
from tests.dht_swarm import dht_swarm
from node.net.records import DHT_SELECTORS, DHT_VALIDATORS, fetch_records
from node.serve.announce import Announcer, RecordState
from node.net.dht import open_dht
from node.net.host import open_host
from protocol.identity import Identity
from protocol.codec import canonical_pack
from protocol.ids import PURPOSE_CAPACITY_RECORD, capacity_key
from protocol.messages import ServedSpan
from protocol.errors import ShizaError
from protocol.records import CapacityRecord, Hardware, sign_record

MODEL = "tiny@0123456789abcdef"


def _state(addrs):
    return RecordState(
        addrs=tuple(addrs), spans=(ServedSpan(MODEL, 0, 6, 6),),
        hardware=Hardware("cpu", "test cpu", 8 << 30, 4 << 30), throughput=50.0, cache_tokens_left=4096,
    )


async def test_published_record_is_found_and_withdrawal_hides_it():
    async with AsyncExitStack() as stack:
        ids, hosts, dhts = await dht_swarm(stack, 3)
        ann = Announcer(ids[1], dhts[1], _state(hosts[1].addrs), ttl_s=60, provide_keys=(MODEL,))
        async with trio.open_nursery() as nursery:
            await nursery.start(ann.serve)
            with trio.fail_after(20):
                found = await fetch_records(dhts[2], MODEL)
            assert [r.peer_id for r in found] == [ids[1].peer_id]
            assert found[0].state == "online" and found[0].throughput == 50.0
            nursery.cancel_scope.cancel()
        await ann.withdraw()
        with trio.fail_after(20):
            assert await fetch_records(dhts[2], MODEL) == []
            draining = await fetch_records(dhts[2], MODEL, include_draining=True)
        assert [r.state for r in draining] == ["draining"]


def _record(ident: Identity, *, now: float, ttl: float = 60, seq: int = 1, peer_id: str | None = None):
    return CapacityRecord(
        peer_id=peer_id or ident.peer_id, addrs=(), spans=(ServedSpan(MODEL, 0, 6, 6),),
        hardware=Hardware("cpu", "x", 1, 1), throughput=1.0, cache_tokens_left=1, state="online",
        seq=seq, issued_at=now, expires_at=now + ttl,
    )


async def test_forged_expired_and_stale_records_are_rejected():
    async with AsyncExitStack() as stack:
        ids, hosts, dhts = await dht_swarm(stack, 2)
        victim, attacker = ids[0], Identity.generate()
        now = time.time()
        key = capacity_key(victim.peer_id)

        # Forged: a record naming the victim's peer id, signed with another key.
        claim = _record(attacker, now=now, peer_id=victim.peer_id)
        forged = replace(claim, signature=attacker.sign(PURPOSE_CAPACITY_RECORD, canonical_pack(claim.unsigned_wire())))
        with pytest.raises(ShizaError):
            await dhts[1].put(key, forged.to_bytes())
        # Under the attacker's own key it is valid, but not at the victim's DHT key.
        wrong_key = sign_record(attacker, _record(attacker, now=now))
        with pytest.raises(ShizaError):
            await dhts[1].put(key, wrong_key.to_bytes())
        # Expired: validly signed, but past its expiry.
        expired = sign_record(victim, _record(victim, now=now - 120, ttl=60))
        with pytest.raises(ShizaError):
            await dhts[1].put(key, expired.to_bytes())
        with trio.fail_after(10):
            assert await dhts[0].get(key) is None

        # A newer record replaces an older one everywhere it is read.
        old = sign_record(victim, _record(victim, now=now, seq=5))
        new = sign_record(victim, replace(_record(victim, now=now, seq=6), throughput=9.0))
        await dhts[0].put(key, old.to_bytes())
        await dhts[1].put(key, new.to_bytes())
        with trio.fail_after(10):
            got = CapacityRecord.from_bytes(await dhts[0].get(key))
        assert got.seq == 6 and got.throughput == 9.0


async def test_a_provider_that_left_is_still_found_through_the_dht():
    """Readers ask each provider for its own record first (SPEC 12.4.3); a provider that no
    longer answers is looked up in the DHT, where its record stays until it expires."""
    async with AsyncExitStack() as stack:
        ids, hosts, dhts = await dht_swarm(stack, 3)
        gone = Identity.generate()
        async with AsyncExitStack() as leaving:
            host = await leaving.enter_async_context(open_host(gone.seed))
            dht = await leaving.enter_async_context(
                open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, [hosts[0].addrs[0]]))
            ann = Announcer(gone, dht, _state(host.addrs), ttl_s=60, provide_keys=(MODEL,))
            async with trio.open_nursery() as nursery:
                await nursery.start(ann.serve)
                lookups: list[str] = []  # DHT lookups the reader makes (a spy on the real one)
                network_get = dhts[2].get

                async def spied_get(key: str) -> bytes | None:
                    lookups.append(key)
                    return await network_get(key)

                dhts[2].get = spied_get  # type: ignore[method-assign]
                await eventually(lambda: fetch_records(dhts[2], MODEL), timeout_s=20, interval_s=0.05,
                                 what="the node's published record")
                lookups.clear()
                with trio.fail_after(20):
                    assert [r.peer_id for r in await fetch_records(dhts[2], MODEL)] == [gone.peer_id]
                assert lookups == []  # the provider answered for itself: no DHT lookup
                nursery.cancel_scope.cancel()
        # The host is closed: asking it fails, the DHT still holds its last record.
        with trio.fail_after(30):
            assert await dhts[2].get_from(gone.peer_id, capacity_key(gone.peer_id)) is None
            found = await fetch_records(dhts[2], MODEL)
        assert [r.peer_id for r in found] == [gone.peer_id] and found[0].state == "online"
        assert lookups == [capacity_key(gone.peer_id)]  # this time through the DHT
