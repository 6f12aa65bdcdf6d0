"""The engine interface: what the serving node needs of an engine, and the checks every engine
shares. Imports neither torch nor anything of the network: node/serve types against this.

An engine serves layers ``[start, end)`` of one model and keeps a KV cache per session. At this
interface tensors are the wire's (``protocol.codec.Tensor``): each engine converts to its own
representation inside, so the serving path never touches torch. Two implementations:
``node.engine.span.SpanEngine`` (transformers, any span) and ``node.engine.vllm.engine.VllmEngine``
(the whole model through a vLLM server; also a ``SupervisedEngine``). ``node.engine.faults``
wraps either for tests.

Threads and cancellation: every method is synchronous. ``run_steps`` computes (CPU/GPU bound,
or blocks on the vLLM server): the scheduler runs it in its one engine thread, or, for a batch of
decode steps of an engine whose ``inline_decode`` is true, in the event loop's thread (a short
forward; node/serve/scheduler.py says why). A started call cannot be interrupted; cancelling the
task that waits for it abandons nothing half-done (the scheduler shields it). Opening, closing
and the cache figures are quick and thread-safe.

Errors (node/engine/errors.py): ``BadInput``, ``SessionUnknown``, ``CapacityExceeded``, all
``EngineError``; the server maps them to wire codes.
"""

from __future__ import annotations

import dataclasses

from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

from protocol.codec import Tensor

from node.engine.errors import BadInput

__all__ = [
    "Engine", "EngineHealth", "Sampling", "StepInput", "SupervisedEngine", "check_session_size",
    "parse_sampling",
]

SAMPLING_KEYS = frozenset({"temperature", "top_p", "seed", "grammar", "grammar_start", "grammar_prefix", "logprobs",
                           "logit_bias", "presence_penalty", "frequency_penalty"})


class StepInput(NamedTuple):
    """One session's step, as the server received it.

    ``inputs``: int64 token ids (B, T) for a session that starts at layer 0, else hidden states
    (B, T, H) as floats. ``positions``: int64 (B, T), each row's position of each new token
    (padding excluded). ``mask``: int64 (B, T) of 0/1 (0 = left padding); None means all ones.
    A window step (speculative decoding, SPEC.md 9.7): ``keep`` first cuts the session's cache to
    its first ``keep`` positions; ``draft``, int64 (B, T - 1), the drafts in the last T - 1
    positions: a session that ends at the last layer then answers a token per position (B, T).
    """

    session_id: str
    inputs: Tensor
    positions: Tensor
    mask: Tensor | None = None
    keep: int | None = None
    draft: Tensor | None = None


@dataclass(frozen=True)
class Sampling:
    """How a session that ends at the model's last layer picks its next token."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    # Constrained decoding (SPEC 9.8): an llguidance grammar for the tokens at positions
    # grammar_start and on, and each row's tokens there already chosen (a session opened
    # mid-generation). Engines that cannot constrain refuse a grammar (BadInput).
    grammar: str | None = None
    grammar_start: int = 0
    grammar_prefix: tuple[tuple[int, ...], ...] = ()
    logprobs: int | None = None  # report log-probabilities with this many top tokens (SPEC 9.9)
    logit_bias: tuple[tuple[int, float], ...] = ()  # added to those tokens' logits before choosing
    # SPEC 9.10: subtracted from the logit of each token generated from grammar_start on, once
    # (presence) and once per time it appeared (frequency); grammar_prefix: the tokens so far.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty)


def parse_sampling(sampling: Mapping[str, object] | Sampling | None) -> Sampling:
    """``sampling`` checked: keys ``temperature`` (>= 0), ``top_p`` (in (0, 1]) and ``seed``
    (an int); anything else is ``BadInput``."""
    if isinstance(sampling, Sampling):
        return parse_sampling(dataclasses.asdict(sampling))
    else:
        params = dict(sampling or {})
    unknown = set(params) - SAMPLING_KEYS
    if unknown:
        raise BadInput(f"unknown sampling parameters {sorted(unknown)}")
    try:
        temperature = float(params.get("temperature", 0.0))  # type: ignore[arg-type]
        top_p = float(params.get("top_p", 1.0))  # type: ignore[arg-type]
        seed = int(params.get("seed", 0))  # type: ignore[call-overload]
    except (TypeError, ValueError) as e:
        raise BadInput(f"bad sampling parameters {params!r}: {e}") from e
    if not temperature >= 0.0:  # also rejects NaN
        raise BadInput(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise BadInput(f"top_p must be in (0, 1], got {top_p}")
    logprobs = params.get("logprobs")
    if logprobs is not None and (not isinstance(logprobs, int) or isinstance(logprobs, bool)
                                 or not 0 <= logprobs <= 20):
        raise BadInput(f"logprobs must be an int in [0, 20], got {logprobs!r}")
    try:
        bias = tuple((int(t), float(b)) for t, b in (params.get("logit_bias") or ()))  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise BadInput(f"logit_bias must be (token id, bias) pairs: {e}") from e
    try:
        presence = float(params.get("presence_penalty") or 0.0)  # type: ignore[arg-type]
        frequency = float(params.get("frequency_penalty") or 0.0)  # type: ignore[arg-type]
    except (TypeError, ValueError) as e:
        raise BadInput(f"penalties must be numbers: {e}") from e
    if not (-2.0 <= presence <= 2.0 and -2.0 <= frequency <= 2.0):
        raise BadInput(f"penalties must lie in [-2, 2], got {presence}, {frequency}")
    grammar = params.get("grammar")
    if grammar is None and not (presence or frequency):
        return Sampling(temperature, top_p, seed, logprobs=logprobs, logit_bias=bias)
    start, prefix = params.get("grammar_start", 0), params.get("grammar_prefix") or ()
    if grammar is not None and (not isinstance(grammar, str) or not grammar):
        raise BadInput("grammar must be a non-empty string")
    if not isinstance(start, int) or isinstance(start, bool) or start < 1:
        raise BadInput(f"grammar_start must be a positive int (where the generated text starts: a "
                       f"grammar or penalties need it), got {start!r}")
    try:
        rows = tuple(tuple(int(t) for t in row) for row in prefix)  # type: ignore[union-attr]
    except (TypeError, ValueError) as e:
        raise BadInput(f"grammar_prefix must be rows of token ids: {e}") from e
    return Sampling(temperature, top_p, seed, grammar, start, rows, logprobs, bias, presence, frequency)  # type: ignore[arg-type]


def check_session_size(batch_size: object, max_length: object) -> None:
    """``BadInput`` unless both are positive ints (bools are not)."""
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadInput(f"{name} must be a positive int, got {value!r}")


@runtime_checkable
class Engine(Protocol):
    """What node/serve uses of an engine (see the module docstring for threads and errors).
    ``isinstance(x, Engine)`` checks that every member exists (not their signatures)."""

    @property
    def model_id(self) -> str: ...
    @property
    def start(self) -> int: ...  # first layer served (global numbering)
    @property
    def end(self) -> int: ...  # one past the last layer served
    @property
    def hidden_size(self) -> int: ...
    @property
    def vocab_size(self) -> int: ...  # token ids lie in [0, vocab_size)
    @property
    def dtype(self) -> str: ...  # the wire dtype of hidden states in and out ("float32", ...)
    @property
    def device(self) -> str: ...
    @property
    def max_cache_tokens(self) -> int | None:
        """Bound on the sum of ``batch_size * max_length`` over open sessions; None: none."""
        ...
    @property
    def inline_decode(self) -> bool:
        """True when a batch of decode steps is short enough to run in the event loop's thread."""
        ...

    def open_session(self, session_id: str, batch_size: int, max_length: int,
                     sampling: Mapping[str, object] | Sampling | None = None,
                     layers: tuple[int, int] | None = None) -> None:
        """Reserve a cache for ``batch_size`` rows of up to ``max_length`` tokens, running the
        global layers ``layers`` (None: the whole span). ``CapacityExceeded`` when the budget is
        full, ``SessionUnknown`` for an id already open, ``BadInput`` for the rest."""
        ...

    def close_session(self, session_id: str) -> None:
        """Free the session's cache; ``SessionUnknown`` if it is not open."""
        ...

    def session_layers(self, session_id: str) -> tuple[int, int]: ...
    def sessions(self) -> list[str]: ...
    def cache_tokens_used(self) -> int: ...
    def cache_tokens_reserved(self) -> int: ...

    def run_steps(self, steps: Sequence[StepInput]) -> list[Tensor | Exception]:
        """Run the steps of several sessions (at most one step each); the engine decides what
        shares a forward. One entry per step, in order: hidden states (B, T, H) in the engine's
        dtype, or on a session that ends at the last layer the next token of each row, int64
        (B,); or the exception that step raised (one session's bad input fails it alone)."""
        ...

    def close(self) -> None:
        """Release what the engine holds (sessions, processes). Idempotent."""
        ...


@dataclass(frozen=True)
class EngineHealth:
    """One report of an engine that can fail on its own (a server process): up or down."""

    up: bool  # False: it died or stopped answering; its sessions are lost
    cache_usage: float | None = None  # 0..1 of its own KV cache in use, when it says
    detail: str = ""


@runtime_checkable
class SupervisedEngine(Engine, Protocol):
    """An engine behind a process that may die: it reports, the node decides (drain, restart)."""

    def watch(self) -> AsyncGenerator[EngineHealth, None]:
        """Reports at the engine's own cadence, until cancelled: each healthy check with its
        capacity, and ``up=False`` once the engine is down (the caller then restarts it). Close
        it when done (``contextlib.aclosing``)."""
        ...

    def restart(self) -> None:
        """Drop every session and start the engine again; blocks (run it in a worker thread)."""
        ...
