"""What the swarm's DHT values mean, and reading them back (SPEC.md, sections 12 and 19).

The DHT (node/net/dht.py) stores opaque bytes. Every value under the ``/shiza-cap/`` namespace
is a signed capacity record and every value under ``/shiza-dispute/`` a signed dispute; both
are validated on store and on read (``DHT_VALIDATORS``), and among several copies of one key
``DHT_SELECTORS`` pick the best (the highest sequence number, the newest dispute). A record is
trusted only until its expiry, checked again at every read, and a reader refuses a peer's record
older than one it has already accepted (a replay: SPEC.md 12.3.6). Publishing is the business of
whoever signs: a node announces its record (node/serve/announce.py), a client publishes its
disputes (node/client/disputes.py).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Protocol

import trio

from protocol.disputes import DisputeRecord, check_dispute
from protocol.errors import ShizaError
from protocol.ids import (
    CAPACITY_NAMESPACE,
    DISPUTE_NAMESPACE,
    capacity_key,
    dispute_key,
    dispute_provider_key,
    model_provider_key,
)
from protocol.records import CapacityRecord, SequenceTracker, verify_record

__all__ = [
    "DHT_SELECTORS", "DHT_VALIDATORS", "RecordDHT", "fetch_disputes", "fetch_records",
    "seen_sequences", "select_capacity", "select_dispute", "validate_capacity", "validate_dispute",
]

log = logging.getLogger(__name__)


class RecordDHT(Protocol):
    """What reading and publishing records needs of a DHT: ``node.net.dht.SwarmDHT``, or
    ``node.net.memory.MemoryDHT`` in one process."""

    async def get(self, key: str) -> bytes | None: ...

    async def get_from(self, peer_id: str, key: str, timeout_s: float = ...) -> bytes | None: ...

    async def put(self, key: str, value: bytes) -> int: ...

    async def provide(self, key: bytes) -> bool: ...

    async def find_providers(self, key: bytes, count: int = ...) -> list[str]: ...


def validate_capacity(key: str, value: bytes) -> None:
    """The DHT validator: raises unless ``value`` is a valid, unexpired record for ``key``."""
    verify_record(CapacityRecord.from_bytes(value), now=time.time(), key=key)


def select_capacity(key: str, values: list[bytes]) -> int:
    """Index of the best of several values for one key: the valid one with the highest seq."""
    best, best_seq = 0, -1
    for i, value in enumerate(values):
        try:
            record = verify_record(CapacityRecord.from_bytes(value), now=time.time(), key=key)
        except ShizaError:
            continue
        if record.seq > best_seq:
            best, best_seq = i, record.seq
    return best


def validate_dispute(key: str, value: bytes) -> None:
    """The DHT validator: raises unless ``value`` is a valid, recent dispute for ``key``."""
    check_dispute(key, value, now=time.time())


def select_dispute(key: str, values: list[bytes]) -> int:
    """Index of the best of several values for one key: the valid one with the highest created_at."""
    best, best_at = 0, -1.0
    now = time.time()
    for i, value in enumerate(values):
        try:
            record = check_dispute(key, value, now=now)
        except ShizaError:
            continue
        if record.created_at > best_at:
            best, best_at = i, record.created_at
    return best


DHT_VALIDATORS = {CAPACITY_NAMESPACE: validate_capacity, DISPUTE_NAMESPACE: validate_dispute}
DHT_SELECTORS = {CAPACITY_NAMESPACE: select_capacity, DISPUTE_NAMESPACE: select_dispute}


OWN_RECORD_TIMEOUT_S = 5.0  # asking a provider for its own record, before the DHT lookup

# The highest seq accepted per peer, one tracker per reader (its DHT): a node, a client, a
# monitor. Kept beside the DHT rather than in it so that every caller of fetch_records is
# protected without holding one; it lives as long as that DHT object.
_SEEN: weakref.WeakKeyDictionary[object, SequenceTracker] = weakref.WeakKeyDictionary()


def seen_sequences(dht: RecordDHT) -> SequenceTracker:
    """The sequence tracker of the reader behind ``dht`` (created on first use)."""
    tracker = _SEEN.get(dht)
    if tracker is None:
        tracker = _SEEN[dht] = SequenceTracker()
    return tracker


async def fetch_records(
    dht: RecordDHT, model_id: str, *, include_draining: bool = False, limit: int = 256,
    seqs: SequenceTracker | None = None,
) -> list[CapacityRecord]:
    """Valid, unexpired records of the peers that provide ``model_id``, asked of the network.

    Each provider is first asked for its own record (one request, SPEC.md 12.4.3); only a
    provider that gives no valid one is looked up in the DHT, which asks the ~20 peers
    closest to its key. With 32 providers that is 32 requests instead of about 1,000.

    A record older than one already accepted for its peer (``seqs``, by default the tracker of
    this ``dht``: ``seen_sequences``) is refused, so a DHT peer that replays a node's earlier,
    still unexpired record cannot bring back its old state, spans or addresses."""
    tracker = seqs if seqs is not None else seen_sequences(dht)
    peers = (await dht.find_providers(model_provider_key(model_id), count=limit))[:limit]
    found: list[CapacityRecord] = []

    async def one(peer_id: str) -> None:
        key = capacity_key(peer_id)
        try:
            value = await dht.get_from(peer_id, key, timeout_s=OWN_RECORD_TIMEOUT_S)
            if value is None:
                value = await dht.get(key)
            if value is None:
                return
            record = verify_record(CapacityRecord.from_bytes(value), now=time.time(), key=key)
            tracker.check_and_update(record)  # StaleSequence for a replay
        except ShizaError as exc:
            log.info("ignoring record of %s: %s", peer_id, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a broken peer must not break the lookup
            log.info("lookup of %s failed: %s", peer_id, exc)
            return
        if record.state == "online" or include_draining:
            found.append(record)

    with trio.move_on_after(30):
        async with trio.open_nursery() as nursery:
            for peer_id in dict.fromkeys(peers):
                nursery.start_soon(one, peer_id)
    return sorted(found, key=lambda r: r.peer_id)


async def fetch_disputes(dht: RecordDHT, accused: str, *, limit: int = 32) -> dict[str, DisputeRecord]:
    """Valid disputes against ``accused`` found in the network, one per reporter (by reporter id)."""
    reporters = (await dht.find_providers(dispute_provider_key(accused), count=limit))[:limit]
    found: dict[str, DisputeRecord] = {}

    async def one(reporter: str) -> None:
        key = dispute_key(accused, reporter)
        try:
            value = await dht.get(key)
            if value is None:
                return
            record = check_dispute(key, value, now=time.time())
        except Exception as exc:  # noqa: BLE001 - a broken or lying peer must not break the lookup
            log.info("ignoring dispute of %s against %s: %s", reporter, accused, exc)
            return
        found[record.reporter] = record

    async with trio.open_nursery() as nursery:
        for reporter in dict.fromkeys(reporters):
            if reporter != accused:
                nursery.start_soon(one, reporter)
    return found
