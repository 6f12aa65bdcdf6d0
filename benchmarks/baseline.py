"""The monolithic baseline: the whole model in this process, greedy decode, same engine code."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class BaselineResult:
    token_ids: list[int]
    ttft_s: float
    decode_s: float

    @property
    def tokens_per_s(self) -> float:
        n = len(self.token_ids) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


def monolithic_greedy(model: str, prompt_ids: list[int], max_new_tokens: int,
                      *, device: str = "cpu", dtype: str = "float32") -> BaselineResult:
    """Greedy-decode ``max_new_tokens`` tokens (no EOS stop) with the whole model in one engine."""
    import torch

    from node.engine.registry import resolve_model
    from node.engine.span import SpanEngine

    source = resolve_model(model)
    engine = SpanEngine.load(source, 0, source.num_layers, device=device, dtype=dtype)
    engine.open_session("baseline", 1, len(prompt_ids) + max_new_tokens,
                        {"temperature": 0.0, "top_p": 1.0, "seed": 0})
    t0 = time.perf_counter()
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    pos = torch.arange(len(prompt_ids), dtype=torch.int64)[None]
    out: list[int] = []
    ttft = 0.0
    for i in range(max_new_tokens):
        tok = int(engine.step("baseline", ids, pos, None)[0])
        if i == 0:
            ttft = time.perf_counter() - t0
        out.append(tok)
        ids = torch.tensor([[tok]], dtype=torch.int64)
        pos = pos[:, -1:] + 1
    decode_s = time.perf_counter() - t0 - ttft
    engine.close_session("baseline")
    return BaselineResult(out, ttft, decode_s)
