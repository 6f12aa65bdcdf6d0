"""node.spotcheck's comparison of outputs (no network)."""

from __future__ import annotations

import struct

from node.client.spotcheck import max_abs_diff, outputs_agree
from protocol.codec import Tensor


def f32(values: list[float], shape: tuple[int, ...] | None = None) -> Tensor:
    return Tensor("float32", shape or (1, 1, len(values)), struct.pack(f"<{len(values)}f", *values))


def test_hidden_states_agree_within_relative_tolerance() -> None:
    a = f32([100.0, -50.0, 1.0])
    assert outputs_agree(a, a, 1e-2) == (True, 0.0)
    assert outputs_agree(f32([100.5, -50.0, 1.0]), a, 1e-2)[0]  # 0.5 <= 1e-2 * 100
    ok, diff = outputs_agree(f32([102.0, -50.0, 1.0]), a, 1e-2)
    assert not ok and diff == 2.0
    # Small magnitudes are compared against 1, not against a tiny maximum.
    assert outputs_agree(f32([0.001, 0.0]), f32([0.005, 0.0]), 1e-2)[0]


def test_shape_or_dtype_mismatch_never_agrees() -> None:
    assert max_abs_diff(f32([1.0, 2.0]), f32([1.0, 2.0], (1, 2, 1))) == float("inf")
    ids = Tensor("int64", (2,), struct.pack("<2q", 5, 6))
    assert outputs_agree(ids, ids, 1.0)[0]
    assert not outputs_agree(ids, Tensor("int64", (2,), struct.pack("<2q", 5, 7)), 1.0)[0]


def test_half_precision_decoding() -> None:
    bf = Tensor("bfloat16", (2,), struct.pack("<2H", 0x3F80, 0x4000))  # 1.0, 2.0
    assert max_abs_diff(bf, Tensor("bfloat16", (2,), struct.pack("<2H", 0x3F80, 0x4040))) == 1.0  # 2 vs 3
    h = Tensor("float16", (1,), struct.pack("<e", 1.5))
    assert max_abs_diff(h, Tensor("float16", (1,), struct.pack("<e", 1.0))) == 0.5
