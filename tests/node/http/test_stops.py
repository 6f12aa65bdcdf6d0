"""Stop sequences in the gateway: bounded in count and length, and scanned in linear time.

A stop string is chosen by whoever calls the API; before these bounds a long one cost seconds of
event-loop time per token (every push compared every prefix of every stop with the text's tail).
"""

from __future__ import annotations

import random

import pytest

from node.http.gateway import MAX_STOP, MAX_STOP_CHARS, ApiError, _stops, _StopText


def _naive(text: str, stops: list[str]) -> tuple[str, bool]:
    """The reference meaning of a stop: the text is cut where the first stop to be completed
    begins (the longest, when several end at the same character)."""
    for end in range(1, len(text) + 1):
        starts = [end - len(s) for s in stops if end >= len(s) and text[end - len(s):end] == s]
        if starts:
            return text[:min(starts)], True
    return text, False


def _feed(stops: list[str], pieces: list[str]) -> tuple[_StopText, list[str]]:
    st = _StopText(stops)
    out = [st.push(p) for p in pieces]
    out.append(st.flush())
    return st, out


def test_the_attack_costs_linear_work():
    """A stop of the longest allowed length that almost matches everywhere, against a long
    generation that keeps it almost matched: the characters compared grow linearly."""
    stops = ["a" * (MAX_STOP_CHARS - 1) + end for end in "bcde"[:MAX_STOP]]
    for n, piece in ((4_000, "a"), (40_000, "a"), (42_000, "a" * 7)):
        st, out = _feed(stops, [piece] * (n // len(piece)))
        assert not st.stopped and "".join(out) == st.text == "a" * n
        # Each character costs each stop at most two comparisons (KMP's amortised bound),
        # however long the text and the stops: linear, where the old scan compared every
        # prefix of every stop with the text's tail at every push.
        assert n * len(stops) <= st.compared <= 2 * n * len(stops)


def test_held_text_is_bounded_by_the_longest_stop():
    """What is held back is at most one stop long, whatever the text's length."""
    st = _StopText(["x" * 10 + "y"])
    emitted = [st.push("x") for _ in range(1000)]
    assert "".join(emitted) == "x" * (1000 - 10)  # the last 10 could still begin the stop
    assert st.push("y") == "" and st.stopped and st.text == "x" * 990
    none = _StopText([])
    assert none.push("abc") == "abc" and none.flush() == "" and none.text == "abc"  # nothing to hold


@pytest.mark.parametrize("seed", range(40))
def test_cut_and_stream_equal_the_reference(seed):
    rng = random.Random(seed)
    alphabet = "ab" if seed % 2 else "abc"
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, MAX_STOP))]
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(0, 8))))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    st, out = _feed(stops, pieces)
    expected, stopped = _naive(text, stops)
    assert (st.text, st.stopped) == (expected, stopped)
    assert "".join(out) == expected  # the stream shows exactly the cut text, never more
    if not stopped:  # no more is held back than could still become a stop
        shown, given = 0, 0
        for piece, emitted in zip(pieces, out):
            shown, given = shown + len(emitted), given + len(piece)
            assert shown >= given - (max(map(len, stops)) - 1)


def test_stop_bounds_answer_400_in_openais_shape():
    assert _stops({"stop": "x" * MAX_STOP_CHARS}) == ["x" * MAX_STOP_CHARS]
    assert _stops({"stop": ["a"] * MAX_STOP}) == ["a"] * MAX_STOP
    for bad in ("x" * (MAX_STOP_CHARS + 1), ["ok", "y" * (MAX_STOP_CHARS + 1)], ["a"] * (MAX_STOP + 1),
                "", [""], [1], {"a": 1}):
        with pytest.raises(ApiError) as info:
            _stops({"stop": bad})
        err = info.value
        assert err.status == 400 and err.param == "stop"
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
        assert err.body()["error"]["type"] == "invalid_request_error"
