"""node.client.pacing: Busy opens are retried after the peer's hint (bounded), and a client holds
no more sessions at a peer than it may, learning the peer's share from its Busy answers."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from protocol.errors import Busy, RateLimited
from protocol.messages import Error

from node.client.errors import PeerBusy, peer_error  # type: ignore[attr-defined]
from node.client.pacing import Pacer


def test_a_peers_busy_keeps_its_retry_hint_through_the_clients_errors() -> None:
    exc = peer_error(Error(25, "share full", retry_after_s=2.5).to_exception(), peer_id="p")
    assert isinstance(exc, PeerBusy) and isinstance(exc, Busy) and exc.retry_after_s == 2.5


async def test_a_busy_open_is_retried_after_the_hint_until_it_opens(autojump_clock) -> None:
    pacer = Pacer(jitter=lambda: 0.0)
    answers = [Busy("full", retry_after_s=1.5), Busy("full", retry_after_s=0.5), "session"]
    calls: list[float] = []

    async def open_once() -> str:
        calls.append(trio.current_time())
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert await pacer.open(open_once, "p") == "session"
    assert [round(b - a, 3) for a, b in zip(calls, calls[1:])] == [1.5, 0.5]  # waited each hint
    assert pacer.busy_answers == 2


async def test_busy_retries_are_bounded_in_attempts_and_time(autojump_clock) -> None:
    tries = 0

    async def always_busy() -> None:
        nonlocal tries
        tries += 1
        raise Busy("full", retry_after_s=1.0)

    with pytest.raises(Busy):
        await Pacer(busy_attempts=3, jitter=lambda: 0.0).open(always_busy, "p")
    assert tries == 3
    tries = 0
    t0 = trio.current_time()
    with pytest.raises(Busy):
        await Pacer(busy_attempts=100, busy_total_s=4.0, jitter=lambda: 0.0).open(always_busy, "p")
    assert tries <= 5 and trio.current_time() - t0 <= 4.0


async def test_other_errors_and_long_hints_are_not_retried(autojump_clock) -> None:
    tries = 0

    async def banned() -> None:
        nonlocal tries
        tries += 1
        raise RateLimited("banned", retry_after_s=1.0)

    with pytest.raises(RateLimited):
        await Pacer().open(banned, "p")

    async def busy_for_long() -> None:
        nonlocal tries
        tries += 1
        raise Busy("draining", retry_after_s=600.0)

    with pytest.raises(Busy):
        await Pacer().open(busy_for_long, "p")
    assert tries == 2


async def test_hold_caps_sessions_per_peer_and_learns_a_smaller_share_from_busy() -> None:
    pacer = Pacer(per_peer=2)
    inside: list[str] = []
    release = trio.Event()

    async def generation(route: list[str]) -> None:
        async with pacer.hold(route):
            inside.append(",".join(route))
            await release.wait()

    async with trio.open_nursery() as nursery:
        for route in (["a", "b"], ["b", "c"], ["c", "b"]):  # b is in all three
            nursery.start_soon(generation, route)
        await trio.testing.wait_all_tasks_blocked()
        # Whichever two started first run; the third waits for b (it may hold a slot it took
        # before b: peers are taken in sorted order so that generations never deadlock).
        assert len(inside) == 2 and pacer.held("b") == 2 and all(pacer.held(p) <= 2 for p in "ac")
        release.set()
    assert len(inside) == 3 and pacer.held("b") == 0

    once = Pacer(per_peer=2, busy_attempts=1)

    async def busy() -> None:
        raise Busy("share", retry_after_s=0.0)

    async def ok() -> str:
        return "s"

    async with once.hold(["b"]):
        with pytest.raises(Busy):
            await once.open(busy, "b")
        assert once.limit("b") == 1  # refused while we held one there: our share is one
    async with once.hold(["b"]):
        assert await once.open(ok, "b") == "s"
    assert once.limit("b") == 2  # a success gives one back
