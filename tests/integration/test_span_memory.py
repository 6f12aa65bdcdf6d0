"""A middle span of SmolLM2 costs a small fraction of the whole model's memory."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from benchmarks.memory import compare  # noqa: E402

pytestmark = pytest.mark.slow


def test_middle_span_peak_memory_is_a_fraction_of_the_whole(smollm2) -> None:
    span, whole = compare("smollm2-135m", span=(10, 20), whole=(0, 30))
    print(f"span 10:20 added {span.added_mib:.0f} MiB ({span.params / 1e6:.1f}M params); "
          f"whole 0:30 added {whole.added_mib:.0f} MiB ({whole.params / 1e6:.1f}M params); "
          f"ratio {span.added_mib / whole.added_mib:.2f}")
    assert whole.added_mib > 400  # the whole fp32 model is ~540 MB: the measurement is sane
    assert span.added_mib <= 0.45 * whole.added_mib
