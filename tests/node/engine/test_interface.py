"""The engine interface: both engines implement it, speak wire tensors through it, and share
one set of checks (sampling, sizes, budget, step tensors) and one throughput measurement."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from node.engine import SpanEngine  # noqa: E402
from node.engine.base import (  # noqa: E402
    Engine, Sampling, StepInput, SupervisedEngine, check_session_size, parse_sampling,
)
from node.engine.errors import BadInput, CapacityExceeded, SessionUnknown  # noqa: E402
from node.engine.tensors import from_torch, to_torch  # noqa: E402
from node.engine.throughput import measure_throughput  # noqa: E402
from node.engine.vllm.engine import VllmEngine, VllmServer  # noqa: E402
from node.models import ModelSource  # noqa: E402
from protocol.codec import Tensor  # noqa: E402


@pytest.fixture(scope="module")
def front(tiny_llama: ModelSource) -> SpanEngine:
    return SpanEngine.load(tiny_llama, 0, 3)


@pytest.fixture(scope="module")
def back(tiny_llama: ModelSource) -> SpanEngine:
    return SpanEngine.load(tiny_llama, 3, 6, max_cache_tokens=64)


def unstarted_vllm(source: ModelSource, max_model_len: int = 64) -> VllmEngine:
    """A VllmEngine whose server was never started: everything up to the first HTTP call."""
    server = VllmServer(source.path, vllm_python="python", device="cpu", dtype="float32",
                        tensor_parallel=1, max_model_len=max_model_len, log_path=None)
    return VllmEngine(source, server, max_cache_tokens=100)


def test_both_engines_implement_the_interface(front: SpanEngine, tiny_llama: ModelSource) -> None:
    assert isinstance(front, Engine)
    assert not isinstance(front, SupervisedEngine)  # in-process: nothing to supervise
    vllm = unstarted_vllm(tiny_llama)
    assert isinstance(vllm, Engine) and isinstance(vllm, SupervisedEngine)
    assert (vllm.start, vllm.end, vllm.vocab_size) == (0, 6, front.vocab_size)
    # Neither runs in the event loop's thread: vLLM blocks on HTTP; a span engine's forwards all
    # go to the one engine thread (forwards split between two threads ran on one core).
    assert not front.inline_decode and not vllm.inline_decode


def test_run_steps_speaks_wire_tensors_and_equals_the_torch_step(front: SpanEngine,
                                                                 back: SpanEngine) -> None:
    ids = torch.tensor([[1, 5, 7, 9]])  # (1, T)
    pos = torch.arange(4)[None]  # (1, T)
    for e in (front, back):
        e.open_session("w", 1, 16)
        e.open_session("t", 1, 16)
    try:
        (hidden,) = front.run_steps([StepInput("w", from_torch(ids), from_torch(pos))])
        assert isinstance(hidden, Tensor) and hidden.dtype == "float32" and hidden.shape == (1, 4, 64)
        (token,) = back.run_steps([StepInput("w", hidden, from_torch(pos))])
        assert isinstance(token, Tensor) and token.dtype == "int64" and token.shape == (1,)
        alone = back.step("t", front.step("t", ids, pos), pos)
        assert torch.equal(to_torch(token), alone)
    finally:
        for e in (front, back):
            e.close_session("w")
            e.close_session("t")


def test_run_steps_fails_a_bad_step_alone(front: SpanEngine) -> None:
    front.open_session("good", 1, 16)
    front.open_session("bad", 1, 16)
    try:
        ids, pos = from_torch(torch.tensor([[1, 2]])), from_torch(torch.arange(2)[None])
        int32_ids = Tensor("int32", (1, 2), bytes(8))  # a valid wire tensor the engine refuses
        outs = front.run_steps([StepInput("good", ids, pos), StepInput("bad", int32_ids, pos),
                                StepInput("nope", ids, pos)])
        assert isinstance(outs[0], Tensor) and outs[0].shape == (1, 2, 64)
        assert isinstance(outs[1], BadInput) and isinstance(outs[2], SessionUnknown)
    finally:
        front.close_session("good")
        front.close_session("bad")


@pytest.mark.parametrize("sampling", [
    {"temperature": -0.5}, {"temperature": float("nan")}, {"top_p": 0.0}, {"top_p": 1.5},
    {"top_k": 40}, {"seed": "x"}, {"temperature": "hot"},
])
def test_shared_sampling_check_rejects(sampling: dict, front: SpanEngine,
                                       tiny_llama: ModelSource) -> None:
    with pytest.raises(BadInput):
        parse_sampling(sampling)
    for engine in (front, unstarted_vllm(tiny_llama)):  # both engines refuse it the same way
        with pytest.raises(BadInput):
            engine.open_session("s", 1, 8, sampling)
        assert engine.sessions() == []


def test_shared_sampling_check_accepts_and_defaults() -> None:
    assert parse_sampling(None) == Sampling(0.0, 1.0, 0)
    assert parse_sampling({"temperature": 0.7, "top_p": 0.9, "seed": 3}) == Sampling(0.7, 0.9, 3)
    assert parse_sampling(Sampling(1.0, 0.5, 9)) == Sampling(1.0, 0.5, 9)


@pytest.mark.parametrize("batch_size, max_length", [(0, 8), (1, 0), (True, 8), (1.0, 8), (1, None)])
def test_shared_size_check_rejects(batch_size: object, max_length: object) -> None:
    with pytest.raises(BadInput):
        check_session_size(batch_size, max_length)


def test_shared_budget_check_in_both_engines(back: SpanEngine, tiny_llama: ModelSource) -> None:
    vllm = unstarted_vllm(tiny_llama, max_model_len=128)  # max_cache_tokens=100
    for engine, budget in ((back, 64), (vllm, 100)):
        assert engine.max_cache_tokens == budget
        engine.open_session("a", 1, budget - 4)
        with pytest.raises(CapacityExceeded, match="cache budget"):
            engine.open_session("b", 1, 8)
        with pytest.raises(SessionUnknown):
            engine.open_session("a", 1, 1)
        assert engine.cache_tokens_reserved() == budget - 4
        engine.close_session("a")
        engine.open_session("b", 1, 8)
        engine.close_session("b")
    with pytest.raises(CapacityExceeded, match="max_model_len"):
        vllm.open_session("long", 1, 129)


@pytest.mark.parametrize("inputs, positions, why", [
    (torch.tensor([[1.0, 2.0]]), torch.arange(2)[None], "float ids"),
    (torch.tensor([[1, 10**6]]), torch.arange(2)[None], "id beyond vocab"),
    (torch.tensor([[1, 2]]), torch.arange(2)[None].to(torch.int32), "positions dtype"),
    (torch.tensor([[1, 2]]), torch.tensor([[7, 8]]), "position beyond max_length"),
    (torch.tensor([[1, 2], [3, 4]]), torch.arange(2).expand(2, 2), "wrong batch"),
])
def test_shared_step_checks_in_the_vllm_engine(tiny_llama: ModelSource, inputs, positions,
                                               why) -> None:
    """The vLLM engine refuses what the span engine refuses, before any HTTP request."""
    vllm = unstarted_vllm(tiny_llama)
    vllm.open_session("s", 1, 8)
    with pytest.raises(BadInput):
        vllm.step("s", inputs, positions)
    assert vllm.sessions() == ["s"], why  # a refused step leaves the session open


def test_step_beyond_max_length_is_capacity_in_both(front: SpanEngine, tiny_llama: ModelSource) -> None:
    vllm = unstarted_vllm(tiny_llama)
    for engine in (front, vllm):
        engine.open_session("c", 1, 2)
        with pytest.raises(CapacityExceeded):
            engine.step("c", torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]]))
        engine.close_session("c")


@pytest.mark.parametrize("span", [(0, 3), (3, 6), (2, 4), (0, 6)])
def test_measure_throughput_through_the_interface(tiny_llama: ModelSource, span) -> None:
    engine = SpanEngine.load(tiny_llama, *span)
    assert measure_throughput(engine, steps=3, prompt_length=4) > 0
    assert engine.sessions() == []  # its session is closed again
