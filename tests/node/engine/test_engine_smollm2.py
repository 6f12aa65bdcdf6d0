"""The real SmolLM2-135M-Instruct split into three spans answers like the whole model."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from node.engine import SpanEngine, load_tokenizer, measure_throughput  # noqa: E402
from node.engine.reference import reference_greedy  # noqa: E402
from node.models import ModelSource  # noqa: E402

pytestmark = pytest.mark.slow


def chat_ids(source: ModelSource, question: str) -> list[int]:
    tok = load_tokenizer(source)
    enc = tok.apply_chat_template([{"role": "user", "content": question}],
                                  add_generation_prompt=True)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return [int(i) for i in ids]


def test_three_spans_answer_paris(smollm2: ModelSource) -> None:
    assert smollm2.num_layers == 30 and smollm2.hidden_size == 576
    prompt = chat_ids(smollm2, "What is the capital of France?")
    new = 12
    expected = reference_greedy(smollm2, prompt, new)

    t0 = time.perf_counter()
    chain = [SpanEngine.load(smollm2, a, b) for a, b in [(0, 10), (10, 20), (20, 30)]]
    print(f"loaded 3 spans in {time.perf_counter() - t0:.2f}s")
    for span in chain:
        span.open_session("paris", batch_size=1, max_length=128)
    x = torch.tensor([prompt])
    pos = torch.arange(len(prompt))[None]
    got: list[int] = []
    for _ in range(new):
        h = x
        for span in chain:
            h = span.step("paris", h, pos)
        got.append(int(h[0]))
        x, pos = h[:, None], pos[:, -1:] + 1
    assert got == expected
    text = load_tokenizer(smollm2).decode(got)
    print(repr(text))
    assert "Paris" in text
    for span in chain:
        print(f"span {span.start}:{span.end} decode {measure_throughput(span, steps=8):.1f} tok/s")
