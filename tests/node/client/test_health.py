import pytest

from node.client.health import PeerHealth, RttTracker


def test_first_failure_avoids_for_base():
    h = PeerHealth()
    assert h.failed("a", now=100.0) == 105.0
    assert h.avoided(100.0) == frozenset({"a"})
    assert h.avoided(104.9) == frozenset({"a"})
    assert h.avoided(105.0) == frozenset()


def test_back_off_doubles_up_to_max():
    h = PeerHealth(base_s=5, max_s=300)
    now, delays = 0.0, []
    for _ in range(9):  # each failure comes once the previous back-off ran out
        until = h.failed("a", now=now)
        delays.append(until - now)
        now = until
    assert delays == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert h.failures("a") == 9
    for _ in range(2000):  # no overflow however long a peer keeps failing
        now = h.failed("a", now=now)
    assert h.avoided(now - 1.0) == frozenset({"a"})


def test_one_incident_counts_once():
    # Before: 8 sessions on a node that stalled once each reported it, and the node was backed
    # off for 5 x 2**7 s (capped at 300 s): every replica of a span got shut out for minutes.
    h = PeerHealth(base_s=5, max_s=300)
    assert [h.failed("p", now=0.0) for _ in range(8)] == [5.0] * 8
    assert h.failures("p") == 1 and h.avoided(5.0) == frozenset()
    assert h.failed("p", now=6.0) == 16.0  # failing again after the back-off: twice as long


def test_a_distrusted_peer_stays_distrusted_through_successes():
    h = PeerHealth()
    h.failed("slow", 0.0)
    h.distrust("liar", 0.0, 3600.0)
    assert h.distrusted(10.0) == {"liar"} and h.avoided(1.0) == {"slow", "liar"}
    h.succeeded("liar")
    assert h.avoided(10.0) == {"liar"} and h.distrusted(3600.0) == frozenset()


def test_success_resets():
    h = PeerHealth()
    h.failed("a", 0.0)
    h.failed("a", 10.0)  # after the first back-off (5 s): a second incident
    h.succeeded("a")
    assert h.avoided(10.0) == frozenset()
    assert h.failures("a") == 0
    assert h.failed("a", 20.0) == 25.0
    h.succeeded("never-failed")  # harmless


def test_peers_are_independent():
    h = PeerHealth(base_s=1, max_s=8)
    h.failed("a", 0.0)
    h.failed("a", 1.0)  # a second incident: 2 s from now
    h.failed("b", 1.0)
    assert h.avoided(2.5) == frozenset({"a"})
    assert h.avoided(1.5) == frozenset({"a", "b"})


def test_bad_back_off_settings():
    with pytest.raises(ValueError):
        PeerHealth(base_s=0)
    with pytest.raises(ValueError):
        PeerHealth(base_s=10, max_s=5)


def test_rtt_moving_average():
    r = RttTracker(alpha=0.5)
    assert r.get("a") is None
    assert r.observe("a", 0.010) == 0.010
    assert r.observe("a", 0.020) == pytest.approx(0.015)
    assert r.get("a") == pytest.approx(0.015)
    assert r.get("b") is None
    r.forget("a")
    assert r.get("a") is None


def test_rtt_rejects_nonsense():
    r = RttTracker()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            r.observe("a", bad)
    with pytest.raises(ValueError):
        RttTracker(alpha=0)
