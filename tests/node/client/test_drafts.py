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
    assert PromptLookup(max_ngram=1, min_ngram=1).extend([1, 2, 9, 3, 2, 8, 1, 2]) is None


def test_one_token_is_too_weak_a_clue_by_default():
    d = PromptLookup()
    d.extend([1, 2, 9, 3, 2])  # only "2" came before
    assert d.propose(2) == []
    lax = PromptLookup(min_ngram=1)
    lax.extend([1, 2, 9, 3, 2])
    assert lax.propose(2) == [9, 3]


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


def _timed(w, plain, a, b, share):
    """``w`` after a plain pass of ``plain`` seconds and windows of 2, 4 and 8 drafts timed at
    ``a + b x positions``, each keeping its first ``round(share x drafts)`` drafts."""
    w.update(0, 0, plain)
    for k in (2, 4, 8, 2, 4, 8):
        w.update(k, round(share * k), a + b * (k + 1))
    return w


def test_the_window_is_sized_by_what_pays():
    # Over 25 ms links a pass costs 0.2 s and a window little more: a long window pays.
    assert _timed(Window(), plain=0.20, a=0.23, b=0.003, share=0.8).paying() >= 6
    # On loopback a window costs twice a plain pass: one whose drafts are rarely kept does not pay.
    assert _timed(Window(), plain=0.01, a=0.02, b=0.003, share=0.1).paying() == 0
    # ... and a good one pays less far than over the slow link.
    fast = _timed(Window(), plain=0.01, a=0.012, b=0.004, share=0.9).paying()
    slow = _timed(Window(), plain=0.10, a=0.10, b=0.002, share=0.9).paying()
    assert fast is not None and 1 <= fast < slow


def test_drafts_kept_in_runs_keep_long_windows_paying():
    # A passage being copied: windows kept whole. The chance of keeping the next draft after a
    # run of kept ones is what counts, so even a window costing twice a plain pass runs long.
    w = Window()
    w.update(0, 0, 0.010)
    for k in (4, 8, 16, 16):
        w.update(k, k, 0.020 + 0.0005 * (k + 1))
    assert w.paying() >= 12
    # One miss at the start of a window does not make the next window short...
    w.update(16, 0, 0.029)
    assert w.paying() >= 8
    # ... but once the runs are forgotten among windows that keep nothing, nothing pays.
    for _ in range(w.memory):
        w.update(16, 0, 0.029)
    assert w.paying() == 0


def test_the_cost_of_a_plain_pass_is_extrapolated_until_one_is_timed():
    w = Window()
    w.update(4, 1, 0.050)
    assert w.cost() is None and w.paying() is None and w.size() == 2  # luck: one past what was kept
    w.update(2, 2, 0.034)
    plain, a, b = w.cost()
    assert (round(a, 3), round(b, 3)) == (0.010, 0.008) and round(plain, 3) == 0.018  # a + b x 1
    w.update(0, 0, 0.012)
    assert round(w.cost()[0], 3) == 0.012  # timed


def test_a_window_that_does_not_pay_probes_now_and_then():
    w = _timed(Window(), plain=0.01, a=0.02, b=0.003, share=0.1)
    sizes = [w.size() for _ in range(12)]
    assert sizes[0] == 1 and sizes.count(1) < 6  # a probe, then pauses that grow
    assert set(sizes) <= {0, 1}
