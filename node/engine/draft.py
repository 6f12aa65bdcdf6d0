"""A draft model for speculative decoding (SPEC.md 9.7), run by the client where it has torch.

``ModelDrafter`` proposes the greedy continuation of a (smaller) model with the target's
tokenizer: any checkpoint the engine loads, run whole by a ``SpanEngine`` whose window steps keep
its cache in step with the text (the positions of drafts the pipeline did not keep are cut with
``keep``). Greedy drafts are a deterministic function of the text, as the last hop's acceptance
rule needs (node/engine/span.py, ``_choose_window``).

The client (node/client/swarm.py) takes a factory of drafters, one per generation, through
``SwarmClient(speculate=...)``: ``model_drafters(spec)`` loads the model once and makes them.
``propose`` computes (one forward per draft token): the client runs it in a worker thread
(``blocking``), never in the event loop.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable, Sequence

import torch

from node.engine.span import SpanEngine

__all__ = ["ModelDrafter", "model_drafters"]

_ids = itertools.count()


class ModelDrafter:
    """Greedy drafts from ``engine`` (a whole model) for one generation of at most
    ``max_length`` tokens."""

    name = "model"
    blocking = True  # propose computes: run it off the event loop

    def __init__(self, engine: SpanEngine, max_length: int = 4096) -> None:
        if engine.start != 0 or not engine.is_last:
            raise ValueError("a draft model must be a whole model (layers 0 to its last)")
        self.engine = engine
        self.session = f"draft-{next(_ids)}"
        self.max_length = max_length
        engine.open_session(self.session, 1, max_length)
        self.tokens: list[int] = []
        self.cached = 0  # tokens of self.tokens the draft cache holds (the rest are fed next)
        self.held = 0  # positions the draft cache holds (cached + its own drafts since)

    def extend(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def propose(self, k: int) -> list[int]:
        if k < 1 or len(self.tokens) + k >= self.max_length:
            return []
        e, sid = self.engine, self.session
        new = self.tokens[self.cached:]
        if not new:  # every token is cached: feed the last one again after a cut
            self.cached -= 1
            new = self.tokens[self.cached:]
        keep = self.cached if self.held != self.cached else None
        ids = torch.tensor([new])
        pos = torch.arange(self.cached, self.cached + len(new))[None]
        tok = int(e.step(sid, ids, pos, keep=keep)[0])
        self.cached = self.held = len(self.tokens)
        drafts = [tok]
        while len(drafts) < k:
            tok = int(e.step(sid, torch.tensor([[tok]]), torch.tensor([[self.held]]))[0])
            self.held += 1
            drafts.append(tok)
        return drafts

    def close(self) -> None:
        try:
            self.engine.close_session(self.session)
        except Exception:  # noqa: BLE001 - closed already
            pass


def model_drafters(spec: str, device: str = "cpu", dtype: str = "float32") -> Callable[[], ModelDrafter]:
    """A factory of drafters over one loaded model (``spec``: a name or checkpoint dir); the
    model is loaded at the first call, once, and shared (its forwards are serialised)."""
    from node.engine.registry import resolve_model

    lock = threading.Lock()
    loaded: list[SpanEngine] = []

    def make() -> ModelDrafter:
        with lock:
            if not loaded:
                source = resolve_model(spec, progress=False)
                loaded.append(SpanEngine.load(source, 0, source.num_layers, device=device, dtype=dtype))
        return ModelDrafter(loaded[0])

    return make
