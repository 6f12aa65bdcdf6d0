"""Per-peer limits of a serving node, and temporary bans of peers that keep exceeding them.

A node shares one engine among every peer. Without per-peer limits one peer could hold every
session slot, every byte of KV cache or every forward pass. ``PeerLimiter`` keeps, per remote
peer id (the Noise-authenticated one):

* concurrent sessions and the KV cache they reserve (sum of ``batch_size * max_length``);
* token buckets for steps, tokens and input bytes per second (a burst of one second's worth);
* streams waiting for their first frame (each may hold a partial frame of up to
  MAX_CONTROL_FRAME_BYTES until the open deadline): past ``max_waiting_streams`` a new stream
  is refused with ``Busy`` (wire code 25), not a strike: an honest client opening many
  sessions at once can meet it for a moment.

The server also counts a frame it cannot decode (malformed, too large, over a decoding limit)
as a strike (``strike``).

A request over a limit raises ``RateLimited`` (wire code 27) and counts a *strike*. A peer with
``strikes_to_ban`` strikes within ``strike_window_s`` is banned for ``ban_s``: every stream it
opens is refused at once (cheaply) until the ban runs out. Time comes from ``clock`` (monotonic
seconds), so tests drive it explicitly. Pure bookkeeping: no I/O, no trio.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from protocol.errors import Busy, RateLimited

__all__ = ["PeerLimits", "PeerLimiter", "TokenBucket"]


@dataclass(frozen=True)
class PeerLimits:
    max_sessions: int = 8  # open sessions per peer
    max_kv_tokens: int = 65536  # sum of batch_size * max_length over a peer's open sessions
    steps_per_s: float = 200.0  # Steps per second, per peer (all its sessions together)
    tokens_per_s: float = 65536.0  # tokens (B x T) of Steps per second, per peer
    bytes_per_s: float = 256 * 2**20  # input bytes of Steps per second, per peer
    max_waiting_streams: int = 16  # streams of one peer open but still before their first frame
    strikes_to_ban: int = 3  # limit violations within strike_window_s that earn a ban
    strike_window_s: float = 60.0
    ban_s: float = 60.0


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

    def take(self, amount: float, now: float) -> bool:
        """Take ``amount`` if available; False (and nothing taken) if not."""
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
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


class PeerLimiter:
    """Enforces ``PeerLimits`` for every remote peer; see the module docstring."""

    def __init__(self, limits: PeerLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or PeerLimits()
        self.clock = clock
        self._peers: dict[str, _Peer] = {}
        self.bans_total = 0
        self.strikes_total = 0

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
            raise RateLimited(f"peer banned for {left:.0f} s more after repeated limit violations")

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
            return RateLimited(f"{why}; peer banned for {lim.ban_s:.0f} s")
        return RateLimited(why)

    # ---- sessions -----------------------------------------------------------------------
    def open_session(self, peer_id: str, kv_tokens: int) -> None:
        """Reserve a session slot and ``kv_tokens`` of KV cache, or raise RateLimited."""
        self.check_banned(peer_id)
        lim, peer = self.limits, self._peer(peer_id)
        if peer.sessions >= lim.max_sessions:
            raise self.strike(peer_id, f"at most {lim.max_sessions} open sessions per peer")
        if peer.kv_tokens + kv_tokens > lim.max_kv_tokens:
            raise self.strike(
                peer_id, f"KV reservation of {peer.kv_tokens + kv_tokens} tokens over the "
                f"per-peer {lim.max_kv_tokens}")
        peer.sessions += 1
        peer.kv_tokens += kv_tokens

    def close_session(self, peer_id: str, kv_tokens: int) -> None:
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        peer.sessions = max(0, peer.sessions - 1)
        peer.kv_tokens = max(0, peer.kv_tokens - kv_tokens)
        self._forget_if_idle(peer_id, peer)

    # ---- streams before their first frame -------------------------------------------------
    def begin_wait(self, peer_id: str) -> None:
        """One more stream of ``peer_id`` waits for its first frame, or raise Busy past the cap."""
        lim, peer = self.limits, self._peer(peer_id)
        if peer.waiting >= lim.max_waiting_streams:
            self._forget_if_idle(peer_id, peer)
            raise Busy(f"at most {lim.max_waiting_streams} streams per peer may wait for their first frame")
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
