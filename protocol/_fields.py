"""Field checks shared by messages and records. Each raises InvalidMessage naming the field."""

from __future__ import annotations

import math
from typing import Any

from .errors import InvalidMessage, LimitExceeded


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    if type(value) is not int:  # bool is an int subclass and is rejected on purpose
        raise InvalidMessage(f"{name} must be an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidMessage(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if type(value) is not bool:
        raise InvalidMessage(f"{name} must be a boolean, got {type(value).__name__}")
    return value


def check_float(name: str, value: Any, lo: float = -math.inf, hi: float = math.inf) -> float:
    """Accepts int or float (not bool); returns a finite float within [lo, hi]."""
    if type(value) not in (int, float):
        raise InvalidMessage(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or not lo <= value <= hi:
        raise InvalidMessage(f"{name} must be a finite number in [{lo}, {hi}], got {value}")
    return value


def check_str(name: str, value: Any, max_bytes: int, *, nonempty: bool = False) -> str:
    if type(value) is not str:
        raise InvalidMessage(f"{name} must be a string, got {type(value).__name__}")
    if len(value) * 4 > max_bytes and len(value.encode("utf-8")) > max_bytes:
        raise LimitExceeded(f"{name} longer than {max_bytes} bytes")
    if nonempty and not value:
        raise InvalidMessage(f"{name} must not be empty")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if type(value) is not str or value not in choices:
        raise InvalidMessage(f"{name} must be one of {', '.join(choices)}; got {value!r}")
    return value


def check_bytes(name: str, value: Any, max_len: int, *, exact: bool = False) -> bytes:
    """At most ``max_len`` bytes, or exactly ``max_len`` when ``exact``."""
    if type(value) is not bytes:
        raise InvalidMessage(f"{name} must be bytes, got {type(value).__name__}")
    if exact and len(value) != max_len:
        raise InvalidMessage(f"{name} must be {max_len} bytes, got {len(value)}")
    if len(value) > max_len:
        raise LimitExceeded(f"{name} longer than {max_len} bytes")
    return value


def check_hex(name: str, value: Any, length: int) -> str:
    """Exactly ``length`` lowercase hex characters."""
    if type(value) is not str or len(value) != length or value.strip("0123456789abcdef"):
        raise InvalidMessage(f"{name} must be {length} lowercase hex characters")
    return value


def check_seq(name: str, value: Any, max_len: int) -> tuple[Any, ...]:
    """A list or tuple of at most ``max_len`` items, returned as a tuple."""
    if not isinstance(value, (list, tuple)):
        raise InvalidMessage(f"{name} must be an array, got {type(value).__name__}")
    if len(value) > max_len:
        raise LimitExceeded(f"{name} has {len(value)} items, limit is {max_len}")
    return tuple(value)


def fields_of(
    obj: Any, what: str, required: tuple[str, ...], optional: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The fields of a wire map: every required key present, no unknown key; an absent
    optional key takes its default from ``optional``."""
    optional = optional or {}
    if not isinstance(obj, dict):
        raise InvalidMessage(f"{what} must be a map, got {type(obj).__name__}")
    missing = [key for key in required if key not in obj]
    if missing:
        raise InvalidMessage(f"{what}: missing field(s) {', '.join(missing)}")
    unknown = [key for key in obj if key not in required and key not in optional]
    if unknown:
        raise InvalidMessage(f"{what}: unknown field(s) {', '.join(map(str, unknown))}")
    out = {key: obj[key] for key in required}
    for key, default in optional.items():
        out[key] = obj.get(key, default)
    return out


def set_field(obj: object, name: str, value: Any) -> None:
    """Normalise a field of a frozen dataclass in ``__post_init__``."""
    object.__setattr__(obj, name, value)
