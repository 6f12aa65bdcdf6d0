"""Window steps of the span engine (speculative decoding, SPEC 9.7): a cut of the cache, a token
per position, and the acceptance rule that keeps sampled output distributed as plain decoding's."""

from __future__ import annotations

import math

import pytest
import torch

from node.engine.errors import BadInput
from node.engine.sampling import top_p_probs as _top_p_probs
from node.engine.span import SpanEngine

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140]


def _open(engines, sid, batch=1, sampling=None):
    for e in engines:
        e.open_session(sid, batch, 64, sampling=sampling)


def _run(engines, sid, ids, pos, **kw):
    x = ids
    for e in engines:
        x = e.step(sid, x, pos, **kw)
    return x


def _plain(engines, n):
    _open(engines, "plain")
    ids, pos, out = torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], []
    for _ in range(n):
        tok = _run(engines, "plain", ids, pos)
        out.append(int(tok[0]))
        ids, pos = tok[:, None], pos[:, -1:] + 1
    return out


@pytest.mark.parametrize("spans", [[(0, 6)], [(0, 2), (2, 6)], [(0, 3), (3, 6)]])
def test_windows_rolled_back_give_the_plain_greedy_tokens(tiny_llama, spans):
    engines = [SpanEngine.load(tiny_llama, a, b) for a, b in spans]
    expected = _plain(engines, 20)
    _open(engines, "w")
    pos = torch.arange(len(PROMPT))[None]
    out = [int(_run(engines, "w", torch.tensor([PROMPT]), pos)[0])]
    kept = held = len(PROMPT)
    cuts = 0
    while len(out) < 20:
        at = len(out)
        # Drafts: the right tokens, but every third one of the text is wrong.
        drafts = [t + 1 if (at + j) % 3 == 2 else t for j, t in enumerate(expected[at:at + 4])] or [7]
        ids = torch.tensor([[out[-1], *drafts]])
        keep = kept if held != kept else None
        cuts += keep is not None
        answer = _run(engines, "w", ids, torch.arange(kept, kept + ids.shape[1])[None], keep=keep,
                      draft=torch.tensor([drafts]))
        assert tuple(answer.shape) == (1, ids.shape[1])  # a token per position
        answer = answer[0].tolist()
        a = 0
        while a < len(drafts) and answer[a] == drafts[a]:
            a += 1
        out += answer[:a + 1]
        held, kept = kept + ids.shape[1], kept + a + 1
        for e in engines:  # what the session holds: the kept positions and the last window's rest
            assert e._get("w").length == held
    assert out[:20] == expected
    assert cuts > 3


def test_a_cut_beyond_the_cache_or_a_misshapen_draft_is_bad_input(tiny_llama):
    e = SpanEngine.load(tiny_llama, 0, 6)
    e.open_session("s", 1, 64)
    e.step("s", torch.tensor([PROMPT]), torch.arange(7)[None])
    with pytest.raises(BadInput, match="keep"):
        e.step("s", torch.tensor([[5]]), torch.tensor([[7]]), keep=8)
    with pytest.raises(BadInput, match="draft"):
        e.step("s", torch.tensor([[5, 6]]), torch.tensor([[7, 8]]), draft=torch.tensor([[6, 7]]))
    with pytest.raises(BadInput, match="draft"):
        e.step("s", torch.tensor([[5, 6]]), torch.tensor([[7, 8]]), draft=torch.tensor([[10**6]]))


def _first_probs(engine, context, temperature, top_p):
    with torch.inference_mode():
        logits = engine.module(input_ids=torch.tensor([context])).logits[0, -1].float()
    return _top_p_probs(logits, temperature, top_p)


def _assert_distributed_as(samples, probs, bins):
    """Each of ``bins`` (and everything else, pooled) is drawn as often as ``probs`` says, within
    5 standard deviations; a chi-square over the same bins stays below its 1e-6 tail."""
    n = len(samples)
    counts = {b: 0 for b in bins}
    for s in samples:
        if s in counts:
            counts[s] += 1
    expected = {b: n * float(probs[b]) for b in bins}
    rest_obs, rest_exp = n - sum(counts.values()), n - sum(expected.values())
    chi = 0.0
    for obs, exp in [*((counts[b], expected[b]) for b in bins), (rest_obs, rest_exp)]:
        sd = math.sqrt(max(exp * (1 - exp / n), 1e-9))
        assert abs(obs - exp) < 5 * sd + 1, (obs, exp)
        chi += (obs - exp) ** 2 / max(exp, 1e-9)
    assert chi < 35.0, chi  # 1e-6 tail of chi-square with <= 5 degrees of freedom is ~35.9


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory):
    """A 2-layer random Llama with 512 tokens: thousands of sampled rows in a second."""
    from node.engine.registry import resolve_model
    from node.engine.testing import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("vocab512"), seed=0, num_layers=2, vocab_size=512)
    return resolve_model(str(path), progress=False)


@pytest.mark.parametrize("top_p,rank", [(1.0, 1), (1.0, 0), (0.6, 1)])
def test_sampled_windows_keep_the_model_distribution(small_vocab, top_p, rank):
    """Many rows of one session each speculate the same two drafts: the first token emitted (the
    draft where accepted, else the answer) and the second (where the first draft was accepted)
    must be distributed as plain sampling's. Always accepting, or resampling from the full
    distribution after a rejection, fails this (the draft's share would be 1, or p + (1 - p) p)."""
    rows, temperature, prompt = 2000, 0.5, [t % 512 for t in PROMPT]
    e = SpanEngine.load(small_vocab, 0, 2)
    p0 = _first_probs(e, prompt, temperature, top_p)
    top = p0.topk(4).indices.tolist()
    d1 = top[rank]
    p1 = _first_probs(e, prompt + [d1], temperature, top_p)
    d2 = int(p1.argmax())
    e.open_session("s", rows, 16, sampling={"temperature": temperature, "top_p": top_p, "seed": 3})
    batch = torch.tensor([prompt] * rows)
    e.step("s", batch[:, :-1], torch.arange(6).expand(rows, 6))
    ids = torch.tensor([[prompt[-1], d1, d2]] * rows)
    answer = e.step("s", ids, torch.arange(6, 9).expand(rows, 3), draft=torch.tensor([[d1, d2]] * rows))
    first = answer[:, 0].tolist()
    _assert_distributed_as(first, p0, top)
    accepted = [i for i, t in enumerate(first) if t == d1]
    second = [int(answer[i, 1]) for i in accepted]
    assert len(second) > 100
    _assert_distributed_as(second, p1, p1.topk(3).indices.tolist())


def test_windows_of_different_lengths_share_one_forward_with_the_tokens_they_get_alone(tiny_llama):
    """Continuous batching: sessions with windows of 1, 3 and 5 positions (and cuts pending) in
    one step_batch answer what each answers alone, and the batch is one forward."""
    from node.engine import span as span_mod

    alone_e, batch_e = SpanEngine.load(tiny_llama, 0, 6), SpanEngine.load(tiny_llama, 0, 6)
    prompts = [PROMPT, PROMPT[:5], PROMPT[2:]]
    windows = [[9, 10, 11, 12], [], [13, 14]]
    expected = []
    for k, (p, w) in enumerate(zip(prompts, windows)):
        for e in (alone_e, batch_e):
            e.open_session(f"s{k}", 1, 64)
            e.step(f"s{k}", torch.tensor([p]), torch.arange(len(p))[None])
            e.step(f"s{k}", torch.tensor([[3, 4]]), torch.arange(len(p), len(p) + 2)[None])  # to be cut
        ids = torch.tensor([[5, *w]])
        pos = torch.arange(len(p) + 1, len(p) + 1 + ids.shape[1])[None]
        draft = torch.tensor([w]) if w else None
        expected.append((ids, pos, draft, alone_e.step(f"s{k}", ids, pos, keep=len(p) + 1, draft=draft)))
    calls = []
    forward = batch_e._forward_group
    batch_e._forward_group = lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    items = [(f"s{k}", ids, pos, None, len(prompts[k]) + 1, draft) for k, (ids, pos, draft, _) in enumerate(expected)]
    outs = batch_e.step_batch(items)
    assert calls == [1]
    for (ids, _, draft, want), got in zip(expected, outs):
        assert torch.equal(got, want)
        assert tuple(got.shape) == ((1, ids.shape[1]) if draft is not None else (1,))
    assert span_mod.MAX_GROUP_WINDOW >= 16
