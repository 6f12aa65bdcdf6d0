"""Reading capacity records back: a peer's record older than one already seen is refused, so a
hostile DHT peer cannot replay a node's earlier advertisement (old addresses, spans, "online"
after it said "draining") once the reader has seen a newer one."""

from __future__ import annotations

import time

from protocol import CapacityRecord, Hardware, Identity, ServedSpan, SequenceTracker, sign_record
from protocol.ids import capacity_key

from node.net.records import fetch_records

MODEL = "tiny@0123456789abcdef"


def _record(ident: Identity, seq: int, state: str = "online") -> bytes:
    now = time.time()
    return sign_record(ident, CapacityRecord(
        peer_id=ident.peer_id, addrs=(), spans=(ServedSpan(MODEL, 0, 6, 6),),
        hardware=Hardware("cpu", "test", 0, 0), throughput=1.0, cache_tokens_left=1, state=state,
        seq=seq, issued_at=now, expires_at=now + 60)).to_bytes()


class ReplayingDHT:
    """The record's owner does not answer for itself; the DHT lookup answers ``value``, which
    the test sets, as a hostile peer holding an old copy would."""

    def __init__(self, peer_id: str) -> None:
        self.peer_id = peer_id
        self.value: bytes | None = None

    async def get(self, key: str) -> bytes | None:
        assert key == capacity_key(self.peer_id)
        return self.value

    async def get_from(self, peer_id: str, key: str, timeout_s: float = 5.0) -> bytes | None:
        return None

    async def put(self, key: str, value: bytes) -> int:
        raise AssertionError("a read does not publish")

    async def provide(self, key: bytes) -> bool:
        raise AssertionError("a read does not provide")

    async def find_providers(self, key: bytes, count: int = 50) -> list[str]:
        return [self.peer_id]


async def test_a_replayed_older_record_is_refused_once_a_newer_was_seen():
    node = Identity.generate()
    dht = ReplayingDHT(node.peer_id)
    dht.value = _record(node, seq=2000, state="draining")
    assert [r.seq for r in await fetch_records(dht, MODEL, include_draining=True)] == [2000]
    dht.value = _record(node, seq=1000)  # signed by the node earlier, still unexpired
    assert await fetch_records(dht, MODEL, include_draining=True) == []
    dht.value = _record(node, seq=2000, state="draining")  # the same record read again is fine
    assert len(await fetch_records(dht, MODEL, include_draining=True)) == 1
    dht.value = _record(node, seq=3000)  # and a newer one replaces it
    assert [r.seq for r in await fetch_records(dht, MODEL)] == [3000]


async def test_each_reader_tracks_what_it_has_seen():
    node = Identity.generate()
    dht, fresh = ReplayingDHT(node.peer_id), ReplayingDHT(node.peer_id)
    dht.value = _record(node, seq=2)
    await fetch_records(dht, MODEL)
    fresh.value = _record(node, seq=1)  # another reader, which never saw seq 2
    assert [r.seq for r in await fetch_records(fresh, MODEL)] == [1]
    seqs = SequenceTracker()  # a caller may keep its own
    assert len(await fetch_records(fresh, MODEL, seqs=seqs)) == 1
    fresh.value = _record(node, seq=0)
    assert await fetch_records(fresh, MODEL, seqs=seqs) == []
    assert seqs.highest(node.peer_id) == 1
