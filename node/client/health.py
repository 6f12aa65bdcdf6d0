"""What a client has learned about peers by using them: failures to back off from, round trips.

Both are pure bookkeeping: time comes in as an argument (``now``, seconds on any monotonic
clock the caller picks), so tests state times explicitly and nothing sleeps.
"""

from __future__ import annotations

import math


class PeerHealth:
    """Exponential back-off from peers that failed.

    The first failure avoids a peer for ``base_s``; each further consecutive failure doubles
    that, up to ``max_s``. A success forgets the peer's failures. A peer whose back-off has run
    out is tried again (and, if it fails again, avoided for twice as long as before).
    """

    def __init__(self, base_s: float = 5.0, max_s: float = 300.0) -> None:
        if not 0 < base_s <= max_s:
            raise ValueError(f"need 0 < base_s <= max_s, got {base_s}, {max_s}")
        self.base_s = base_s
        self.max_s = max_s
        self._failures: dict[str, int] = {}
        self._until: dict[str, float] = {}
        self._distrusted: dict[str, float] = {}

    def failed(self, peer_id: str, now: float) -> float:
        """Record a failure at ``now``; returns when the peer may be tried again.

        One incident counts once: while the peer is backed off, further failures (every
        concurrent session on a node that stalled reports it) do not lengthen the back-off;
        the first failure after it ran out does."""
        until = self._until.get(peer_id)
        if until is not None and until > now:
            return until
        count = self._failures.get(peer_id, 0) + 1
        self._failures[peer_id] = count
        # min() before the power would overflow for a peer failing hundreds of times.
        delay = self.max_s if count > 64 else min(self.max_s, self.base_s * 2.0 ** (count - 1))
        self._until[peer_id] = now + delay
        return self._until[peer_id]

    def distrust(self, peer_id: str, now: float, seconds: float) -> None:
        """Avoid ``peer_id`` for ``seconds`` from ``now`` (caught misbehaving: node/spotcheck.py).
        Unlike a back-off, routing never falls back to a distrusted peer (``distrusted``)."""
        self._failures[peer_id] = max(self._failures.get(peer_id, 0), 64)
        self._until[peer_id] = max(self._until.get(peer_id, 0.0), now + seconds)
        self._distrusted[peer_id] = max(self._distrusted.get(peer_id, 0.0), now + seconds)

    def distrusted(self, now: float) -> frozenset[str]:
        """Peers caught misbehaving and still distrusted at ``now``."""
        return frozenset(p for p, until in self._distrusted.items() if until > now)

    def succeeded(self, peer_id: str) -> None:
        if peer_id in self._distrusted:
            return  # a lying node that answers is still distrusted until its time runs out
        self._failures.pop(peer_id, None)
        self._until.pop(peer_id, None)

    def failures(self, peer_id: str) -> int:
        """Consecutive failures since the last success."""
        return self._failures.get(peer_id, 0)

    def avoided(self, now: float) -> frozenset[str]:
        """Peers still backed off at ``now`` (pass it as ``find_chain(avoid=...)``)."""
        return frozenset(p for p, until in self._until.items() if until > now)


class RttTracker:
    """Exponentially weighted moving average of measured round trips, per peer.

    ``alpha`` is the weight of a new sample (0.3: a peer that got slow shows it within a few
    samples, one slow sample does not swamp the history). The first sample is taken as is.
    """

    def __init__(self, alpha: float = 0.3) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._avg: dict[str, float] = {}

    def observe(self, peer_id: str, seconds: float) -> float:
        """Add one round trip; returns the new average. Negative or non-finite: ValueError."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a round trip must be a finite number >= 0, got {seconds}")
        old = self._avg.get(peer_id)
        new = seconds if old is None else old + self.alpha * (seconds - old)
        self._avg[peer_id] = new
        return new

    def get(self, peer_id: str) -> float | None:
        return self._avg.get(peer_id)

    def forget(self, peer_id: str) -> None:
        self._avg.pop(peer_id, None)
