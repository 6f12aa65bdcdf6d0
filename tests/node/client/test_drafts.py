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
