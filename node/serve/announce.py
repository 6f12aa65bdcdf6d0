"""Publishing this node's signed capacity record: publish, refresh well before expiry, withdraw.

What the record means to readers, and how they fetch and validate it, is node/net/records.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import trio

from protocol.identity import Identity
from protocol.ids import capacity_key, model_provider_key
from protocol.records import CapacityRecord, Hardware, sign_record
from protocol.messages import ServedSpan

from node.net.dht import SwarmDHT

log = logging.getLogger(__name__)


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
