"""Per-peer limits of a serving node, node-wide fair sharing, and bans of peers that break the rules.

A node shares one engine among every peer. Limits must tell load from abuse: a gateway that
serves many agents behind one identity asks for a lot, honestly; a peer that sends frames the
protocol forbids, or steps far faster than any limit allows, breaks the rules.

Load (never a strike): ``PeerLimiter`` shares the node's session budget (``max_sessions``,
ServerLimits) among its peers. An open that cannot have a slot now waits in a bounded queue
(``NodeShares.max_queued`` opens node-wide, ``PeerLimits.max_queued_opens`` per peer, at most
``NodeShares.queue_wait_s``), then gets ``Busy`` (wire code 25) with a retry hint
(``retry_after_s``). A slot is free for peer P when all of these hold:

* the node holds fewer than ``max_sessions`` sessions;
* P holds fewer than ``PeerLimits.max_sessions`` and its KV reservations (sum of
  ``batch_size * max_length``) stay within ``PeerLimits.max_kv_tokens``;
* P has countersigned a receipt of this node in this run (``countersigned``), or the peers
  without such history hold fewer than ``max_sessions`` minus ``NodeShares.reserved_for_known``
  of it: under pressure, fresh identities cannot take the last slots from peers that paid;
* P is an identity the node has admitted before, or the bucket of new identities
  (``NodeShares.new_peers_per_s``) has a token: keys are free, so fresh ones come in at a
  bounded rate.

Among opens that could take a slot, the queue serves the best first: peers with history, then
the peer holding the fewest sessions, then the oldest. So a peer may exceed its fair share of
the budget only while nobody else waits for it (sessions are never taken back).

Abuse (strikes): a frame the node cannot decode, over its size or decoding limits, a step over
the per-peer rates (token buckets for steps, tokens and input bytes per second, burst one
second), or a step whose output would not fit a frame (``strike``). A peer with
``strikes_to_ban`` strikes within ``strike_window_s`` is banned for ``ban_s``: every stream it
opens is refused at once with RateLimited (27) until the ban runs out.

Streams waiting for their first frame (each may hold a partial frame of up to
MAX_CONTROL_FRAME_BYTES until the open deadline): past ``max_waiting_streams`` a new stream is
refused with Busy, not a strike.

Time for buckets and bans comes from ``clock`` (monotonic seconds), so tests drive it
explicitly. The bookkeeping (``try_open``) is pure; only ``acquire`` waits (trio), woken
whenever a session closes or the queue changes. Cancellation while waiting: nothing was
reserved and the open leaves the queue.
"""

from __future__ import annotations

import itertools
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import trio

from protocol.errors import Busy, RateLimited

__all__ = ["NodeShares", "PeerLimits", "PeerLimiter", "TokenBucket"]


@dataclass(frozen=True)
class PeerLimits:
    max_sessions: int = 8  # a peer's open sessions; more opens wait (queue) or get Busy: load, not abuse
    max_kv_tokens: int = 65536  # sum of batch_size * max_length over a peer's open sessions
    steps_per_s: float = 200.0  # Steps per second, per peer (all its sessions together)
    tokens_per_s: float = 65536.0  # tokens (B x T) of Steps per second, per peer
    bytes_per_s: float = 256 * 2**20  # input bytes of Steps per second, per peer
    max_waiting_streams: int = 16  # streams of one peer open but still before their first frame
    max_queued_opens: int = 64  # opens of one peer waiting for a session slot
    strikes_to_ban: int = 3  # limit violations within strike_window_s that earn a ban
    strike_window_s: float = 60.0
    ban_s: float = 60.0


@dataclass(frozen=True)
class NodeShares:
    """How the node-wide session budget is shared (see the module docstring)."""

    reserved_for_known: float = 0.25  # fraction of the budget fresh identities cannot fill
    new_peers_per_s: float = 2.0  # identities never seen before, admitted per second
    new_peers_burst: float = 16.0
    max_queued: int = 256  # opens waiting for a slot, node-wide
    queue_wait_s: float = 10.0  # the longest an open waits before Busy
    retry_after_s: float = 1.0  # the hint sent with Busy when the wait ran out
    remember_peers: int = 65536  # admitted and countersigning peers remembered (least recent dropped)


class TokenBucket:
    """``rate`` units per second, holding at most ``burst`` (default: one second's worth)."""

    def __init__(self, rate: float, burst: float | None = None, *, now: float) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be > 0, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self._level = self.burst
        self._at = now

    def full(self, now: float) -> bool:
        return self._level + (now - self._at) * self.rate >= self.burst

    def level(self, now: float) -> float:
        return min(self.burst, self._level + (now - self._at) * self.rate)

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` if available; False (and nothing taken) if not."""
        self._level = self.level(now)
        self._at = now
        # A single request larger than the burst is allowed from a full bucket (it then owes).
        if self._level >= min(amount, self.burst):
            self._level -= amount
            return True
        return False


@dataclass
class _Peer:
    sessions: int = 0
    kv_tokens: int = 0
    buckets: dict[str, TokenBucket] = field(default_factory=dict)
    strikes: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0
    waiting: int = 0  # streams before their first frame


class _Lru:
    """A bounded set that forgets its least recently added or touched members."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, None] = OrderedDict()

    def add(self, key: str) -> None:
        self._items[key] = None
        self._items.move_to_end(key)
        while len(self._items) > self.size:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class PeerLimiter:
    """Enforces ``PeerLimits`` per peer and shares ``max_sessions`` among them; see the module
    docstring."""

    def __init__(self, limits: PeerLimits | None = None, clock: Callable[[], float] = time.monotonic, *,
                 max_sessions: int = 64, shares: NodeShares | None = None) -> None:
        self.limits = limits or PeerLimits()
        self.shares = shares or NodeShares()
        self.max_sessions = max_sessions
        self.clock = clock
        self._peers: dict[str, _Peer] = {}
        self._sessions = 0  # node-wide
        self._admitted = _Lru(self.shares.remember_peers)  # identities that took a new-peer token
        self._known = _Lru(self.shares.remember_peers)  # countersigned at least one receipt this run
        self._new_ids = TokenBucket(self.shares.new_peers_per_s, self.shares.new_peers_burst, now=clock())
        self._queue: dict[int, tuple[str, int]] = {}  # ticket -> (peer id, kv tokens), oldest first
        self._tickets = itertools.count()
        self._changed = trio.Event()
        self.bans_total = 0
        self.strikes_total = 0
        self.opens_waited = 0  # opens that waited in the queue (and then got a slot or Busy)
        self.opens_busy = 0  # opens answered Busy for want of a slot

    def _peer(self, peer_id: str) -> _Peer:
        peer = self._peers.get(peer_id)
        if peer is None:
            peer = self._peers[peer_id] = _Peer()
        return peer

    # ---- bans ---------------------------------------------------------------------------
    def banned_for(self, peer_id: str) -> float:
        """Seconds of ban left for ``peer_id`` (0.0 when not banned)."""
        peer = self._peers.get(peer_id)
        return 0.0 if peer is None else max(0.0, peer.banned_until - self.clock())

    def check_banned(self, peer_id: str) -> None:
        left = self.banned_for(peer_id)
        if left > 0:
            raise RateLimited(f"peer banned for {left:.0f} s more after repeated limit violations",
                              retry_after_s=left)

    def strike(self, peer_id: str, why: str) -> RateLimited:
        """Count a violation; returns the error to send (saying so when it earned a ban)."""
        lim, now = self.limits, self.clock()
        peer = self._peer(peer_id)
        self.strikes_total += 1
        peer.strikes.append(now)
        while peer.strikes and peer.strikes[0] <= now - lim.strike_window_s:
            peer.strikes.popleft()
        if len(peer.strikes) >= lim.strikes_to_ban:
            peer.strikes.clear()
            peer.banned_until = now + lim.ban_s
            self.bans_total += 1
            return RateLimited(f"{why}; peer banned for {lim.ban_s:.0f} s", retry_after_s=lim.ban_s)
        return RateLimited(why)

    # ---- history ------------------------------------------------------------------------
    def countersigned(self, peer_id: str) -> None:
        """``peer_id`` countersigned a receipt of this node: preferred under pressure from now on."""
        if peer_id not in self._known:
            self._wake()  # queue priorities changed
        self._known.add(peer_id)

    def known(self, peer_id: str) -> bool:
        return peer_id in self._known

    # ---- sessions -----------------------------------------------------------------------
    def try_open(self, peer_id: str, kv_tokens: int, ticket: int | None = None) -> float | None:
        """Reserve a session slot now and return None, or return the seconds after which asking
        again may succeed (nothing reserved). Raises RateLimited when banned, or when one
        session alone asks more KV than a peer may hold (waiting cannot help; no strike).
        ``ticket``: the caller's place in the queue (``acquire``)."""
        self.check_banned(peer_id)
        lim = self.limits
        if kv_tokens > lim.max_kv_tokens:
            raise RateLimited(f"a session of {kv_tokens} KV tokens is over the per-peer {lim.max_kv_tokens}; "
                              "open it with a shorter max_length or batch")
        now = self.clock()
        fresh = self._fresh_sessions()
        hint = self._blocked(peer_id, kv_tokens, now, fresh)
        if hint is not None:
            return hint
        mine = self._rank(peer_id, ticket if ticket is not None else 1 << 62)
        for other, (other_peer, other_kv) in self._queue.items():
            if other != ticket and self._rank(other_peer, other) < mine \
                    and self._blocked(other_peer, other_kv, now, fresh) is None:
                return self.shares.retry_after_s  # a better-placed open takes this slot first
        if peer_id not in self._admitted and peer_id not in self._known:
            self._new_ids.take(1, now)
        self._admitted.add(peer_id)
        peer = self._peer(peer_id)
        peer.sessions += 1
        peer.kv_tokens += kv_tokens
        self._sessions += 1
        self._wake()
        return None

    def open_session(self, peer_id: str, kv_tokens: int) -> None:
        """Reserve a slot now or raise Busy with a retry hint (no waiting, never a strike)."""
        hint = self.try_open(peer_id, kv_tokens)
        if hint is not None:
            self.opens_busy += 1
            raise Busy(self._why(peer_id, kv_tokens), retry_after_s=hint)

    async def acquire(self, peer_id: str, kv_tokens: int) -> None:
        """Reserve a slot, waiting in the queue (bounded in count and time) for one; then Busy
        with a retry hint. Cancellation: nothing reserved, the open leaves the queue."""
        hint = self.try_open(peer_id, kv_tokens)
        if hint is None:
            return
        shares = self.shares
        mine = sum(1 for p, _ in self._queue.values() if p == peer_id)
        never = self.max_sessions < 1 or self.limits.max_sessions < 1  # no slot will ever free
        if (never or len(self._queue) >= shares.max_queued or mine >= self.limits.max_queued_opens
                or shares.queue_wait_s <= 0):
            self.opens_busy += 1
            why = "this node takes no sessions" if never else "the queue is full"
            raise Busy(f"{self._why(peer_id, kv_tokens)}; {why}", retry_after_s=hint)
        ticket = next(self._tickets)
        self._queue[ticket] = (peer_id, kv_tokens)
        self.opens_waited += 1
        deadline = trio.current_time() + shares.queue_wait_s
        try:
            while True:
                changed = self._changed
                hint = self.try_open(peer_id, kv_tokens, ticket)
                if hint is None:
                    return
                if trio.current_time() >= deadline:
                    self.opens_busy += 1
                    raise Busy(f"{self._why(peer_id, kv_tokens)}; waited {shares.queue_wait_s:g} s",
                               retry_after_s=hint)
                # Woken by any change; a new-identity token arrives with time, not an event.
                with trio.move_on_at(min(deadline, trio.current_time() + max(hint, 0.01))):
                    await changed.wait()
        finally:
            del self._queue[ticket]
            self._wake()

    def close_session(self, peer_id: str, kv_tokens: int) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if peer.sessions > 0:
            self._sessions -= 1
        peer.sessions = max(0, peer.sessions - 1)
        peer.kv_tokens = max(0, peer.kv_tokens - kv_tokens)
        self._forget_if_idle(peer_id, peer)
        self._wake()

    def sessions_of(self, peer_id: str) -> int:
        peer = self._peers.get(peer_id)
        return 0 if peer is None else peer.sessions

    def queued(self) -> int:
        """Opens waiting for a slot now."""
        return len(self._queue)

    def _fresh_sessions(self) -> int:
        return sum(p.sessions for pid, p in self._peers.items() if pid not in self._known)

    def _rank(self, peer_id: str, ticket: int) -> tuple[int, int, int]:
        return (0 if peer_id in self._known else 1, self.sessions_of(peer_id), ticket)

    def _blocked(self, peer_id: str, kv_tokens: int, now: float, fresh: int) -> float | None:
        """None when a slot is free for ``peer_id`` now (queue aside), else a retry hint."""
        lim, shares = self.limits, self.shares
        peer = self._peers.get(peer_id) or _Peer()
        if self._sessions >= self.max_sessions or peer.sessions >= lim.max_sessions:
            return shares.retry_after_s
        if peer.kv_tokens + kv_tokens > lim.max_kv_tokens:
            return shares.retry_after_s
        if peer_id not in self._known:
            if fresh >= self.max_sessions - int(self.max_sessions * shares.reserved_for_known):
                return shares.retry_after_s
            if peer_id not in self._admitted and self._new_ids.level(now) < 1:
                return (1 - self._new_ids.level(now)) / self._new_ids.rate
        return None

    def _why(self, peer_id: str, kv_tokens: int) -> str:
        lim = self.limits
        peer = self._peers.get(peer_id) or _Peer()
        if self._sessions >= self.max_sessions:
            return f"{self._sessions} sessions open, all of this node's {self.max_sessions} slots"
        if peer.sessions >= lim.max_sessions:
            return f"this peer holds {peer.sessions} sessions, the most one peer may hold at once"
        if peer.kv_tokens + kv_tokens > lim.max_kv_tokens:
            return f"KV reservation of {peer.kv_tokens + kv_tokens} tokens over the per-peer {lim.max_kv_tokens}"
        if peer_id not in self._known and peer_id not in self._admitted:
            return "new identities are admitted at a bounded rate"
        return "the free session slots are kept for peers with history or taken by others waiting"

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ---- streams before their first frame -------------------------------------------------
    def begin_wait(self, peer_id: str) -> None:
        """One more stream of ``peer_id`` waits for its first frame, or raise Busy past the cap."""
        lim, peer = self.limits, self._peer(peer_id)
        if peer.waiting >= lim.max_waiting_streams:
            self._forget_if_idle(peer_id, peer)
            raise Busy(f"at most {lim.max_waiting_streams} streams per peer may wait for their first frame",
                       retry_after_s=self.shares.retry_after_s)
        peer.waiting += 1

    def end_wait(self, peer_id: str) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.waiting = max(0, peer.waiting - 1)
        self._forget_if_idle(peer_id, peer)

    # ---- steps --------------------------------------------------------------------------
    def step(self, peer_id: str, tokens: int, nbytes: int) -> None:
        """Account one Step of ``tokens`` tokens and ``nbytes`` input bytes, or raise RateLimited."""
        self.check_banned(peer_id)
        lim, now, peer = self.limits, self.clock(), self._peer(peer_id)
        for name, rate, amount in (("steps", lim.steps_per_s, 1), ("tokens", lim.tokens_per_s, tokens),
                                   ("bytes", lim.bytes_per_s, nbytes)):
            bucket = peer.buckets.get(name)
            if bucket is None:
                bucket = peer.buckets[name] = TokenBucket(rate, now=now)
            if not bucket.take(amount, now):
                raise self.strike(peer_id, f"over {rate:g} {name} per second per peer")

    def _forget_if_idle(self, peer_id: str, peer: _Peer) -> None:
        # Keep the table small: a peer with nothing open, no strikes, no ban and full buckets
        # is forgotten (forgetting a half-empty bucket would let close-and-reopen refill it).
        now = self.clock()
        if (peer.sessions == 0 and peer.waiting == 0 and not peer.strikes and peer.banned_until <= now
                and all(b.full(now) for b in peer.buckets.values())):
            del self._peers[peer_id]

    def peers_tracked(self) -> int:
        return len(self._peers)


# ---- command line (``shiza node run``) ----------------------------------------------------------
def read_peer_list(path: Path) -> frozenset[str]:
    """Peer ids, one per line; blank lines and ``#`` comments are ignored."""
    from protocol.identity import public_key_from_peer_id

    peers = set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            public_key_from_peer_id(text)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the operator's typo
            raise ValueError(f"{path}:{n}: not a peer id: {text!r} ({exc})") from None
        peers.add(text)
    return frozenset(peers)
