"""Framing, msgpack with limits, canonical encoding for signed bytes, and tensors.

A frame is a 4-byte big-endian unsigned payload length followed by one msgpack object. Every
object that crosses the wire is checked against the limits in ``protocol.ids``; msgpack's own
exceptions never escape this module.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import BadShape, FrameTooLarge, InvalidMessage, LimitExceeded, MalformedFrame
from .ids import (
    FRAME_HEADER_BYTES,
    MAX_DECODED_OBJECTS,
    MAX_FRAME_BYTES,
    MAX_LIST_LEN,
    MAX_MAP_LEN,
    MAX_NESTING,
    MAX_STR_LEN,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
)

_HEADER = struct.Struct(">I")
_SCALARS = (type(None), bool, int, float)
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1


def _ext_rejected(code: int, data: bytes) -> Any:
    raise MalformedFrame(f"msgpack extension types are not allowed (ext type {code})")


def _check(obj: Any, depth: int) -> None:
    """Walk ``obj`` and enforce types, nesting, string, list, map and object-count limits."""
    if _count(obj, depth) > MAX_DECODED_OBJECTS:
        raise LimitExceeded(f"more than MAX_DECODED_OBJECTS ({MAX_DECODED_OBJECTS}) objects")


def _count(obj: Any, depth: int) -> int:
    """``_check``'s walk; returns the objects counted as ``_ObjectBudget`` counts them."""
    if isinstance(obj, _SCALARS):
        if type(obj) is int and not _INT_MIN <= obj <= _INT_MAX:
            raise LimitExceeded(f"integer {obj} does not fit in 64 bits")
        return 0
    if isinstance(obj, str):
        # UTF-8 is at most 4 bytes a character: skip the encode when it cannot exceed.
        if len(obj) * 4 > MAX_STR_LEN and len(obj.encode("utf-8")) > MAX_STR_LEN:
            raise LimitExceeded(f"string longer than MAX_STR_LEN ({MAX_STR_LEN} bytes)")
        return 0
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return 0
    if isinstance(obj, (list, tuple, dict)):
        if depth >= MAX_NESTING:
            raise LimitExceeded(f"nesting deeper than MAX_NESTING ({MAX_NESTING})")
        if isinstance(obj, dict):
            if len(obj) > MAX_MAP_LEN:
                raise LimitExceeded(f"map longer than MAX_MAP_LEN ({MAX_MAP_LEN})")
            n = 1 + 2 * len(obj)
            for key, value in obj.items():
                if not isinstance(key, str):
                    raise InvalidMessage(f"map keys must be strings, got {type(key).__name__}")
                _count(key, depth + 1)
                n += _count(value, depth + 1)
        else:
            if len(obj) > MAX_LIST_LEN:
                raise LimitExceeded(f"array longer than MAX_LIST_LEN ({MAX_LIST_LEN})")
            n = 1 + len(obj)
            for item in obj:
                n += _count(item, depth + 1)
        if n > MAX_DECODED_OBJECTS:  # stop the walk early on a huge object
            raise LimitExceeded(f"more than MAX_DECODED_OBJECTS ({MAX_DECODED_OBJECTS}) objects")
        return n
    raise InvalidMessage(f"type {type(obj).__name__} cannot be encoded")


def _packb(obj: Any) -> bytes:
    try:
        return msgpack.packb(obj, use_bin_type=True)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidMessage(f"cannot encode: {exc}") from None


def pack(obj: Any) -> bytes:
    """Encode ``obj`` as msgpack after checking every limit (LimitExceeded, FrameTooLarge)."""
    _check(obj, 0)
    data = _packb(obj)
    if len(data) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"{len(data)} bytes encoded, MAX_FRAME_BYTES is {MAX_FRAME_BYTES}")
    return data


class _ObjectBudget:
    """msgpack hooks counting the objects of one decode, so that it stops once they pass
    MAX_DECODED_OBJECTS. msgpack calls a hook as each array or map is complete (inner ones
    first), so a frame is abandoned holding at most MAX_DECODED_OBJECTS objects plus the
    scalars of the containers still open (bounded by the frame's size: a scalar that allocates
    takes at least 2 bytes). One byte of msgpack (an empty array) is a ~60-byte Python object:
    without this a frame within every size limit cost 64 times its size. Legitimate messages hold few
    containers (tensors are single bin values), so the hooks cost them nothing measurable."""

    __slots__ = ("left",)

    def __init__(self) -> None:
        self.left = MAX_DECODED_OBJECTS

    def _spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise LimitExceeded(f"more than MAX_DECODED_OBJECTS ({MAX_DECODED_OBJECTS}) objects")

    def list_hook(self, items: list) -> list:
        self._spend(1 + len(items))
        return items

    def object_hook(self, mapping: dict) -> dict:
        self._spend(1 + 2 * len(mapping))
        return mapping


def unpack(data: bytes | bytearray | memoryview) -> Any:
    """Decode exactly one msgpack object, enforcing every limit.

    Raises FrameTooLarge, LimitExceeded or MalformedFrame; never a msgpack exception. Decoding
    stops after MAX_DECODED_OBJECTS objects (``_ObjectBudget``).
    Binary values come back as ``bytes`` objects that callers may keep without copying.
    """
    if len(data) > MAX_FRAME_BYTES:
        raise FrameTooLarge(f"{len(data)} bytes, MAX_FRAME_BYTES is {MAX_FRAME_BYTES}")
    budget = _ObjectBudget()
    try:
        obj = msgpack.unpackb(
            data,
            list_hook=budget.list_hook,
            object_hook=budget.object_hook,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_ext_rejected,
            timestamp=0,
            max_str_len=MAX_STR_LEN,
            max_bin_len=MAX_FRAME_BYTES,
            max_array_len=MAX_LIST_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except (MalformedFrame, LimitExceeded):
        raise
    except msgpack.exceptions.StackError:
        raise LimitExceeded(f"nesting deeper than MAX_NESTING ({MAX_NESTING})") from None
    except msgpack.exceptions.ExtraData:
        raise MalformedFrame("trailing bytes after the msgpack object") from None
    except msgpack.exceptions.OutOfData:
        raise MalformedFrame("truncated msgpack object") from None
    except UnicodeDecodeError:
        raise MalformedFrame("string is not valid UTF-8") from None
    except ValueError as exc:
        text = str(exc)
        if "exceeds max_" in text:
            raise LimitExceeded(text) from None
        raise MalformedFrame(text or "not a valid msgpack object") from None
    except Exception as exc:  # msgpack may raise TypeError and others on hostile input
        raise MalformedFrame(f"not a valid msgpack object ({type(exc).__name__})") from None
    try:
        _check(obj, 0)
    except InvalidMessage as exc:
        raise MalformedFrame(str(exc)) from None
    return obj


def _canonical(obj: Any) -> Any:
    if isinstance(obj, dict):
        for key in obj:
            if not isinstance(key, str):
                raise InvalidMessage("canonical maps need string keys")
        return {key: _canonical(obj[key]) for key in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [_canonical(item) for item in obj]
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    return obj


def canonical_pack(obj: Any) -> bytes:
    """Deterministic msgpack: map keys sorted (by code point, which is UTF-8 byte order) at
    every level, shortest integer and length forms, floats as float64, str and bin distinct.
    These are the bytes that get signed."""
    _check(obj, 0)
    return _packb(_canonical(obj))


def encode_frame(obj: dict[str, Any]) -> bytes:
    """One frame: the 4-byte big-endian length, then ``pack(obj)``."""
    payload = pack(obj)
    return _HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame decoder for one stream.

    ``feed`` returns the objects of every frame completed by ``data``. A header announcing more
    than ``max_frame_bytes`` raises FrameTooLarge at once, before its payload is buffered.
    After any exception the decoder is unusable: the stream must be closed.
    """

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        if not 0 < max_frame_bytes <= MAX_FRAME_BYTES:
            raise ValueError("max_frame_bytes must be in 1..MAX_FRAME_BYTES")
        self._max = max_frame_bytes
        self._buf = bytearray()
        self._need: int | None = None  # payload length of the frame being read
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes received but not yet decoded (a partial frame)."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        if self._broken:
            raise MalformedFrame("decoder already failed; close the stream")
        try:
            return self._feed(data)
        except Exception:
            self._broken = True
            self._buf = bytearray()
            raise

    def _feed(self, data: bytes | bytearray | memoryview) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while True:
            if self._need is None:
                if len(self._buf) < FRAME_HEADER_BYTES:
                    return out
                (length,) = _HEADER.unpack_from(self._buf)
                if length > self._max:
                    raise FrameTooLarge(f"frame of {length} bytes, limit is {self._max}")
                if length == 0:
                    raise MalformedFrame("empty frame")
                del self._buf[:FRAME_HEADER_BYTES]
                self._need = length
            if len(self._buf) < self._need:
                return out
            # Decode straight from the buffer: msgpack copies each bin value once, no more.
            view = memoryview(self._buf)
            try:
                payload = view[: self._need]
                try:
                    out.append(unpack(payload))
                finally:
                    payload.release()
            finally:
                view.release()
            del self._buf[: self._need]
            self._need = None


# Tensors ----------------------------------------------------------------------------------

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4}
DTYPES = tuple(_ITEMSIZE)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def itemsize(dtype: str) -> int:
    """Bytes per element of a wire dtype; InvalidMessage for an unknown dtype."""
    try:
        return _ITEMSIZE[dtype]
    except (KeyError, TypeError):
        raise InvalidMessage(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class Tensor:
    """A dense little-endian tensor: dtype, shape and the raw bytes (row-major).

    ``data`` may be a C-contiguous memoryview on the sending side (no copy when packing); on
    the receiving side it is the ``bytes`` object msgpack produced (no copy when decoding).
    """

    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        size = itemsize(self.dtype)
        if not isinstance(self.shape, (tuple, list)):
            raise InvalidMessage("tensor shape must be a sequence of integers")
        if len(self.shape) > MAX_TENSOR_DIMS:
            raise LimitExceeded(f"tensor has {len(self.shape)} dims, MAX_TENSOR_DIMS is {MAX_TENSOR_DIMS}")
        numel = 1
        for dim in self.shape:
            if type(dim) is not int or dim < 0:
                raise InvalidMessage(f"tensor dims must be non-negative integers, got {dim!r}")
            numel *= dim
            if numel > MAX_TENSOR_ELEMENTS:
                raise LimitExceeded(f"tensor has more than MAX_TENSOR_ELEMENTS ({MAX_TENSOR_ELEMENTS}) elements")
        if isinstance(self.shape, list):
            object.__setattr__(self, "shape", tuple(self.shape))
        data = self.data
        if isinstance(data, bytearray):
            data = memoryview(data)
            object.__setattr__(self, "data", data)
        if isinstance(data, memoryview):
            if not data.c_contiguous:
                raise BadShape("tensor data must be C-contiguous")
            nbytes = data.nbytes
        elif isinstance(data, bytes):
            nbytes = len(data)
        else:
            raise InvalidMessage(f"tensor data must be bytes, got {type(data).__name__}")
        if nbytes != numel * size:
            raise BadShape(
                f"tensor {self.dtype}{list(self.shape)} needs {numel * size} bytes, got {nbytes}"
            )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _ITEMSIZE[self.dtype]

    def to_wire(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": self.data}

    @classmethod
    def from_wire(cls, obj: Any) -> Tensor:
        if not isinstance(obj, dict):
            raise InvalidMessage("tensor must be a map")
        if set(obj) != {"dtype", "shape", "data"}:
            raise InvalidMessage(f"tensor map needs exactly dtype, shape, data; got {sorted(obj)}")
        dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
        if not isinstance(dtype, str):
            raise InvalidMessage("tensor dtype must be a string")
        if not isinstance(shape, list):
            raise InvalidMessage("tensor shape must be an array")
        if not isinstance(data, bytes):
            raise InvalidMessage("tensor data must be bin")
        return cls(dtype, tuple(shape), data)
