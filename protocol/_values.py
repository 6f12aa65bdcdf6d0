"""Nested values of messages and records: served spans and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._fields import check_float, check_int, check_str, fields_of, set_field
from .errors import InvalidMessage
from .ids import MAX_ID_LEN, MAX_LAYERS, MAX_TEMPERATURE, MAX_UINT64


def span_bounds(start: int, end: int) -> None:
    check_int("start", start, 0, MAX_LAYERS - 1)
    check_int("end", end, 1, MAX_LAYERS)
    if end <= start:
        raise InvalidMessage(f"span end ({end}) must be greater than start ({start})")


@dataclass(frozen=True)
class ServedSpan:
    """Layers [start, end) of ``model_id``, a model of ``num_layers`` decoder layers."""

    model_id: str
    start: int
    end: int
    num_layers: int

    def __post_init__(self) -> None:
        check_str("model_id", self.model_id, MAX_ID_LEN, nonempty=True)
        span_bounds(self.start, self.end)
        check_int("num_layers", self.num_layers, self.end, MAX_LAYERS)

    def to_wire(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "start": self.start, "end": self.end, "num_layers": self.num_layers}

    @classmethod
    def from_wire(cls, obj: Any) -> ServedSpan:
        return cls(**fields_of(obj, "span", ("model_id", "start", "end", "num_layers")))


@dataclass(frozen=True)
class SamplingParams:
    """How the last span picks the next token. temperature 0 means greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        set_field(self, "temperature", check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        set_field(self, "top_p", check_float("top_p", self.top_p, 0.0, 1.0))
        if self.top_p <= 0.0:
            raise InvalidMessage("top_p must be greater than 0")
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_UINT64)

    def to_wire(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}

    @classmethod
    def from_wire(cls, obj: Any) -> SamplingParams:
        return cls(**fields_of(obj, "sampling", (), {"temperature": 0.0, "top_p": 1.0, "seed": None}))
