"""A misbehaving engine, for tests and demonstrations only: a wrapper around any ``Engine`` that
delegates everything and adds the faults it is asked for.

* ``corrupt_outputs`` (``--corrupt-outputs``): Gaussian noise on every hidden-state output,
  scaled to that output's largest magnitude: a lying node, which spot checks must catch. Token
  outputs (the last span's) are left alone.
* ``delay_s`` (``--throttle-ms``): every engine call takes that much longer: a slow node. The
  delay is slept in the worker thread that runs the call (the wrapper never asks to run inline),
  so the node's event loop keeps serving meanwhile; steps batched together share one delay.

The daemon wraps its engine only when its config asks (node/serve/daemon.py); production
handlers know nothing of it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TYPE_CHECKING

from protocol.codec import Tensor

from node.engine.base import Engine, Sampling, StepInput

if TYPE_CHECKING:
    import torch

_FLOATS = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Faults:
    corrupt_outputs: float = 0.0  # noise standard deviation, relative to max |output|
    delay_s: float = 0.0  # extra seconds per engine call
    seed: int = 0  # of the noise

    def __bool__(self) -> bool:
        return self.corrupt_outputs > 0 or self.delay_s > 0


def slowed_throughput(tokens_per_s: float, delay_s: float) -> float:
    """What a client gets from an engine measured at ``tokens_per_s`` with ``delay_s`` added per
    step: the figure a throttled node advertises."""
    if delay_s <= 0:
        return tokens_per_s
    return 1.0 / (1.0 / tokens_per_s + delay_s)


class FaultyEngine:
    """An ``Engine`` that is ``inner`` plus ``faults``. Threads and cancellation as ``inner``'s,
    except that every call runs in a worker thread when a delay is set."""

    def __init__(self, inner: Engine, faults: Faults) -> None:
        self.inner = inner
        self.faults = faults
        self._generator: torch.Generator | None = None  # made on first use: torch only to corrupt

    # --- delegated --------------------------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def start(self) -> int:
        return self.inner.start

    @property
    def end(self) -> int:
        return self.inner.end

    @property
    def hidden_size(self) -> int:
        return self.inner.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.inner.vocab_size

    @property
    def dtype(self) -> str:
        return self.inner.dtype

    @property
    def device(self) -> str:
        return self.inner.device

    @property
    def max_cache_tokens(self) -> int | None:
        return self.inner.max_cache_tokens

    @property
    def windows(self) -> bool:
        return bool(getattr(self.inner, "windows", False))

    @property
    def inline_decode(self) -> bool:
        # A delay slept in the event loop's thread would stall the whole node.
        return self.inner.inline_decode and self.faults.delay_s <= 0

    def open_session(self, session_id: str, batch_size: int, max_length: int,
                     sampling: Mapping[str, object] | Sampling | None = None,
                     layers: tuple[int, int] | None = None) -> None:
        self.inner.open_session(session_id, batch_size, max_length, sampling, layers)

    def close_session(self, session_id: str) -> None:
        self.inner.close_session(session_id)

    def take_logprobs(self, session_id: str) -> Any:
        take = getattr(self.inner, "take_logprobs", None)
        return None if take is None else take(session_id)

    def session_layers(self, session_id: str) -> tuple[int, int]:
        return self.inner.session_layers(session_id)

    def sessions(self) -> list[str]:
        return self.inner.sessions()

    def cache_tokens_used(self) -> int:
        return self.inner.cache_tokens_used()

    def cache_tokens_reserved(self) -> int:
        return self.inner.cache_tokens_reserved()

    def close(self) -> None:
        self.inner.close()

    # --- the faults -------------------------------------------------------------------------
    def run_steps(self, steps: Sequence[StepInput]) -> list[Tensor | Exception]:
        if self.faults.delay_s > 0:
            time.sleep(self.faults.delay_s)  # in a worker thread: inline_decode is False
        results = self.inner.run_steps(steps)
        if self.faults.corrupt_outputs > 0:
            results = [self._corrupt(r) if isinstance(r, Tensor) and r.dtype in _FLOATS else r
                       for r in results]
        return results

    def _corrupt(self, out: Tensor) -> Tensor:
        import torch

        from node.engine.tensors import from_torch, to_torch

        if self._generator is None:
            self._generator = torch.Generator().manual_seed(self.faults.seed)
        x = to_torch(out)
        scale = self.faults.corrupt_outputs * float(x.abs().max()) if x.numel() else 0.0
        noise = torch.randn(x.shape, generator=self._generator, dtype=torch.float32)
        return from_torch((x.float() + noise * scale).to(x.dtype))
