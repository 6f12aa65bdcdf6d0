"""Presence and frequency penalties on the sampling node (SPEC 9.10), on the tiny model: the
rule itself against raw logits, a session opened mid-generation with the tokens so far resumes
the counts exactly, and window steps with rollbacks give plain decoding's tokens."""

from __future__ import annotations

import pytest
import torch

from node.engine.errors import BadInput
from node.engine.span import SpanEngine

PROMPT = [5, 9, 3, 5, 9, 3, 5, 9]
# Negative: the tiny random model never repeats itself within a few tokens, so a penalty that
# discourages repetition would change nothing visible; one that rewards it changes every run.
PEN = {"presence_penalty": -1.7, "frequency_penalty": -0.3, "grammar_start": len(PROMPT)}


@pytest.fixture(scope="module")
def whole(tiny_llama):
    return SpanEngine.load(tiny_llama, 0, tiny_llama.num_layers)


def _decode(engine, sid, ids, n, sampling, prefix=()):
    """``n`` greedy tokens after ``ids`` (all fed as one prefill), the session opened with
    ``prefix`` as the tokens generated so far."""
    params = dict(sampling, grammar_prefix=(tuple(prefix),)) if prefix else sampling
    engine.open_session(sid, 1, len(ids) + n + 1, params)
    try:
        out = []
        x, pos = torch.tensor([ids]), torch.arange(len(ids))[None]
        for _ in range(n):
            tok = int(engine.step(sid, x, pos)[0])
            out.append(tok)
            x, pos = torch.tensor([[tok]]), pos[:, -1:] + 1
        return out
    finally:
        engine.close_session(sid)


def test_penalties_follow_openais_rule(whole):
    model = whole.module
    got = _decode(whole, "p", PROMPT, 12, PEN)
    ids, counts, want = list(PROMPT), torch.zeros(whole.vocab_size), []
    for _ in range(12):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        best = int((logits + 0.3 * counts + 1.7 * (counts > 0).float()).argmax())
        counts[best] += 1
        want.append(best)
        ids.append(best)
    assert got == want
    assert got != _decode(whole, "q", PROMPT, 12, {})


def _reference(model, ids, n, counts, presence, frequency):
    ids, counts, out = list(ids), counts.clone(), []
    for _ in range(n):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        best = int((logits - frequency * counts - presence * (counts > 0).float()).argmax())
        counts[best] += 1
        out.append(best)
        ids.append(best)
    return out


def test_a_session_opened_mid_generation_resumes_the_counts(whole):
    strong = dict(PEN, presence_penalty=-2.0, frequency_penalty=-2.0)
    full = _decode(whole, "a", PROMPT, 12, strong)
    k = 5
    resumed = _decode(whole, "b", PROMPT + full[:k], 12 - k, strong, prefix=full[:k])
    assert resumed == full[k:]
    counts = torch.zeros(whole.vocab_size)
    for t in full[:k]:
        counts[t] += 1
    text = PROMPT + full[:k]
    assert resumed == _reference(whole.module, text, 12 - k, counts, -2.0, -2.0)
    # what a session that forgot the tokens so far would have chosen instead
    assert resumed != _reference(whole.module, text, 12 - k, torch.zeros(whole.vocab_size), -2.0, -2.0)


def test_window_steps_and_rollback_give_plain_decodings_tokens(whole):
    want = _decode(whole, "w0", PROMPT, 8, PEN)
    whole.open_session("w", 1, 32, PEN)
    try:
        first = int(whole.step("w", torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None])[0])
        assert first == want[0]
        # the next token and drafts: two right ones, then a wrong one
        wrong = (want[3] + 1) % whole.vocab_size
        x = torch.tensor([[want[0], want[1], want[2], wrong]])
        out = whole.step("w", x, torch.arange(len(PROMPT), len(PROMPT) + 4)[None],
                         draft=torch.tensor([[want[1], want[2], wrong]]))
        assert out[0, :3].tolist() == want[1:4]
        keep = len(PROMPT) + 3
        tok = int(whole.step("w", torch.tensor([[want[3]]]), torch.tensor([[keep]]), keep=keep)[0])
        assert tok == want[4]
    finally:
        whole.close_session("w")


def test_bad_penalties_are_refused(whole):
    for bad in ({"presence_penalty": 3.0, "grammar_start": 1}, {"frequency_penalty": "x", "grammar_start": 1},
                {"presence_penalty": 1.0}):  # no start: where would counting begin?
        with pytest.raises(BadInput):
            whole.open_session("bad", 1, 8, bad)
    whole.open_session("gap", 1, 32, PEN)
    try:
        with pytest.raises(BadInput, match="penalties count"):  # skips the generated text's start
            whole.step("gap", torch.tensor([PROMPT + [1, 2]]), torch.arange(len(PROMPT) + 2)[None])
    finally:
        whole.close_session("gap")
