"""An engine's decode throughput, measured through the engine interface as the server uses it
(wire tensors in and out, conversions included), the same way for every engine."""

from __future__ import annotations

import time

from protocol.codec import Tensor

from node.engine.base import Engine, StepInput


def measure_throughput(engine: Engine, steps: int = 8, prompt_length: int = 8,
                       batch_size: int = 1) -> float:
    """Decode tokens per second of one session through ``engine`` (after a short prefill).

    A span that ends at the model's last layer is fed back its own tokens (what a client does,
    and what keeps a vLLM stream going); any other span gets random token ids (a first span) or random hidden states. Blocking:
    call it from a worker thread.
    """
    import torch

    from node.engine.tensors import from_torch, to_torch

    sid = f"__throughput-{id(engine)}-{time.monotonic_ns()}"
    engine.open_session(sid, batch_size=batch_size, max_length=prompt_length + steps + 1)
    try:
        gen = torch.Generator().manual_seed(0)
        vocab = engine.vocab_size
        takes_tokens = engine.start == 0
        dtype = getattr(torch, engine.dtype)

        def inputs(t: int) -> Tensor:
            if takes_tokens:
                return from_torch(torch.randint(1, vocab, (batch_size, t), generator=gen))  # (B, T)
            x = torch.randn((batch_size, t, engine.hidden_size), generator=gen)  # (B, T, H)
            return from_torch(x.to(dtype))

        def step(x: Tensor, first: int, t: int) -> Tensor:
            pos = torch.arange(first, first + t).expand(batch_size, -1).contiguous()  # (B, T)
            (out,) = engine.run_steps([StepInput(sid, x, from_torch(pos), None)])
            if isinstance(out, Exception):
                raise out
            return out

        out = step(inputs(prompt_length), 0, prompt_length)
        begin = time.perf_counter()
        for i in range(steps):
            feed_back = takes_tokens and out.dtype == "int64" and len(out.shape) == 1
            x = from_torch(to_torch(out).reshape(batch_size, 1)) if feed_back else inputs(1)
            out = step(x, prompt_length + i, 1)
        elapsed = time.perf_counter() - begin
    finally:
        engine.close_session(sid)
    return steps * batch_size / elapsed
