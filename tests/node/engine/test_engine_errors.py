"""Every malformed request gets a distinct engine error, and the session survives it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from node.engine import (  # noqa: E402
    BadInput, CapacityExceeded, EngineError, SessionUnknown, SpanEngine,
)
from node.models import ModelSource  # noqa: E402


@pytest.fixture(scope="module")
def first(tiny_llama: ModelSource) -> SpanEngine:
    return SpanEngine.load(tiny_llama, 0, 2)


@pytest.fixture(scope="module")
def middle(tiny_llama: ModelSource) -> SpanEngine:
    return SpanEngine.load(tiny_llama, 2, 4)


def pos(b: int, t: int, start: int = 0) -> torch.Tensor:
    return (torch.arange(t) + start).expand(b, t).contiguous()


def test_error_tree() -> None:
    for cls in (BadInput, SessionUnknown, CapacityExceeded):
        assert issubclass(cls, EngineError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("inputs, positions, mask, why", [
    (torch.tensor([1, 2, 3]), pos(1, 3), None, "1-D ids"),
    (torch.tensor([[1.0, 2.0]]), pos(1, 2), None, "float ids"),
    (torch.tensor([[1, 2], [3, 4]]), pos(2, 2), None, "wrong batch"),
    (torch.tensor([[1, 2]]), pos(1, 3), None, "positions shape"),
    (torch.tensor([[1, 2]]), pos(1, 2).to(torch.int32), None, "positions dtype"),
    (torch.tensor([[1, 2]]), pos(1, 2, start=15), None, "position beyond max_length"),
    (torch.tensor([[1, 2]]), pos(1, 2), torch.tensor([[1, 2]]), "mask values"),
    (torch.tensor([[1, 2]]), pos(1, 2), torch.tensor([[1]]), "mask shape"),
    (torch.tensor([[1, 10**6]]), pos(1, 2), None, "id beyond vocab"),
    (torch.zeros((1, 0), dtype=torch.int64), torch.zeros((1, 0), dtype=torch.int64), None,
     "no tokens"),
])
def test_first_span_rejects(first: SpanEngine, inputs, positions, mask, why) -> None:
    first.open_session("bad", batch_size=1, max_length=16)
    try:
        with pytest.raises(BadInput):
            first.step("bad", inputs, positions, mask)
        assert first.sessions() == ["bad"], why  # a rejected step leaves the session usable
        first.step("bad", torch.tensor([[1, 2]]), pos(1, 2))
    finally:
        first.close_session("bad")


@pytest.mark.parametrize("inputs", [
    torch.zeros((1, 2, 63)),  # wrong hidden size
    torch.zeros((1, 2), dtype=torch.float32),  # missing hidden axis
    torch.zeros((1, 2, 64), dtype=torch.int64),  # ids where hidden states belong
])
def test_middle_span_rejects(middle: SpanEngine, inputs) -> None:
    middle.open_session("bad", batch_size=1, max_length=16)
    try:
        with pytest.raises(BadInput, match="hidden states"):
            middle.step("bad", inputs, pos(1, 2))
    finally:
        middle.close_session("bad")


def test_middle_span_casts_other_float_dtypes(middle: SpanEngine) -> None:
    middle.open_session("cast", batch_size=1, max_length=16)
    try:
        out = middle.step("cast", torch.zeros((1, 2, 64), dtype=torch.bfloat16), pos(1, 2))
        assert out.dtype == torch.float32 and out.shape == (1, 2, 64)
    finally:
        middle.close_session("cast")


def test_session_capacity(first: SpanEngine) -> None:
    first.open_session("cap", batch_size=1, max_length=4)
    try:
        first.step("cap", torch.tensor([[1, 2, 3]]), pos(1, 3))
        with pytest.raises(CapacityExceeded):
            first.step("cap", torch.tensor([[4, 5]]), pos(1, 2, start=2))
        first.step("cap", torch.tensor([[4]]), pos(1, 1, start=3))
    finally:
        first.close_session("cap")


def test_engine_cache_budget(tiny_llama: ModelSource) -> None:
    span = SpanEngine.load(tiny_llama, 0, 2, max_cache_tokens=100)
    span.open_session("a", batch_size=2, max_length=40)
    with pytest.raises(CapacityExceeded):
        span.open_session("b", batch_size=1, max_length=21)
    span.open_session("b", batch_size=1, max_length=20)
    span.close_session("a")
    span.open_session("c", batch_size=4, max_length=20)


def test_open_session_validation(first: SpanEngine) -> None:
    with pytest.raises(BadInput):
        first.open_session("x", batch_size=0, max_length=8)
    with pytest.raises(BadInput):
        first.open_session("x", batch_size=1, max_length=0)
    with pytest.raises(BadInput):
        first.open_session("x", batch_size=1, max_length=8, sampling={"temperature": -1})
    with pytest.raises(BadInput):
        first.open_session("x", batch_size=1, max_length=8, sampling={"top_p": 0})
    with pytest.raises(BadInput):
        first.open_session("x", batch_size=1, max_length=8, sampling={"top_k": 5})
    first.open_session("x", batch_size=1, max_length=8)
    try:
        with pytest.raises(SessionUnknown):
            first.open_session("x", batch_size=1, max_length=8)
    finally:
        first.close_session("x")
    assert first.sessions() == []


def test_bad_span_and_dtype(tiny_llama: ModelSource) -> None:
    for a, b in [(-1, 2), (2, 2), (4, 7), (3, 1)]:
        with pytest.raises(BadInput):
            SpanEngine.load(tiny_llama, a, b)
    with pytest.raises(BadInput):
        SpanEngine.load(tiny_llama, 0, 2, dtype="float8")
