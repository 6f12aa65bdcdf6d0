"""Draft sources and the adaptive window (node/client/drafts.py)."""

from __future__ import annotations

import pytest

from node.client.drafts import PromptLookup, Window, make_drafter


def test_prompt_lookup_drafts_what_followed_the_latest_occurrence():
    d = PromptLookup()
    d.extend([5, 6, 7, 8, 9, 5, 6])
    assert d.propose(3) == [7, 8, 9]  # "5 6" was followed by 7 8 9
    assert d.propose(1) == [7]
    d.extend([1])
    assert d.propose(2) == []  # "6 1" and "1" never came before
    d.extend([2, 3, 1, 2])
    assert d.propose(4) == [3, 1, 2]  # "1 2" last came before 3 1 2 (and the text ends there)


def test_prompt_lookup_prefers_the_longest_match():
    d = PromptLookup()
    d.extend([1, 2, 9, 3, 2, 8, 1, 2])  # "2" was last followed by 8, "1 2" by 9
    assert d.propose(1) == [9]
    assert PromptLookup(max_ngram=1).extend([1, 2, 9, 3, 2, 8, 1, 2]) is None


def test_make_drafter_names_the_choices():
    assert make_drafter("off") is None
    assert make_drafter("ngram").name == "ngram"
    with pytest.raises(ValueError, match="off, ngram"):
        make_drafter("medusa")


def test_the_window_grows_on_success_and_shrinks_on_failure():
    w = Window(k=4, k_max=16)
    assert w.size() == 4
    w.update(4, 4)
    assert w.size() == 8
    w.update(8, 8)
    w.update(16, 16)
    assert w.size() == 16  # capped
    w.update(16, 2)
    assert w.size() == 3  # one past what was accepted
    w.update(3, 0)
    assert w.size() == 1


def test_fruitless_windows_pause_drafting_longer_each_time():
    w = Window(k=1)
    pauses = []
    for _ in range(4):
        assert w.size() == 1
        w.update(1, 0)
        n = 0
        while w.size() == 0:
            n += 1
        pauses.append(n)
    assert pauses == [1, 2, 4, 8]  # passes without drafts after each fruitless window
    w.update(1, 1)  # an accepted draft ends the back-off
    w.update(2, 0)
    assert w.size() == 1 and w.rest == 0


def _timed(w, a, b, alpha):
    """``w`` after passes timed at ``a + b x positions`` seconds, keeping ``alpha`` of the drafts."""
    for n in (1, 3, 5, 9, 1, 5):
        drafted = n - 1
        w.update(drafted, round(alpha * drafted), a + b * n)
    w.alpha = alpha
    return w


def test_the_window_is_capped_by_what_pays():
    # Over 25 ms links a pass costs 0.1 s whatever its size: a long window pays.
    assert _timed(Window(k=16), a=0.10, b=0.002, alpha=0.8).paying() >= 6
    # On loopback each position costs about what the pass costs: a poor window does not pay.
    assert _timed(Window(k=16), a=0.01, b=0.03, alpha=0.3).paying() == 0
    # ... and a good one pays less far than over the slow link.
    fast = _timed(Window(k=16), a=0.01, b=0.01, alpha=0.9).paying()
    slow = _timed(Window(k=16), a=0.10, b=0.002, alpha=0.9).paying()
    assert 1 <= fast < slow


def test_a_window_that_does_not_pay_probes_now_and_then():
    w = _timed(Window(k=16), a=0.01, b=0.03, alpha=0.1)
    sizes = [w.size() for _ in range(12)]
    assert sizes[0] == 1 and sizes.count(1) < 6  # a probe, then pauses that grow
    assert set(sizes) <= {0, 1}
