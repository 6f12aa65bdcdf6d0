"""Decoding through a chain of span engines in one process (the engine tests' driver)."""

from __future__ import annotations

import torch

from node.engine import SpanEngine

PAD = 2


def decode_through(hops: list[tuple[SpanEngine, tuple[int, int] | None]], prompts: list[list[int]],
                   new_tokens: int, sampling: dict | None = None, session: str = "s") -> list[list[int]]:
    """Left-pad the prompts into one batch and decode greedily (or sample) through the engines,
    each session opened on the given sub-range of its engine (None: the engine's whole span)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])  # (B, W)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, W)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, W): padding excluded
    for engine, layers in hops:
        engine.open_session(session, batch_size=len(prompts), max_length=64, sampling=sampling, layers=layers)
    out: list[list[int]] = [[] for _ in prompts]
    try:
        x, m = ids, mask
        for _ in range(new_tokens):
            h = x
            for engine, _layers in hops:
                h = engine.step(session, h, positions, m)
            assert h.shape == (len(prompts),) and h.dtype == torch.int64
            for row, tok in zip(out, h.tolist()):
                row.append(tok)
            x = h[:, None]  # (B, 1)
            positions = positions[:, -1:] + 1  # (B, 1)
            m = torch.ones_like(x)
    finally:
        for engine, _layers in hops:
            engine.close_session(session)
    return out
