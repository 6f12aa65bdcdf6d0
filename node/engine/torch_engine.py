"""What the two torch-side engines share: the wire <-> torch edge of ``Engine.run_steps`` and the
checks of a step's tensors, written once.

A subclass (``SpanEngine``, ``VllmEngine``) provides the torch-level ``step`` (and may override
``step_batch`` to share forwards); in-process callers (tests, benchmarks, reference checks) use
those directly with torch tensors. The server goes through ``run_steps`` (node/engine/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from protocol.codec import Tensor
from protocol.errors import BadShape

from node.engine.base import StepInput
from node.engine.errors import BadInput, CapacityExceeded
from node.engine.sessions import S, SessionTable
from node.engine.tensors import from_torch, to_torch

#: (session_id, inputs, positions, mask, keep, draft): a StepInput's fields as torch tensors.
TorchStep = tuple[str, torch.Tensor, torch.Tensor, "torch.Tensor | None", "int | None", "torch.Tensor | None"]


class TorchEngine(SessionTable[S]):
    """Base of engines that compute on torch tensors; implements ``Engine.run_steps``."""

    #: Decode batches are short forwards: the scheduler may run them in the event loop's thread.
    inline_decode = False
    #: ``step`` takes ``keep`` and ``draft`` (window steps, SPEC 9.7); else they are BadInput.
    windows = False

    def step(self, session_id: str, inputs: torch.Tensor, positions: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def step_batch(self, items: Sequence[TorchStep]) -> list[torch.Tensor | Exception]:
        """The steps in turn, each failure kept apart (an engine that batches overrides this)."""
        out: list[torch.Tensor | Exception] = []
        for item in items:
            try:
                out.append(self._step_item(item))
            except Exception as exc:  # noqa: BLE001 - reported to that session only
                out.append(exc)
        return out

    def _step_item(self, item: "TorchStep | tuple[str, torch.Tensor, torch.Tensor, torch.Tensor | None]"
                   ) -> torch.Tensor:
        """``step`` for one item; a 4-tuple is a plain step (in-process callers)."""
        sid, inputs, positions, mask = item[:4]
        keep, draft = step_extras(item)
        if keep is None and draft is None:
            return self.step(sid, inputs, positions, mask)
        if not self.windows:
            raise BadInput(f"{type(self).__name__} runs no window steps (keep, draft): "
                           "speculative decoding needs a transformers span")
        return self.step(sid, inputs, positions, mask, keep=keep, draft=draft)  # type: ignore[call-arg]

    def run_steps(self, steps: Sequence[StepInput]) -> list[Tensor | Exception]:
        """``Engine.run_steps``: wire tensors to torch (views, no copy where possible), one
        ``step_batch``, outputs back to wire tensors. A step whose tensors do not convert fails
        alone with ``BadInput``."""
        results: list[Tensor | Exception | None] = [None] * len(steps)
        items: list[TorchStep] = []
        where: list[int] = []
        for i, s in enumerate(steps):
            try:
                mask = to_torch(s.mask) if s.mask is not None else None
                draft = to_torch(s.draft) if s.draft is not None else None
                items.append((s.session_id, to_torch(s.inputs), to_torch(s.positions), mask, s.keep, draft))
            except (BadShape, KeyError) as exc:  # KeyError: a dtype torch does not take here
                results[i] = BadInput(f"step tensors do not convert: {exc}")
                continue
            where.append(i)
        for i, out in zip(where, self.step_batch(items) if items else []):
            if isinstance(out, Exception):
                results[i] = out
                continue
            try:
                results[i] = from_torch(out)
            except Exception as exc:  # noqa: BLE001 - a bug fails that step only
                results[i] = exc
        return results  # type: ignore[return-value]


def take_last_logprobs(holder: Any) -> tuple[Tensor, Tensor] | None:
    """``holder.last_logprobs`` (a session's, or its chooser's: SPEC 9.9) as wire tensors, once:
    it is cleared; None when the last step left none."""
    got, holder.last_logprobs = holder.last_logprobs, None
    return None if got is None else (from_torch(got[0]), from_torch(got[1]))


def step_extras(item: Sequence[Any]) -> tuple[Any, Any]:
    """``(keep, draft)`` of a TorchStep; ``(None, None)`` for a plain 4-tuple."""
    return (item[4], item[5]) if len(item) > 4 else (None, None)


def validate_step(inputs: Any, positions: Any, mask: Any, *, batch_size: int, max_length: int,
                  length: int, takes_tokens: bool, vocab: int | None, hidden_size: int,
                  what: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The checks of one step against its session, the same for every engine.

    ``takes_tokens``: the session embeds (int64 ids (B, T)), else it takes hidden states
    (B, T, ``hidden_size``) as floats. ``length``: tokens the session holds already; the step
    must fit in ``max_length``. ``what`` names the session in messages ("layers 2:4").
    Returns ``(inputs, positions, mask)`` with ``mask`` all ones when None; raises ``BadInput``,
    or ``CapacityExceeded`` when the tokens do not fit.
    """
    if not isinstance(inputs, torch.Tensor):
        raise BadInput(f"inputs must be a torch.Tensor, got {type(inputs).__name__}")
    if not isinstance(positions, torch.Tensor):
        raise BadInput(f"positions must be a torch.Tensor, got {type(positions).__name__}")
    if takes_tokens:
        if inputs.dtype != torch.int64 or inputs.dim() != 2:
            raise BadInput(f"{what}: expects int64 token ids (B, T); got "
                           f"{inputs.dtype} {tuple(inputs.shape)}")
        if vocab and inputs.numel() and (int(inputs.min()) < 0 or int(inputs.max()) >= vocab):
            raise BadInput(f"token ids must lie in [0, {vocab})")
    elif not inputs.dtype.is_floating_point or inputs.dim() != 3 or inputs.shape[2] != hidden_size:
        raise BadInput(f"{what}: expects hidden states (B, T, {hidden_size}) as floats; got "
                       f"{inputs.dtype} {tuple(inputs.shape)}")
    bt = tuple(inputs.shape[:2])
    if bt[0] != batch_size:
        raise BadInput(f"session was opened with batch_size {batch_size}, inputs have {bt[0]} rows")
    if bt[1] < 1:
        raise BadInput("inputs hold no tokens (T = 0)")
    if positions.dtype != torch.int64 or tuple(positions.shape) != bt:
        raise BadInput(f"positions must be int64 {bt}; got {positions.dtype} "
                       f"{tuple(positions.shape)}")
    if int(positions.min()) < 0 or int(positions.max()) >= max_length:
        raise BadInput(f"positions must lie in [0, {max_length}) (max_length)")
    if mask is None:
        mask = torch.ones(bt, dtype=torch.int64)
    elif not isinstance(mask, torch.Tensor) or mask.dtype != torch.int64 or tuple(mask.shape) != bt:
        raise BadInput(f"mask must be int64 {bt} of 0/1 or None")
    elif bool(((mask != 0) & (mask != 1)).any()):
        raise BadInput("mask must hold only 0 and 1")
    check_room(length, bt[1], max_length)
    return inputs, positions, mask


def check_room(length: int, new: int, max_length: int) -> None:
    """``CapacityExceeded`` unless ``new`` more tokens fit after ``length`` in ``max_length``."""
    if length + new > max_length:
        raise CapacityExceeded(f"session holds {length} of {max_length} tokens; "
                               f"{new} more do not fit")


class SpanFigures:
    """The figures of an engine serving layers ``[_start, _end)`` of ``source``."""

    source: Any
    _start: int
    _end: int

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._end

    @property
    def num_layers(self) -> int:  # layers served
        return self._end - self._start

    @property
    def hidden_size(self) -> int:
        return int(self.source.hidden_size)

    @property
    def is_first(self) -> bool:
        return self._start == 0

    @property
    def is_last(self) -> bool:
        return self._end == self.source.num_layers

    @property
    def model_id(self) -> str:
        return str(self.source.model_id)

    def _sub_range(self, layers: Any) -> tuple[int, int]:
        """``layers`` checked: None (the whole span) or a non-empty ``(a, b)`` inside it."""
        if layers is None:
            return self._start, self._end
        if not isinstance(layers, (tuple, list)) or len(layers) != 2 or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in layers):
            raise BadInput(f"layers must be a pair of ints (start, end), got {layers!r}")
        a, b = layers
        if not self._start <= a < b <= self._end:
            raise BadInput(f"layers {a}:{b} are not a non-empty part of this span "
                           f"{self._start}:{self._end}")
        return a, b

