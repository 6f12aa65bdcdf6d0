"""node.limits: per-peer limits, strikes and bans, on an explicit clock."""

from __future__ import annotations

import pytest

from node.serve.limits import PeerLimiter, PeerLimits, TokenBucket
from protocol.errors import Busy, RateLimited


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_refills_at_rate() -> None:
    b = TokenBucket(10, now=0.0)
    assert all(b.take(1, 0.0) for _ in range(10))
    assert not b.take(1, 0.0)
    assert b.take(1, 0.1)
    assert not b.take(1, 0.1)
    assert b.full(10.0)


def test_sessions_and_kv_per_peer() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(max_sessions=2, max_kv_tokens=100, strikes_to_ban=10), clock)
    lim.open_session("a", 40)
    lim.open_session("a", 40)
    with pytest.raises(RateLimited, match="open sessions"):
        lim.open_session("a", 1)
    lim.open_session("b", 100)  # another peer is unaffected
    lim.close_session("a", 40)
    with pytest.raises(RateLimited, match="KV reservation"):
        lim.open_session("a", 61)
    lim.open_session("a", 60)


def test_step_rate_strikes_then_ban_then_expiry() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(steps_per_s=5, strikes_to_ban=3, ban_s=30), clock)
    for _ in range(5):
        lim.step("a", 1, 10)
    errors = []
    for _ in range(3):
        with pytest.raises(RateLimited) as info:
            lim.step("a", 1, 10)
        errors.append(str(info.value))
    assert "banned" in errors[-1] and "banned" not in errors[0]
    assert lim.banned_for("a") == pytest.approx(30)
    lim.step("b", 1, 10)  # others unaffected
    with pytest.raises(RateLimited, match="banned"):
        lim.open_session("a", 1)
    clock.t += 31
    lim.check_banned("a")
    lim.step("a", 1, 10)
    assert lim.bans_total == 1


def test_bytes_and_tokens_limits() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(bytes_per_s=1000, tokens_per_s=100, strikes_to_ban=99), clock)
    lim.step("a", 10, 900)
    with pytest.raises(RateLimited, match="bytes"):
        lim.step("a", 10, 900)
    clock.t += 1
    lim.step("a", 100, 10)
    with pytest.raises(RateLimited, match="tokens"):
        lim.step("a", 50, 10)


def test_strikes_outside_the_window_do_not_ban() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(max_sessions=0, strikes_to_ban=2, strike_window_s=10), clock)
    with pytest.raises(RateLimited):
        lim.open_session("a", 1)
    clock.t += 11
    with pytest.raises(RateLimited) as info:
        lim.open_session("a", 1)
    assert "banned" not in str(info.value) and lim.banned_for("a") == 0


def test_idle_peers_are_forgotten() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(), clock)
    lim.open_session("a", 10)
    lim.step("a", 1, 10)
    lim.close_session("a", 10)
    assert lim.peers_tracked() == 1  # bucket not yet full again
    clock.t += 5
    lim.open_session("a", 10)
    lim.close_session("a", 10)
    assert lim.peers_tracked() == 0


def test_streams_waiting_for_a_first_frame_are_capped_per_peer_without_strikes() -> None:
    lim = PeerLimiter(PeerLimits(max_waiting_streams=2), Clock())
    lim.begin_wait("a")
    lim.begin_wait("a")
    with pytest.raises(Busy, match="first frame"):
        lim.begin_wait("a")
    lim.begin_wait("b")  # another peer is unaffected
    lim.end_wait("a")
    lim.begin_wait("a")
    assert lim.strikes_total == 0  # load, not abuse
    for peer in ("a", "a", "b"):
        lim.end_wait(peer)
    assert lim.peers_tracked() == 0  # nothing waiting: forgotten
