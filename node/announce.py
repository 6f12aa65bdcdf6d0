"""Publishing this node's signed capacity record, and reading the swarm's records back.

The DHT (node/dht.py) stores opaque bytes; here is what they mean. Every value under the
``/shiza-cap/`` namespace is validated on store and on read by ``validate_capacity`` and, among
several copies, the one with the highest sequence number wins. A record is trusted only until
its expiry, checked again at every read.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import trio

from protocol.errors import ShizaError
from protocol.identity import Identity
from protocol.ids import CAPACITY_NAMESPACE, capacity_key, model_provider_key
from protocol.records import CapacityRecord, Hardware, sign_record, verify_record
from protocol.messages import ServedSpan

from .dht import SwarmDHT
from .disputes import DISPUTE_NAMESPACE, select_dispute, validate_dispute

log = logging.getLogger(__name__)


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


DHT_VALIDATORS = {CAPACITY_NAMESPACE: validate_capacity, DISPUTE_NAMESPACE: validate_dispute}
DHT_SELECTORS = {CAPACITY_NAMESPACE: select_capacity, DISPUTE_NAMESPACE: select_dispute}


@dataclass
class RecordState:
    """What the node advertises; fields change as the node runs."""

    addrs: tuple[str, ...]
    spans: tuple[ServedSpan, ...]
    hardware: Hardware
    throughput: float
    cache_tokens_left: int
    state: str = "joining"


class Announcer:
    """Keeps this node's record in the DHT: publish, refresh well before expiry, withdraw."""

    def __init__(
        self,
        identity: Identity,
        dht: SwarmDHT,
        state: RecordState,
        *,
        ttl_s: float = 120.0,
        provide_keys: tuple[str, ...] = (),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.dht = dht
        self.state = state
        self.ttl_s = ttl_s
        self.provide_keys = provide_keys
        self.clock = clock
        self._last_seq = 0
        self.last_record: CapacityRecord | None = None

    def _next_seq(self) -> int:
        # Milliseconds since the epoch keep sequence numbers rising across restarts.
        self._last_seq = max(self._last_seq + 1, int(self.clock() * 1000))
        return self._last_seq

    def build(self, *, ttl_s: float | None = None) -> CapacityRecord:
        now = self.clock()
        s = self.state
        record = CapacityRecord(
            peer_id=self.identity.peer_id,
            addrs=s.addrs,
            spans=s.spans,
            hardware=s.hardware,
            throughput=float(s.throughput),
            cache_tokens_left=int(s.cache_tokens_left),
            state=s.state,
            seq=self._next_seq(),
            issued_at=now,
            expires_at=now + (ttl_s if ttl_s is not None else self.ttl_s),
        )
        return sign_record(self.identity, record)

    async def publish(self, *, ttl_s: float | None = None) -> CapacityRecord:
        record = self.build(ttl_s=ttl_s)
        stored = await self.dht.put(capacity_key(self.identity.peer_id), record.to_bytes())
        self.last_record = record
        log.info("published record seq=%d state=%s (stored on %d peers)", record.seq, record.state, stored)
        return record

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish as online, announce as provider, then refresh at a third of the TTL.

        Cancelling it stops refreshing; call ``withdraw`` to take the record down.
        """
        self.state.state = "online"
        await self.publish()
        for name in self.provide_keys:
            await self.dht.provide(model_provider_key(name))
        task_status.started()
        while True:
            await trio.sleep(self.ttl_s / 3)
            try:
                await self.publish()
                for name in self.provide_keys:
                    await self.dht.provide(model_provider_key(name))
            except Exception as exc:  # noqa: BLE001 - keep refreshing through network trouble
                log.warning("record refresh failed: %s", exc)

    async def withdraw(self, *, linger_s: float = 5.0, timeout_s: float = 10.0) -> None:
        """Replace the record with a draining one that expires within ``linger_s`` seconds."""
        self.state.state = "draining"
        with trio.move_on_after(timeout_s):
            await self.publish(ttl_s=linger_s)


OWN_RECORD_TIMEOUT_S = 5.0  # asking a provider for its own record, before the DHT lookup


async def fetch_records(
    dht: SwarmDHT, model_id: str, *, include_draining: bool = False, limit: int = 256
) -> list[CapacityRecord]:
    """Valid, unexpired records of the peers that provide ``model_id``, asked of the network.

    Each provider is first asked for its own record (one request, SPEC.md 12.4.3); only a
    provider that gives no valid one is looked up in the DHT, which asks the ~20 peers
    closest to its key. With 32 providers that is 32 requests instead of about 1,000."""
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

