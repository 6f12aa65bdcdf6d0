"""Sessions on a sub-range of a span: crossing between overlapping spans stays exact."""

from __future__ import annotations

from collections.abc import Callable

import pytest

torch = pytest.importorskip("torch")

from node.engine import BadInput, SpanEngine  # noqa: E402
from node.engine.reference import reference_greedy  # noqa: E402
from tests.node.engine.chain import PAD, decode_through  # noqa: E402
from node.models import ModelSource  # noqa: E402



def generate(hops: list[tuple[SpanEngine, tuple[int, int] | None]], prompts: list[list[int]],
             new_tokens: int, session: str = "s") -> list[list[int]]:
    """Greedy decoding through engines, each session opened on the given sub-range."""
    return decode_through(hops, prompts, new_tokens, session=session)


def test_crossing_overlapping_spans_matches_whole_model(tiny_llama: ModelSource) -> None:
    """0:3 from a 0:4 engine, then 3:6 from a 2:6 engine, equals the whole model."""
    prompt = [1, 504, 3045, 1200, 77, 9021, 88]
    expected = reference_greedy(tiny_llama, prompt, 10)
    front, back = SpanEngine.load(tiny_llama, 0, 4), SpanEngine.load(tiny_llama, 2, 6)
    assert generate([(front, (0, 3)), (back, (3, 6))], [prompt], 10) == [expected]
    # Padded rows make the masks matter (sdpa skips them for an unpadded batch).
    prompts = [prompt, [1, 9000, 9001]]
    expected_rows = reference_greedy(tiny_llama, prompts, 8)
    assert generate([(front, (0, 3)), (back, (3, 6))], prompts, 8) == expected_rows


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_crossing_other_archs(arch: str, tiny_source_factory: Callable[..., ModelSource]) -> None:
    source = tiny_source_factory(arch)
    prompts = [[1, 17, 18], [1, 20000, 20001, 20002, 20003, 20004]]
    expected = reference_greedy(source, prompts, 6)
    a, b = SpanEngine.load(source, 0, 4), SpanEngine.load(source, 1, 6)
    assert generate([(a, (0, 2)), (b, (2, 6))], prompts, 6) == expected


def test_middle_sub_range_of_a_whole_model_span(tiny_llama: ModelSource) -> None:
    """One engine serving 0:6 runs three sessions' worth of sub-ranges: 0:1, 1:5, 5:6."""
    prompts = [[1, 300, 301, 302, 303, 304, 305], [1, 9000, 9001]]
    expected = reference_greedy(tiny_llama, prompts, 6)
    whole = SpanEngine.load(tiny_llama, 0, 6)
    hops = [(whole, (0, 1)), (whole, (1, 5)), (whole, (5, 6))]
    # One engine, three sessions: give each hop its own session id.
    sids = ["p0", "p1", "p2"]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    for sid, (engine, layers) in zip(sids, hops):
        engine.open_session(sid, batch_size=2, max_length=32, layers=layers)
    assert whole.session_layers("p1") == (1, 5)
    out: list[list[int]] = [[], []]
    x, m = ids, mask
    for _ in range(6):
        h = x
        for sid, (engine, _layers) in zip(sids, hops):
            h = engine.step(sid, h, positions, m)
        for row, tok in zip(out, h.tolist()):
            row.append(tok)
        x, positions, m = h[:, None], positions[:, -1:] + 1, torch.ones_like(h[:, None])
    assert out == expected
    # The swap is undone after each step: the whole-span path still works.
    assert len(whole.module.base_model.layers) == 6
    assert not isinstance(whole.module.base_model.norm, torch.nn.Identity)
    for sid in sids:
        whole.close_session(sid)


def test_sub_range_output_kinds(tiny_llama: ModelSource) -> None:
    first = SpanEngine.load(tiny_llama, 0, 4)
    first.open_session("mid", 1, 8, layers=(1, 3))
    with pytest.raises(BadInput, match="hidden states"):
        first.step("mid", torch.tensor([[1, 2]]), torch.tensor([[0, 1]]))
    h = first.step("mid", torch.zeros((1, 2, tiny_llama.hidden_size)), torch.tensor([[0, 1]]))
    assert h.shape == (1, 2, tiny_llama.hidden_size)


@pytest.mark.parametrize("layers", [(0, 2), (2, 2), (3, 2), (2, 7), (4, 7), (1.0, 3), "2:4",
                                    (2, 3, 4), (True, 3)])
def test_bad_sub_ranges_raise(layers: object, tiny_llama: ModelSource) -> None:
    engine = SpanEngine.load(tiny_llama, 2, 6)
    with pytest.raises(BadInput):
        engine.open_session("x", 1, 8, layers=layers)  # type: ignore[arg-type]
    assert engine.sessions() == []


def test_crossing_with_mixed_sliding_and_full_layers(tmp_path) -> None:
    """qwen2 with full layers 0..2 and sliding-window layers 3..5 (window 4 < sequence)."""
    from node.engine.registry import resolve_model
    from node.engine.testing import make_tiny_model

    make_tiny_model(tmp_path, arch="qwen2", use_sliding_window=True, sliding_window=4,
                    max_window_layers=3)
    source = resolve_model(str(tmp_path), progress=False)
    assert source.config["layer_types"][2:4] == ["full_attention", "sliding_attention"]
    # Padded rows: the masks matter (an unpadded batch lets sdpa skip them entirely).
    prompts = [[1, 300, 301, 302, 303, 304, 305], [1, 9000, 9001]]
    expected = reference_greedy(source, prompts, 8)
    a, b = SpanEngine.load(source, 0, 4), SpanEngine.load(source, 1, 6)
    assert generate([(a, (0, 2)), (b, (2, 6))], prompts, 8) == expected
    assert generate([(a, (0, 4)), (b, (4, 6))], prompts, 8) == expected
