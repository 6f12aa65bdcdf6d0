"""The vLLM span engine (node/engine/vllm/span.py) on SmolLM2: real workers from .venv-vllm.

Three vLLM spans 0:10, 10:20, 20:30 chained in process give transformers' greedy tokens; so do
routes that mix them with transformers spans; several sessions batched in one vLLM forward equal
their solo runs; window steps (speculation), rollbacks, grammars and log-probabilities behave as
on the transformers span; bad steps fail alone and the worker keeps serving. The workers start
once for the module (vLLM's imports take tens of seconds).
"""

from __future__ import annotations

import time

import pytest
import torch

from tests.vllm_marks import VLLM_MARKS, VLLM_PYTHON

from node.engine.errors import BadInput, CapacityExceeded
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.engine.span import SpanEngine

pytestmark = VLLM_MARKS

SPANS = ((0, 10), (10, 20), (20, 30))
PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far")
NEW = 10


@pytest.fixture(scope="module")
def source():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def vllm_spans(source, tmp_path_factory):
    from node.engine.vllm.span import VllmSpanEngine

    log = tmp_path_factory.mktemp("vllm-spans")
    engines = []
    t0 = time.monotonic()
    try:
        for a, b in SPANS:
            engines.append(VllmSpanEngine.load(source, a, b, vllm_python=str(VLLM_PYTHON),
                                               max_model_len=512, log_path=log / f"{a}-{b}.log"))
        print(f"three vLLM span workers up in {time.monotonic() - t0:.1f} s")
        yield engines
    finally:
        for e in engines:
            e.close()


@pytest.fixture(scope="module")
def torch_spans(source):
    return [SpanEngine.load(source, a, b) for a, b in SPANS]


@pytest.fixture(scope="module")
def tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


def _generate(route, ids: list[int], new: int, sid: str = "s", sampling=None) -> list[int]:
    """Greedy (or ``sampling``) tokens through the engines of ``route``, one session each."""
    for e in route:
        e.open_session(sid, 1, len(ids) + new, sampling if e.end == 30 else None)
    try:
        out: list[int] = []
        x = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        for _ in range(new):
            h = x
            for e in route:
                h = e.step(sid, h, pos)
            tok = int(h[0])
            out.append(tok)
            pos = pos[:, -1:] + 1
            x = torch.tensor([[tok]])
        return out
    finally:
        for e in route:
            e.close_session(sid)


def test_three_vllm_spans_equal_transformers_greedy(source, vllm_spans, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        assert _generate(vllm_spans, ids, NEW) == reference_greedy(source, ids, NEW)


def test_mixed_routes_equal_transformers_greedy(source, vllm_spans, torch_spans, tokenizer):
    ids = tokenizer(PROMPTS[0]).input_ids
    want = reference_greedy(source, ids, NEW)
    for mix in ((vllm_spans[0], torch_spans[1], vllm_spans[2]),
                (torch_spans[0], vllm_spans[1], torch_spans[2]),
                (torch_spans[0], torch_spans[1], vllm_spans[2])):
        assert _generate(mix, ids, NEW) == want


def test_hidden_states_close_to_transformers(vllm_spans, torch_spans, tokenizer):
    ids = torch.tensor([tokenizer(PROMPTS[1]).input_ids])
    pos = torch.arange(ids.shape[1])[None]
    for e in (vllm_spans[0], torch_spans[0]):
        e.open_session("h", 1, 64)
    try:
        got, want = vllm_spans[0].step("h", ids, pos), torch_spans[0].step("h", ids, pos)
    finally:
        for e in (vllm_spans[0], torch_spans[0]):
            e.close_session("h")
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    diff = (got - want).abs().max() / want.abs().max()
    assert diff < 1e-3, f"relative difference {diff}"


def test_sessions_batched_in_one_forward_equal_solo(vllm_spans, tokenizer):
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    solo = [_generate(vllm_spans, ids, NEW, sid=f"solo{i}") for i, ids in enumerate(prompts)]
    sids = [f"b{i}" for i in range(len(prompts))]
    for sid, ids in zip(sids, prompts):
        for e in vllm_spans:
            e.open_session(sid, 1, len(ids) + NEW)
    try:
        xs = [torch.tensor([ids]) for ids in prompts]
        poss = [torch.arange(len(ids))[None] for ids in prompts]
        outs: list[list[int]] = [[] for _ in prompts]
        for _ in range(NEW):
            hs = xs
            for e in vllm_spans:  # every session's step in one step_batch: one vLLM forward
                got = e.step_batch([(sid, h, p, None) for sid, h, p in zip(sids, hs, poss)])
                assert not any(isinstance(g, Exception) for g in got), got
                hs = got
            for i, tok in enumerate(hs):
                outs[i].append(int(tok[0]))
            poss = [p[:, -1:] + 1 for p in poss]
            xs = [torch.tensor([[o[-1]]]) for o in outs]
    finally:
        for sid in sids:
            for e in vllm_spans:
                e.close_session(sid)
    assert outs == solo


def test_padded_rows_equal_their_solo_runs(source, vllm_spans, tokenizer):
    a, b = tokenizer(PROMPTS[0]).input_ids, tokenizer(PROMPTS[2]).input_ids
    width = max(len(a), len(b))
    x = torch.tensor([[0] * (width - len(a)) + a, [0] * (width - len(b)) + b])
    mask = torch.tensor([[0] * (width - len(a)) + [1] * len(a), [0] * (width - len(b)) + [1] * len(b)])
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    for e in vllm_spans:
        e.open_session("pad", 2, width + NEW)
    try:
        outs = [[], []]
        m = mask
        for _ in range(NEW):
            h = x
            for e in vllm_spans:
                h = e.step("pad", h, pos, m)
            for r in range(2):
                outs[r].append(int(h[r]))
            pos = pos[:, -1:] + 1
            x, m = h[:, None], None
    finally:
        for e in vllm_spans:
            e.close_session("pad")
    assert outs == [reference_greedy(source, a, NEW), reference_greedy(source, b, NEW)]


def test_window_steps_and_rollback_match_plain_decoding(source, vllm_spans, tokenizer):
    """A window of the true continuation is accepted whole; a wrong draft is rejected at the
    first wrong token; after ``keep`` cuts it back, decoding goes on as if never drafted."""
    ids = tokenizer(PROMPTS[0]).input_ids
    want = reference_greedy(source, ids, 8)
    for e in vllm_spans:
        e.open_session("w", 1, len(ids) + 16)
    try:
        h = torch.tensor([ids])
        pos = torch.arange(len(ids))[None]
        for e in vllm_spans:
            h = e.step("w", h, pos)
        assert int(h[0]) == want[0]
        # window: the first token plus drafts [want[1], want[2], 999 (wrong)]
        draft = torch.tensor([[want[1], want[2], 999]])
        x = torch.tensor([[want[0], want[1], want[2], 999]])
        wpos = torch.arange(len(ids), len(ids) + 4)[None]
        h = x
        for e in vllm_spans:
            h = e.step("w", h, wpos, draft=draft) if e.end == 30 else e.step("w", h, wpos)
        assert h.shape == (1, 4) and h[0, :3].tolist() == want[1:4]
        # keep the prompt + 3 accepted; feed want[3] at its position, then decode plain
        keep = len(ids) + 3
        x, p = torch.tensor([[want[3]]]), torch.tensor([[keep]])
        got = []
        for _ in range(4):
            h = x
            for e in vllm_spans:
                h = e.step("w", h, p, keep=keep) if keep is not None else e.step("w", h, p)
            keep = None
            got.append(int(h[0]))
            x, p = h[:, None], p + 1
        assert got == want[4:8]
    finally:
        for e in vllm_spans:
            e.close_session("w")


def test_grammar_and_logprobs_on_the_last_vllm_span(vllm_spans, torch_spans, tokenizer):
    from node.client.grammars import json_object_grammar

    ids = tokenizer("Reply in JSON:").input_ids
    sampling = {"grammar": json_object_grammar(), "grammar_start": len(ids), "logprobs": 3}
    outs = []
    for last in (vllm_spans[2], torch_spans[2]):
        route = (vllm_spans[0], vllm_spans[1], last)
        tokens = _generate(route, ids, 6, sid="g", sampling=sampling)
        outs.append(tokens)
    assert outs[0] == outs[1]
    assert tokenizer.decode(outs[0]).lstrip().startswith("{")
    vllm_spans[2].open_session("lp", 1, 64, {"logprobs": 2})
    try:
        h = torch.randn(1, 3, vllm_spans[2].hidden_size)
        vllm_spans[2].step("lp", h, torch.arange(3)[None])
        values, top = vllm_spans[2].take_logprobs("lp")
        assert tuple(values.shape) == (1, 3) and tuple(top.shape) == (1, 2)
        assert vllm_spans[2].take_logprobs("lp") is None  # once
    finally:
        vllm_spans[2].close_session("lp")


def test_bad_steps_fail_alone_and_the_worker_serves_on(source, vllm_spans, tokenizer):
    first = vllm_spans[0]
    first.open_session("bad", 1, 8)
    try:
        with pytest.raises(BadInput):  # hidden states to the first span
            first.step("bad", torch.zeros(1, 2, first.hidden_size), torch.arange(2)[None])
        with pytest.raises(BadInput):  # positions that skip
            first.step("bad", torch.tensor([[1, 2]]), torch.tensor([[0, 5]]))
        with pytest.raises(BadInput):  # token ids outside the vocabulary
            first.step("bad", torch.tensor([[1, 10**9]]), torch.arange(2)[None])
    finally:
        first.close_session("bad")
    with pytest.raises(CapacityExceeded):
        first.open_session("huge", 1, 10_000)  # beyond max_model_len
    with pytest.raises(BadInput):
        vllm_spans[1].open_session("sub", 1, 8, layers=(0, 5))  # outside the span
    ids = tokenizer(PROMPTS[0]).input_ids
    assert _generate(vllm_spans, ids, 4) == reference_greedy(source, ids, 4)


def test_capacity_is_vllms_kv_cache_and_blocks_come_back(vllm_spans):
    e = vllm_spans[1]
    total = e.max_cache_tokens
    assert total and total % e.block_size == 0
    free = len(e._free)
    e.open_session("cap", 4, 300)
    assert len(e._free) == free - 4 * -(-300 // e.block_size)
    e.close_session("cap")
    assert len(e._free) == free
