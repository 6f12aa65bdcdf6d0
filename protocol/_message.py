"""The base of every typed message: its wire map, built from and checked against its fields."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar

from ._fields import fields_of
from ._values import SamplingParams, ServedSpan
from .codec import Tensor
from .errors import BadShape, InvalidMessage
from .ids import MAX_TOP_LOGPROBS, PROTOCOL_VERSION


class _Message:
    """Shared wire plumbing: to_wire emits every field, nested values in their wire form."""

    TYPE: ClassVar[str]
    _OPTIONAL: ClassVar[dict[str, Any]] = {}

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"v": PROTOCOL_VERSION, "t": self.TYPE}
        for f in fields(self):  # type: ignore[arg-type]
            out[f.name] = _to_wire_value(getattr(self, f.name))
        return out

    @classmethod
    def _wire_fields(cls, obj: Any) -> dict[str, Any]:
        names = tuple(f.name for f in fields(cls) if f.name not in cls._OPTIONAL)  # type: ignore[arg-type]
        got = fields_of(obj, cls.TYPE, ("v", "t", *names), cls._OPTIONAL)
        del got["v"], got["t"]
        return got

    @classmethod
    def from_wire(cls, obj: Any) -> Any:
        return cls(**cls._wire_fields(obj))


def _to_wire_value(value: Any) -> Any:
    if isinstance(value, (Tensor, ServedSpan, SamplingParams)):
        return value.to_wire()
    if isinstance(value, tuple):
        return [_to_wire_value(item) for item in value]
    return value


def omit_unset(out: dict[str, Any], **defaults: Any) -> dict[str, Any]:
    """``out`` without the optional fields that hold their default: a message that does not use
    a field added later keeps the wire form it had before the field existed."""
    for name, default in defaults.items():  # None or False: singletons
        if name in out and out[name] is default:
            del out[name]
    return out


def _check_bt(name: str, t: Tensor, batch: int, length: int) -> None:
    if t.dtype != "int64":
        raise InvalidMessage(f"{name} must be int64, got {t.dtype}")
    if t.shape != (batch, length):
        raise BadShape(f"{name} shape {list(t.shape)} must be [{batch}, {length}] like input")


def _check_logprobs(output: Any, lp: Any, ids: Any) -> None:
    """A StepResult's ``logprobs`` and ``top_ids`` (SPEC 9.9): both or neither, fitting ``output``."""
    if (lp is None) != (ids is None):
        raise InvalidMessage("logprobs and top_ids come together")
    if lp is None:
        return
    if not isinstance(lp, Tensor) or not isinstance(ids, Tensor):
        raise InvalidMessage("logprobs and top_ids must be tensors")
    if lp.dtype != "float32" or ids.dtype != "int64":
        raise InvalidMessage("logprobs must be float32 and top_ids int64")
    if (not isinstance(output, Tensor) or output.dtype != "int64" or lp.shape[:-1] != output.shape
            or ids.shape[:-1] != output.shape or lp.shape[-1] != ids.shape[-1] + 1
            or ids.shape[-1] > MAX_TOP_LOGPROBS):
        raise BadShape(f"logprobs {list(lp.shape)} and top_ids {list(ids.shape)} do not fit the output "
                       f"{list(getattr(output, 'shape', ()))}")
