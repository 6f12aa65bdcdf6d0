"""The whole-model vLLM engine (node/engine/vllm/engine.py) under grammars, penalties and
log-probabilities (SPEC 9.8-9.10), against the transformers span of the same model, on SmolLM2
through a real vLLM server from .venv-vllm (started once for the module).

The grammar and penalties run in vLLM's engine core (plugin/shiza_logits.py, fed each row's
state with every request): a json_schema answer validates and equals the transformers span's;
a session opened mid-text with ``grammar_prefix`` resumes where it stood; a token the client
feeds that vLLM did not produce restarts the stream with the row's state; penalties choose what
the span chooses; log-probabilities match transformers' log-softmax within 1e-4, greedy and
sampled; state the processor cannot use leaves the server serving.
"""

from __future__ import annotations

import json
import time

import pytest
import torch

from tests.vllm_marks import VLLM_MARKS, VLLM_PYTHON

from node.client.grammars import json_schema_grammar
from node.engine.errors import BadInput
from node.engine.registry import resolve_model
from node.engine.span import SpanEngine
from node.engine.tensors import to_torch

pytestmark = VLLM_MARKS

jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}},
            "required": ["kind"], "additionalProperties": False}},
    "required": ["name", "age", "pet"], "additionalProperties": False}
PROMPT = "Describe a person as JSON:"


@pytest.fixture(scope="module")
def source():
    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def vllm(source, tmp_path_factory):
    from node.engine.vllm.engine import VllmEngine

    log = tmp_path_factory.mktemp("vllm-whole") / "vllm.log"
    t0 = time.monotonic()
    # eager (vLLM's --enforce-eager): no minute of torch.compile at the start; the grammar,
    # penalties and log-probabilities run in vLLM's sampler, outside the compiled forward.
    engine = VllmEngine.load(source, vllm_python=str(VLLM_PYTHON), max_model_len=512, log_path=log,
                             eager=True)
    print(f"vLLM up in {time.monotonic() - t0:.1f} s")
    try:
        yield engine
    finally:
        engine.close()


@pytest.fixture(scope="module")
def span(source):
    return SpanEngine.load(source, 0, source.num_layers)


@pytest.fixture(scope="module")
def tokenizer(source):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source.path)


@pytest.fixture(scope="module")
def model(source):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source.path, torch_dtype=torch.float32).eval()


def _run(engine, ids: list[int], new: int, sampling, sid: str = "s", split: int = 0,
         eos: set[int] | None = None) -> tuple[list[int], list]:
    """Tokens (and each step's log-probabilities, when asked) of one session, stopping after an
    end-of-sequence token; ``split``: the prompt goes in two steps, its first ``split`` tokens
    first (that step's choice is a replay's, dropped)."""
    engine.open_session(sid, 1, len(ids) + new, sampling)
    try:
        out, lps = [], []
        if split:
            engine.step(sid, torch.tensor([ids[:split]]), torch.arange(split)[None])
            engine.take_logprobs(sid)
        x, pos = torch.tensor([ids[split:]]), torch.arange(split, len(ids))[None]
        for _ in range(new):
            tok = int(engine.step(sid, x, pos)[0])
            got = engine.take_logprobs(sid)
            lps.append(None if got is None else (to_torch(got[0]).clone(), to_torch(got[1]).clone()))
            out.append(tok)
            if eos and tok in eos:
                break
            pos, x = pos[:, -1:] + 1, torch.tensor([[tok]])
        return out, lps
    finally:
        engine.close_session(sid)


def _eos(tokenizer) -> set[int]:
    return {int(tokenizer.eos_token_id)}


def test_json_schema_answer_validates_and_equals_the_span(vllm, span, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    sampling = {"grammar": json_schema_grammar(SCHEMA), "grammar_start": len(ids)}
    got, _ = _run(vllm, ids, 80, sampling, eos=_eos(tokenizer))
    want, _ = _run(span, ids, 80, sampling, eos=_eos(tokenizer))
    assert got == want
    assert got[-1] in _eos(tokenizer), "the grammar ended the text"
    jsonschema.validate(json.loads(tokenizer.decode(got[:-1])), SCHEMA)


def test_grammar_resumes_from_grammar_prefix_and_after_a_chunked_prompt(vllm, tokenizer):
    ids = tokenizer(PROMPT).input_ids
    sampling = {"grammar": json_schema_grammar(SCHEMA), "grammar_start": len(ids)}
    whole, _ = _run(vllm, ids, 80, sampling, eos=_eos(tokenizer))
    # A failover's replacement: opened with the first 6 tokens, fed prompt + those at once.
    cut = 6
    resumed, _ = _run(vllm, ids + whole[:cut], 80 - cut,
                      {**sampling, "grammar_prefix": [whole[:cut]]}, sid="r", eos=_eos(tokenizer))
    assert whole[:cut] + resumed == whole
    # The prompt in two chunks: the first chunk's choice is free (a stream without the state),
    # the second's starts the grammar (a new stream with it).
    chunked, _ = _run(vllm, ids, 80, sampling, sid="c", split=3, eos=_eos(tokenizer))
    assert chunked == whole


def test_penalties_choose_what_the_span_chooses(vllm, span, tokenizer):
    ids = tokenizer("Repeat after me: la la la la la la").input_ids
    plain, _ = _run(vllm, ids, 16, None)
    sampling = {"presence_penalty": 0.8, "frequency_penalty": 1.2, "grammar_start": len(ids)}
    got, _ = _run(vllm, ids, 16, sampling)
    want, _ = _run(span, ids, 16, sampling)
    assert got == want
    assert got != plain, "the penalties changed the text"
    # Resumed mid-text: the counts start from grammar_prefix.
    resumed, _ = _run(vllm, ids + got[:5], 11, {**sampling, "grammar_prefix": [got[:5]]}, sid="pr")
    assert got[:5] + resumed == got


def _reference_logprobs(model, ids: list[int], tokens: list[int], temperature: float) -> torch.Tensor:
    """transformers' log-softmax (at ``temperature``) of the distribution of each token."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens])).logits[0, len(ids) - 1:-1].float()
    return torch.log_softmax(logits / (temperature or 1.0), dim=-1)


@pytest.mark.parametrize("sampling", [{"logprobs": 3}, {"logprobs": 2, "temperature": 0.8, "seed": 7}])
def test_logprobs_match_transformers(vllm, model, tokenizer, sampling):
    ids = tokenizer("The capital of France is").input_ids
    tokens, lps = _run(vllm, ids, 8, sampling)
    ref = _reference_logprobs(model, ids, tokens, sampling.get("temperature", 0.0))
    k = sampling["logprobs"]
    for i, (values, top) in enumerate(lps):
        assert tuple(values.shape) == (1, 1 + k) and tuple(top.shape) == (1, k)
        assert abs(float(values[0, 0]) - float(ref[i, tokens[i]])) < 1e-4
        want = ref[i].topk(k)
        assert torch.allclose(values[0, 1:], want.values, atol=1e-4)
        assert [int(t) for t in top[0]] == want.indices.tolist()


def test_refusals_at_the_open(vllm):
    with pytest.raises(BadInput, match="top_p"):
        vllm.open_session("x", 1, 16, {"logprobs": 1, "temperature": 0.7, "top_p": 0.9})
    with pytest.raises(BadInput, match="grammar"):
        vllm.open_session("x", 1, 16, {"grammar": '{"grammars": [{"lark_grammar": "start: ("}]}',
                                       "grammar_start": 1})
    assert vllm.sessions() == []


def test_state_the_processor_cannot_use_leaves_the_server_serving(vllm, tokenizer):
    ids = tokenizer("Hello").input_ids
    for xargs in ({"shiza_grammar": "not a grammar"}, {"shiza_grammar": json_schema_grammar(SCHEMA),
                                                      "shiza_taken": [0, 0, 0]},
                  {"shiza_presence": "much"}):
        status, body = vllm.server.request("POST", "/v1/completions", {
            "model": "shiza", "prompt": ids, "max_tokens": 3, "vllm_xargs": xargs}, timeout_s=60)
        assert status == 200, body[:300]
    assert vllm.healthy()
    again, _ = _run(vllm, ids, 4, None)
    assert len(again) == 4
