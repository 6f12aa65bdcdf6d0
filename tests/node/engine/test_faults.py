"""The test-only fault wrapper: an Engine like any other, noisy or slow only when asked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from node.engine import SpanEngine  # noqa: E402
from node.engine import faults as faults_module  # noqa: E402
from node.engine.base import Engine, StepInput  # noqa: E402
from node.engine.faults import Faults, FaultyEngine, slowed_throughput  # noqa: E402
from node.engine.tensors import from_torch, to_torch  # noqa: E402
from node.models import ModelSource  # noqa: E402

IDS = torch.tensor([[1, 5, 7, 9]])  # (1, T)
POS = torch.arange(4)[None]  # (1, T)


@pytest.fixture(scope="module")
def front(tiny_llama: ModelSource) -> SpanEngine:
    return SpanEngine.load(tiny_llama, 0, 3, max_cache_tokens=500)


@pytest.fixture(scope="module")
def whole(tiny_llama: ModelSource) -> SpanEngine:
    return SpanEngine.load(tiny_llama, 0, 6)


def run_once(engine: Engine, sid: str) -> torch.Tensor:
    engine.open_session(sid, 1, 16)
    try:
        (out,) = engine.run_steps([StepInput(sid, from_torch(IDS), from_torch(POS))])
        assert not isinstance(out, Exception), out
        return to_torch(out)
    finally:
        engine.close_session(sid)


def test_the_wrapper_is_an_engine_that_delegates(front: SpanEngine) -> None:
    wrapped = FaultyEngine(front, Faults())
    assert isinstance(wrapped, Engine)
    assert (wrapped.model_id, wrapped.start, wrapped.end, wrapped.hidden_size, wrapped.dtype,
            wrapped.max_cache_tokens, wrapped.inline_decode) == (
        front.model_id, 0, 3, 64, "float32", 500, front.inline_decode)
    wrapped.open_session("d", 2, 10)
    assert front.sessions() == ["d"] and wrapped.cache_tokens_reserved() == 20
    assert wrapped.session_layers("d") == (0, 3)
    wrapped.close_session("d")
    assert front.sessions() == []


def test_no_faults_asked_changes_nothing(front: SpanEngine) -> None:
    assert not Faults()
    assert torch.equal(run_once(FaultyEngine(front, Faults()), "a"), run_once(front, "b"))


def test_corrupt_outputs_adds_noise_to_hidden_states_only(front: SpanEngine, whole: SpanEngine) -> None:
    honest = run_once(front, "h")
    lying = run_once(FaultyEngine(front, Faults(corrupt_outputs=0.01)), "l")
    diff = (lying - honest).abs().max()
    assert 0 < float(diff) < 0.2 * float(honest.abs().max())  # noticeable, and scaled by 1 %
    # The last span returns tokens: those stay as they are.
    assert torch.equal(run_once(FaultyEngine(whole, Faults(corrupt_outputs=0.5)), "t"),
                       run_once(whole, "u"))


def test_delay_runs_off_the_event_loop_and_sleeps_per_call(front: SpanEngine,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    monkeypatch.setattr(faults_module.time, "sleep", slept.append)
    slow = FaultyEngine(front, Faults(delay_s=0.15))
    assert slow and not slow.inline_decode  # a delay must never stall the event loop's thread
    run_once(slow, "s")
    assert slept == [0.15]
    run_once(FaultyEngine(front, Faults(corrupt_outputs=0.01)), "n")
    assert slept == [0.15]  # noise alone adds no delay


def test_slowed_throughput_is_what_a_client_gets() -> None:
    assert slowed_throughput(100.0, 0.0) == 100.0
    assert slowed_throughput(100.0, 0.01) == pytest.approx(50.0)  # 10 ms + 10 ms per token
