"""Publishing signed dispute records in the DHT, and weighing peers by them (SPEC.md, section 19).

A client whose spot check accuses a node (node/spotcheck.py) publishes the signed
``DisputeRecord`` as the DHT value ``/shiza-dispute/<accused>/<reporter>`` and provides the
32-byte key ``sha256(b"shiza/disputes/" + accused)``, so that readers find the reporters of a
node. Every value under the namespace is validated on store and on read by
``validate_dispute``: a record signed by the reporter, whose accused and reporter are the key's,
made no more than ``MAX_SKEW_S`` in the future and no longer than ``MAX_AGE_S`` ago. Among copies
of one slot the newest (highest ``created_at``) wins.

A reader counts *distinct reporters*: one slot per (accused, reporter), so a reporter that signs
many records is counted once. ``DisputeWatch`` looks up the disputes of routing candidates
(parallel, bounded in time, cached per peer) and names the peers with valid disputes from at
least ``EXCLUDE_REPORTERS`` reporters, which the client leaves out of its routes.

Not implemented (SPEC.md, section 19): counting only reporters that hold countersigned receipts
with the witnesses named.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Callable, Iterable

import trio

from protocol.disputes import DisputeRecord, verify_dispute
from protocol.errors import InvalidMessage, ShizaError

from .dht import SwarmDHT

__all__ = [
    "DISPUTE_NAMESPACE",
    "EXCLUDE_REPORTERS",
    "DisputeWatch",
    "dispute_key",
    "dispute_provider_key",
    "fetch_disputes",
    "publish_dispute",
    "select_dispute",
    "validate_dispute",
]

log = logging.getLogger(__name__)

DISPUTE_NAMESPACE = "shiza-dispute"
_PROVIDER_DOMAIN = b"shiza/disputes/"
EXCLUDE_REPORTERS = 3  # distinct reporters with a valid dispute that make routing avoid a node
MAX_AGE_S = 24 * 3600.0  # a dispute older than this is no longer stored, served or counted
MAX_SKEW_S = 300.0  # how far in the future created_at may be (clock skew)
PUBLISH_TIMEOUT_S = 5.0
LOOKUP_TIMEOUT_S = 2.0
CACHE_S = 60.0


def dispute_key(accused: str, reporter: str) -> str:
    """The DHT value key of ``reporter``'s dispute against ``accused``."""
    return f"/{DISPUTE_NAMESPACE}/{accused}/{reporter}"


def dispute_provider_key(accused: str) -> bytes:
    """The DHT provider key (32 bytes) announced by every reporter of a dispute against ``accused``."""
    return hashlib.sha256(_PROVIDER_DOMAIN + accused.encode("utf-8")).digest()


def check_dispute(key: str, value: bytes, *, now: float) -> DisputeRecord:
    """The record in ``value`` if valid for ``key`` at ``now``; ShizaError otherwise."""
    record = verify_dispute(DisputeRecord.from_bytes(value))
    if key != dispute_key(record.accused, record.reporter):
        raise InvalidMessage(f"dispute of {record.reporter} against {record.accused} is not for key {key!r}")
    if record.created_at > now + MAX_SKEW_S:
        raise InvalidMessage("dispute created in the future")
    if record.created_at < now - MAX_AGE_S:
        raise InvalidMessage("dispute older than 24 h")
    return record


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


async def publish_dispute(dht: SwarmDHT, record: DisputeRecord, *, timeout_s: float = PUBLISH_TIMEOUT_S) -> bool:
    """Store ``record`` and provide its accused's dispute key; best effort, never raises.

    Returns whether the value was stored and the provider announcement made within ``timeout_s``.
    """
    done = False
    with trio.move_on_after(timeout_s):
        try:
            await dht.put(dispute_key(record.accused, record.reporter), record.to_bytes())
            await dht.provide(dispute_provider_key(record.accused))
            done = True
        except Exception as exc:  # noqa: BLE001 - publishing must never fail a generation
            log.warning("publishing dispute against %s failed: %s", record.accused, exc)
    if done:
        log.info("published dispute against %s", record.accused)
    return done


async def fetch_disputes(dht: SwarmDHT, accused: str, *, limit: int = 32) -> dict[str, DisputeRecord]:
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


class DisputeWatch:
    """Distinct reporters of disputes per peer, looked up on demand and cached for ``cache_s``."""

    def __init__(
        self,
        dht: SwarmDHT,
        *,
        threshold: int = EXCLUDE_REPORTERS,
        cache_s: float = CACHE_S,
        timeout_s: float = LOOKUP_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.dht = dht
        self.threshold = threshold
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self.clock = clock
        self._reporters: dict[str, tuple[float, frozenset[str]]] = {}  # peer -> (looked up at, reporters)

    def reporters(self, peer_id: str) -> frozenset[str]:
        """Distinct reporters of the last lookup of ``peer_id`` (empty if never looked up)."""
        entry = self._reporters.get(peer_id)
        return entry[1] if entry else frozenset()

    def excluded(self) -> frozenset[str]:
        """Peers with valid disputes from at least ``threshold`` distinct reporters, as last seen."""
        return frozenset(p for p, (_, r) in self._reporters.items() if len(r) >= self.threshold)

    async def refresh(self, peer_ids: Iterable[str]) -> frozenset[str]:
        """Look up the peers not looked up in the last ``cache_s`` (parallel, at most ``timeout_s``
        in all; a lookup cut short keeps the previous answer), then return ``excluded()``."""
        now = self.clock()
        stale = [p for p in dict.fromkeys(peer_ids)
                 if p not in self._reporters or now - self._reporters[p][0] >= self.cache_s]

        async def one(peer_id: str) -> None:
            try:
                found = await fetch_disputes(self.dht, peer_id)
            except Exception as exc:  # noqa: BLE001 - a failed lookup counts nothing
                log.info("dispute lookup for %s failed: %s", peer_id, exc)
                return
            self._reporters[peer_id] = (self.clock(), frozenset(found))
            if len(found) >= self.threshold:
                log.warning("avoiding %s: disputes from %d distinct reporters", peer_id, len(found))

        if stale:
            with trio.move_on_after(self.timeout_s):
                async with trio.open_nursery() as nursery:
                    for peer_id in stale:
                        nursery.start_soon(one, peer_id)
            for peer_id in stale:  # cut short: keep the previous answer, and do not retry for cache_s
                if peer_id not in self._reporters or self._reporters[peer_id][0] < now:
                    self._reporters[peer_id] = (now, self.reporters(peer_id))
        return self.excluded()
