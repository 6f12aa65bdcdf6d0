"""Publishing signed dispute records in the DHT, and weighing peers by them (SPEC.md, section 19).

A client whose spot check accuses a node (node/client/spotcheck.py) publishes the signed
``DisputeRecord`` as the DHT value ``/shiza-dispute/<accused>/<reporter>`` and provides the
32-byte key ``sha256(b"shiza/disputes/" + accused)``, so that readers find the reporters of a
node. Every value under the namespace is validated on store and on read by
``validate_dispute`` (node/net/records.py): a record signed by the reporter, whose accused and reporter are the key's,
made no more than ``MAX_DISPUTE_SKEW_S`` in the future and no longer than ``MAX_DISPUTE_AGE_S`` ago (protocol/disputes.py). Among copies
of one slot the newest (highest ``created_at``) wins.

A reader counts *distinct reporters*: one slot per (accused, reporter), so a reporter that signs
many records is counted once. ``DisputeWatch`` looks up the disputes of routing candidates
(parallel, bounded in time, cached per peer) and names the peers with valid disputes from at
least ``EXCLUDE_REPORTERS`` reporters, which the client leaves out of its routes.

A record counts only with its evidence (``check_evidence`` in protocol/disputes.py): the accused's
signed receipt for that session and each witness's countersigned receipt, all naming the
reporter as client.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

import trio

from protocol.disputes import DisputeRecord
from protocol.ids import dispute_key, dispute_provider_key

from node.net.records import RecordDHT, fetch_disputes

__all__ = ["EXCLUDE_REPORTERS", "DisputeWatch", "publish_dispute"]

log = logging.getLogger(__name__)

EXCLUDE_REPORTERS = 3  # distinct reporters with a valid dispute that make routing avoid a node
PUBLISH_TIMEOUT_S = 5.0
LOOKUP_TIMEOUT_S = 2.0
CACHE_S = 60.0


async def publish_dispute(dht: RecordDHT, record: DisputeRecord, *, timeout_s: float = PUBLISH_TIMEOUT_S) -> bool:
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


class DisputeWatch:
    """Distinct reporters of disputes per peer, looked up on demand and cached for ``cache_s``."""

    def __init__(
        self,
        dht: RecordDHT,
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
