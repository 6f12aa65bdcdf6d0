"""node.serve.limits: per-peer limits, node-wide sharing, strikes and bans, on an explicit clock.

Heavy honest use is load, not abuse: an open beyond a peer's share waits or gets Busy with a
retry hint and never counts a strike. Fresh identities are admitted at a bounded rate and cannot
take the slots kept for peers with countersigned history."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from node.serve.limits import NodeShares, PeerLimiter, PeerLimits, TokenBucket
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


def test_sessions_and_kv_beyond_a_peers_share_are_busy_with_a_hint_never_a_strike() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(max_sessions=2, max_kv_tokens=100, strikes_to_ban=1), clock)
    lim.open_session("a", 40)
    lim.open_session("a", 40)
    for _ in range(5):  # before: RateLimited and a strike each; with strikes_to_ban=1, a ban
        with pytest.raises(Busy, match="sessions") as info:
            lim.open_session("a", 1)
        assert info.value.retry_after_s is not None and info.value.retry_after_s > 0
    lim.open_session("b", 100)  # another peer is unaffected
    lim.close_session("a", 40)
    with pytest.raises(Busy, match="KV reservation"):
        lim.open_session("a", 61)
    lim.open_session("a", 60)
    assert (lim.strikes_total, lim.bans_total, lim.banned_for("a")) == (0, 0, 0.0)
    with pytest.raises(RateLimited, match="shorter max_length"):  # can never fit: said so, no strike
        lim.open_session("c", 101)
    assert lim.strikes_total == 0


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
    with pytest.raises(RateLimited, match="banned") as banned:
        lim.open_session("a", 1)
    assert banned.value.retry_after_s == pytest.approx(30)
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
    lim = PeerLimiter(PeerLimits(steps_per_s=1, strikes_to_ban=2, strike_window_s=10), clock)
    lim.step("a", 1, 1)
    with pytest.raises(RateLimited):
        lim.step("a", 1, 1)
    clock.t += 11
    lim.step("a", 1, 1)
    with pytest.raises(RateLimited) as info:
        lim.step("a", 1, 1)
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


def test_eight_fresh_identities_cannot_take_the_slots_kept_for_peers_with_history() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(), clock, max_sessions=64, shares=NodeShares(new_peers_burst=64))
    lim.countersigned("paid")
    held = 0
    for k in range(8):  # before: 8 keys x 8 sessions took all 64 slots
        for _ in range(8):
            if lim.try_open(f"fresh{k}", 10) is None:
                held += 1
    assert held == 48  # a quarter of the budget is kept for peers with history
    for _ in range(8):
        lim.open_session("paid", 10)
    with pytest.raises(Busy):
        lim.open_session("fresh0", 10)
    assert lim.strikes_total == 0


def test_new_identities_are_admitted_at_a_bounded_rate() -> None:
    clock = Clock()
    lim = PeerLimiter(PeerLimits(), clock, shares=NodeShares(new_peers_per_s=2.0, new_peers_burst=2))
    lim.open_session("n1", 1)
    lim.open_session("n2", 1)
    hint = lim.try_open("n3", 1)
    assert hint == pytest.approx(0.5)  # the next token
    lim.open_session("n1", 1)  # an identity admitted before needs no token
    lim.countersigned("old")
    lim.open_session("old", 1)  # nor one with history
    clock.t += 0.5
    lim.open_session("n3", 1)
    with pytest.raises(Busy, match="bounded rate"):
        lim.open_session("n4", 1)


async def test_a_queued_open_gets_the_next_freed_slot_and_the_queue_serves_history_then_fewest() -> None:
    lim = PeerLimiter(PeerLimits(), Clock(), max_sessions=4, shares=NodeShares(reserved_for_known=0))
    lim.countersigned("known")
    for _ in range(3):
        lim.open_session("big", 1)
    lim.open_session("small", 1)  # the node is full: big exceeded its share while nobody waited
    order: list[str] = []

    async def opener(peer: str) -> None:
        await lim.acquire(peer, 1)
        order.append(peer)

    async with trio.open_nursery() as nursery:
        for peer in ("big", "small", "known"):  # queued in this order
            nursery.start_soon(opener, peer)
            await trio.testing.wait_all_tasks_blocked()
        assert lim.queued() == 3 and lim.opens_waited == 3
        # big holds 3, small 1: history first, then the peer holding fewer sessions.
        for closing, expected in (("big", ["known"]), ("known", ["known", "small"]),
                                  ("small", ["known", "small", "big"])):
            lim.close_session(closing, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert order == expected
    assert lim.queued() == 0 and lim.strikes_total == 0


async def test_the_queue_is_bounded_in_time_and_count_then_busy_with_a_hint(autojump_clock) -> None:
    lim = PeerLimiter(PeerLimits(max_sessions=1, max_queued_opens=1), Clock(),
                      shares=NodeShares(queue_wait_s=5.0, retry_after_s=2.0))
    lim.open_session("a", 1)
    results: list[object] = []

    async def opener() -> None:
        try:
            await lim.acquire("a", 1)
            results.append("opened")
        except Busy as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(opener)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(Busy, match="queue is full") as full:  # one queued already: at once
            await lim.acquire("a", 1)
        assert full.value.retry_after_s == 2.0
        t0 = trio.current_time()
    [waited] = results
    assert isinstance(waited, Busy) and "waited 5 s" in str(waited) and waited.retry_after_s == 2.0
    assert trio.current_time() - t0 == pytest.approx(5.0, abs=1.0)
    assert lim.queued() == 0 and lim.strikes_total == 0


async def test_cancelling_a_queued_open_reserves_nothing() -> None:
    lim = PeerLimiter(PeerLimits(max_sessions=1), Clock())
    lim.open_session("a", 1)
    with trio.move_on_after(0.05):
        await lim.acquire("a", 1)
    assert lim.queued() == 0 and lim.sessions_of("a") == 1
