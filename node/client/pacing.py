"""How a client paces its use of each peer, and honours a peer's Busy.

A node shares its sessions among its peers (SPEC 17): past a peer's share an open waits in the
node's queue, then is answered Busy (wire code 25) with a retry hint (``retry_after_s``). Load
is not abuse, so a client that asks too much is never banned for it; but a client that serves
many users behind one identity (the gateway above all) should not ask for more than it may have:

* ``Pacer.open`` runs one open and, while the peer answers Busy, waits the peer's hint (with a
  little jitter, so many waiting opens do not return at once) and tries again: at most
  ``busy_attempts`` tries within ``busy_total_s``; then the last Busy is raised (the caller fails
  the hop over as for any other failure).
* ``Pacer.hold(peers)`` holds one of this client's slots at each peer of a route for the life of
  a generation, so the client never runs more sessions at a peer than the peer allows one peer
  at once. A peer's slots start at ``per_peer`` (SPEC 17's default per-peer limit) and adapt:
  a Busy answered while this client held ``n`` slots there lowers that peer's limit to ``n``
  (at least 1); each open that succeeds without Busy raises it by one again, up to ``per_peer``.

Time is trio's. Cancellation: a ``hold`` cancelled while waiting holds nothing; ``open``
cancelled while waiting between tries has no session open.
"""

from __future__ import annotations

import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Sequence, TypeVar

import trio

from protocol.errors import Busy

__all__ = ["BUSY_ATTEMPTS", "BUSY_TOTAL_S", "DEFAULT_PER_PEER", "Pacer"]

DEFAULT_PER_PEER = 8  # sessions at one peer at once: SPEC 17's default per-peer limit
BUSY_ATTEMPTS = 5  # tries of one open while the peer answers Busy
BUSY_TOTAL_S = 30.0  # the longest one open keeps trying
BUSY_FALLBACK_S = 0.5  # first wait when a Busy carries no hint (then doubled per try)
MAX_HINT_S = 10.0  # a longer hint is not waited for inside one open: the caller goes elsewhere

T = TypeVar("T")


@dataclass
class _Slots:
    limit: int
    held: int = 0

    def __post_init__(self) -> None:
        self.changed = trio.Event()

    def wake(self) -> None:
        self.changed.set()
        self.changed = trio.Event()


class Pacer:
    """Per-peer session slots and Busy retries for one client (see the module docstring)."""

    def __init__(self, per_peer: int = DEFAULT_PER_PEER, *, busy_attempts: int = BUSY_ATTEMPTS,
                 busy_total_s: float = BUSY_TOTAL_S, jitter: Callable[[], float] = random.random) -> None:
        if per_peer < 1 or busy_attempts < 1:
            raise ValueError("per_peer and busy_attempts must be at least 1")
        self.per_peer = per_peer
        self.busy_attempts = busy_attempts
        self.busy_total_s = busy_total_s
        self._jitter = jitter
        self._slots: dict[str, _Slots] = {}
        self.busy_answers = 0  # Busy answers seen by open (each retried or raised)

    def _of(self, peer_id: str) -> _Slots:
        slots = self._slots.get(peer_id)
        if slots is None:
            slots = self._slots[peer_id] = _Slots(self.per_peer)
        return slots

    def limit(self, peer_id: str) -> int:
        """This client's sessions at ``peer_id`` at once, as learned so far."""
        return self._of(peer_id).limit

    def held(self, peer_id: str) -> int:
        slots = self._slots.get(peer_id)
        return 0 if slots is None else slots.held

    # ---- slots ---------------------------------------------------------------------------
    @asynccontextmanager
    async def hold(self, peer_ids: Sequence[str]) -> AsyncIterator[None]:
        """Hold one slot at each of ``peer_ids`` (a peer named twice: two), waiting for them.
        Peers are taken in sorted order, so generations holding several never deadlock."""
        taken: list[str] = []
        try:
            for peer_id in sorted(peer_ids):
                while True:  # looked up again after each wake: a released peer may be forgotten
                    slots = self._of(peer_id)
                    if slots.held < slots.limit:
                        break
                    await slots.changed.wait()
                slots.held += 1
                taken.append(peer_id)
            yield
        finally:
            for peer_id in taken:
                slots = self._of(peer_id)
                slots.held -= 1
                slots.wake()
                if slots.held == 0 and slots.limit == self.per_peer:
                    del self._slots[peer_id]  # nothing learned, nothing held: forget it

    # ---- opens ---------------------------------------------------------------------------
    async def open(self, open_once: Callable[[], Awaitable[T]], peer_id: str) -> T:
        """``open_once()``, tried again after each Busy the peer answers (see the module
        docstring); any other error, or the last Busy, is raised as is."""
        deadline = trio.current_time() + self.busy_total_s
        for attempt in range(1, self.busy_attempts + 1):
            try:
                result = await open_once()
            except Busy as exc:
                self.busy_answers += 1
                self._learn_busy(peer_id)
                hint = exc.retry_after_s if exc.retry_after_s is not None else BUSY_FALLBACK_S * 2 ** (attempt - 1)
                wait = min(hint, MAX_HINT_S) * (1.0 + 0.25 * self._jitter())
                if attempt == self.busy_attempts or hint > MAX_HINT_S or trio.current_time() + wait > deadline:
                    raise
                await trio.sleep(wait)
                continue
            self._learn_ok(peer_id)
            return result
        raise AssertionError("unreachable")

    def _learn_busy(self, peer_id: str) -> None:
        slots = self._of(peer_id)
        if slots.held > 0:  # the peer refused us while we held this many: that is its share now
            slots.limit = max(1, min(slots.limit, slots.held))

    def _learn_ok(self, peer_id: str) -> None:
        slots = self._slots.get(peer_id)
        if slots is not None and slots.limit < self.per_peer:
            slots.limit += 1
            slots.wake()
