"""Wire tensors (protocol.codec.Tensor) to torch tensors and back, without copies where possible."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protocol.codec import Tensor
from protocol.errors import BadShape

if TYPE_CHECKING:
    import torch

_TORCH_DTYPES = {
    "float32": "float32",
    "float16": "float16",
    "bfloat16": "bfloat16",
    "int64": "int64",
    "int32": "int32",
}


def to_torch(t: Tensor) -> "torch.Tensor":
    """A torch view of the wire bytes (read-only source, so the result is cloned lazily by ops)."""
    import torch

    dtype = getattr(torch, _TORCH_DTYPES[t.dtype])
    n = 1
    for d in t.shape:
        n *= d
    if n == 0:
        return torch.empty(t.shape, dtype=dtype)
    data = t.data if isinstance(t.data, (bytes, bytearray)) else bytes(t.data)
    if len(data) != n * dtype.itemsize:
        raise BadShape(f"tensor of shape {t.shape} and dtype {t.dtype} has {len(data)} bytes")
    # frombuffer warns on read-only buffers; bytearray makes it writable at the cost of one copy
    # only when the source is immutable bytes.
    buf = data if isinstance(data, bytearray) else bytearray(data)
    return torch.frombuffer(buf, dtype=dtype).reshape(t.shape)


def from_torch(x: "torch.Tensor") -> Tensor:
    import torch

    name = str(x.dtype).removeprefix("torch.")
    if name not in _TORCH_DTYPES:
        raise BadShape(f"unsupported dtype {x.dtype}")
    x = x.detach().to("cpu").contiguous()
    if x.dtype == torch.bfloat16:
        raw = x.view(torch.int16).numpy().tobytes()
    else:
        raw = x.numpy().tobytes()
    return Tensor(name, tuple(int(d) for d in x.shape), raw)
