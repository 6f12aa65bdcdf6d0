"""The span engine on CUDA in bf16 and fp16: chained spans equal the whole model.

Tolerance: a chain of spans runs exactly the whole model's kernels on the same device and
dtype, so its last hidden states must match the whole model's (one span 0:30) within
``ATOL`` / ``RTOL`` below (in practice they are bitwise equal: the same kernels on the same
dtype; the margin covers kernel selection by shape), and the first ``AGREE`` of 12 greedy
tokens must be identical (after a near-tie flips in half precision the continuations diverge,
so agreement is checked on a prefix; fp32 on the CPU is exact, tests/node/test_engine_smollm2.py).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from node.engine import SpanEngine  # noqa: E402
from node.models import ModelSource  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

PROMPT = [1, 504, 3458, 282, 4649, 314, 2, 1, 9690, 198]
SPANS = [(0, 10), (10, 20), (20, 30)]
NEW = 12
AGREE = 8
ATOL = {"bfloat16": 0.25, "float16": 0.05}
RTOL = {"bfloat16": 0.05, "float16": 0.01}


def _greedy(engines: list[SpanEngine], sid: str, new: int) -> list[int]:
    for e in engines:
        e.open_session(sid, batch_size=1, max_length=len(PROMPT) + new)
    x = torch.tensor([PROMPT], device="cuda")
    pos = torch.arange(len(PROMPT), device="cuda")[None]  # (1, T)
    out: list[int] = []
    try:
        for _ in range(new):
            h = x
            for e in engines:
                h = e.step(sid, h, pos)
            out.append(int(h[0]))
            x, pos = h[:, None], pos[:, -1:] + 1  # (1, 1) each
    finally:
        for e in engines:
            e.close_session(sid)
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_chained_spans_equal_whole_model_on_cuda(smollm2: ModelSource, dtype: str) -> None:
    whole = SpanEngine.load(smollm2, 0, smollm2.num_layers, device="cuda", dtype=dtype)
    chain = [SpanEngine.load(smollm2, a, b, device="cuda", dtype=dtype) for a, b in SPANS]
    assert whole.device.startswith("cuda") and whole.dtype == dtype

    # Hidden states after layer 20 (the input of the last span) vs the whole model's layers.
    first_two = chain[:2]
    ref_two = SpanEngine.load(smollm2, 0, 20, device="cuda", dtype=dtype)
    x = torch.tensor([PROMPT], device="cuda")
    pos = torch.arange(len(PROMPT), device="cuda")[None]
    for e in [*first_two, ref_two]:
        e.open_session("h", batch_size=1, max_length=len(PROMPT))
    h = x
    for e in first_two:
        h = e.step("h", h, pos)  # (1, T, H)
    ref = ref_two.step("h", x, pos)  # (1, T, H)
    assert h.dtype == ref.dtype == getattr(torch, dtype)
    torch.testing.assert_close(h.float(), ref.float(), atol=ATOL[dtype], rtol=RTOL[dtype])

    expected = _greedy([whole], "w", NEW)
    got = _greedy(chain, "c", NEW)
    assert got[:AGREE] == expected[:AGREE], f"{dtype}: chain {got} vs whole {expected}"


@pytest.mark.parametrize("subrange", [False, True])
def test_step_batch_equals_alone_on_cuda(tiny_llama: ModelSource, subrange: bool) -> None:
    """The batched path (decode groups, prefill groups, the last span's batched head) on CUDA,
    in fp32: four sessions joining and leaving a batch each get their tokens from alone."""
    from tests.node.test_scheduler import check_step_batch_equals_alone

    spans = {"front": (0, 3), "back": (3, 6), "wide_front": (0, 4), "wide_back": (2, 6)}
    engines = {k: SpanEngine.load(tiny_llama, a, b, device="cuda", dtype="float32")
               for k, (a, b) in spans.items()}
    assert all(e.device.startswith("cuda") for e in engines.values())
    check_step_batch_equals_alone(engines, subrange)
