"""benchmarks/wan/replay.py: drafting policies replayed against recorded greedy outputs. Pure:
no network, no model (a stand-in tokenizer)."""

from __future__ import annotations

import json

import pytest

from benchmarks.wan.prompts import PROMPTS
from benchmarks.wan.replay import POLICIES, PassCost, markdown, plot, replay, replay_run

SLOW = PassCost(plain_s=0.22, legs_s=0.10)  # 25 ms links: a window costs little more than a pass
PASSAGE = list(range(100, 160))


def test_a_copied_passage_takes_far_fewer_passes_than_tokens():
    out = PASSAGE[5:45]  # the answer copies 40 tokens of the prompt
    r = replay(PASSAGE, out, "window", SLOW)
    assert r.tokens == len(out) - 1  # every token after the prefill's, none twice
    assert r.passes <= 8 and r.accepted == r.tokens - r.passes
    assert r.seconds < (len(out) - 1) * SLOW(1) / 3


def test_nothing_to_copy_replays_as_plain_decoding():
    out = list(range(500, 530))  # tokens the prompt never had
    for policy in POLICIES:
        r = replay(PASSAGE, out, policy, SLOW)
        assert (r.tokens, r.passes, r.drafted) == (29, 29, 0)
        assert r.seconds == pytest.approx(29 * SLOW(1))


def test_a_wrong_draft_is_not_kept():
    # The answer copies 10 tokens, then goes its own way: drafts past the fork are rejected.
    out = PASSAGE[:10] + [999, 998, 997]
    r = replay(PASSAGE, out, "fixed16", SLOW)
    assert r.tokens == len(out) - 1
    assert r.accepted == 8  # tokens 1..8 drafted and kept (token 0 is the prefill's, 9 the bonus)
    assert r.drafted > r.accepted


def test_a_second_window_in_flight_counts_only_after_a_whole_first_one():
    out = PASSAGE[:60]
    whole = replay(PASSAGE, out, "window", SLOW)
    ahead = replay(PASSAGE, out, "inflight", SLOW)
    assert ahead.tokens == whole.tokens and ahead.seconds < whole.seconds
    # Forks every 6 tokens: no window is kept whole at its full size, so nothing rides along.
    forked = [t for i in range(0, 54, 6) for t in (*PASSAGE[i:i + 5], 900 + i)]
    assert replay(PASSAGE, forked, "inflight", SLOW).tokens == len(forked) - 1


def test_the_cost_of_a_window_steps_up_from_a_plain_pass():
    c = PassCost(plain_s=0.1, window_step_s=0.03, per_position_s=0.002, legs_s=0.04, hops=3)
    assert c(1) == 0.1 and c(2) == pytest.approx(0.13) and c(12) == pytest.approx(0.15)
    assert c.hop_engine_s(1) == pytest.approx(0.02)
    with pytest.raises(ValueError, match="window, window32"):
        replay([1], [1, 2], "medusa", c)


def _results() -> dict:
    grounded = next(p for p in PROMPTS if p.kind == "grounded")
    chat = next(p for p in PROMPTS if p.kind == "chat")
    runs = []
    for delay in (0, 25):
        plain_s = 0.08 if delay == 0 else 0.22
        for p, out in ((grounded, PASSAGE[:40]), (chat, list(range(600, 640)))):
            runs.append({"delay_ms": delay, "kind": p.kind, "prompt": p.name, "mode": "off", "token_ids": out,
                         "passes": len(out), "decode_s": plain_s * (len(out) - 1), "error": None})
            runs.append({"delay_ms": delay, "kind": p.kind, "prompt": p.name, "mode": "ngram", "token_ids": out,
                         "passes": 10, "decode_s": 2.0, "error": None})
    return {"model": "tiny", "hops": 3, "legs_per_pass": 4, "runs": runs}


def test_a_run_is_replayed_per_delay_kind_and_policy(tmp_path):
    data = _results()
    encode = lambda text: list(PASSAGE) if "\n" in text else [1, 2, 3]  # noqa: E731 - grounded prompts hold a passage
    rows = replay_run(data, encode)
    assert {(r.delay_ms, r.kind, r.policy) for r in rows} == {(d, k, p) for d in (0, 25)
                                                               for k in ("grounded", "chat") for p in POLICIES}
    by = {(r.delay_ms, r.kind, r.policy): r for r in rows}
    # A window costs more next to a loopback pass than next to a 25 ms one: copying pays more there.
    assert by[(25, "grounded", "window")].speedup > by[(0, "grounded", "window")].speedup > 2.0
    assert by[(25, "chat", "window")].speedup == 1.0  # nothing drafted, nothing lost
    assert by[(25, "grounded", "window")].replayed_over_measured is not None
    table = markdown(rows, "results.json")
    assert "| 25 ms | grounded | inflight |" in table
    json.dumps([r.__dict__ for r in rows])
    if plot(rows, tmp_path / "r.png"):
        assert (tmp_path / "r.png").stat().st_size > 0
