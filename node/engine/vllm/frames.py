"""The local channel between a node and its vLLM span worker: framed messages on a Unix socket.

Standard library only: both sides import it, the node under its own python and the worker
(span_worker.py) under the vLLM venv's. A frame is two little-endian u32 lengths, a JSON header
of that first length and a body of the second: the raw bytes of the header's tensors, one after
another. The header names each tensor as ``[name, dtype, shape, offset, nbytes]`` inside the
body; dtypes are torch's names ("float32", "bfloat16", "int64"). JSON for the header because it
is small (a decode step's is a few hundred bytes) and both pythons have it; the tensors travel
as they lie in memory, never encoded.

A reader that sees a frame above ``MAX_FRAME`` or a header that does not parse raises
``FrameError``: the channel is local, so this is a bug or a dead peer, never a user.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

MAX_FRAME = 1 << 30  # 1 GiB: a long prefill's logits on a large vocabulary, with room
_LENGTHS = struct.Struct("<II")


class FrameError(Exception):
    """The channel broke: EOF, a short read, or a frame that does not parse."""


def send(sock: socket.socket, header: dict[str, Any], tensors: list[tuple[str, str, tuple[int, ...], Any]] = ()) -> None:
    """One frame: ``header`` plus ``tensors`` as ``(name, dtype, shape, buffer)`` (any object
    with the buffer protocol, already contiguous)."""
    described, offset, views = [], 0, []
    for name, dtype, shape, buf in tensors:
        view = memoryview(buf).cast("B")
        described.append([name, dtype, list(shape), offset, view.nbytes])
        offset += view.nbytes
        views.append(view)
    head = json.dumps({**header, "tensors": described}, separators=(",", ":")).encode()
    if len(head) + offset > MAX_FRAME:
        raise FrameError(f"frame of {len(head) + offset} bytes exceeds {MAX_FRAME}")
    sock.sendall(_LENGTHS.pack(len(head), offset) + head)
    for view in views:
        sock.sendall(view)


def _read(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise FrameError("the channel closed")
        got += k
    return buf


def recv(sock: socket.socket) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...], memoryview]]]:
    """One frame: its header and its tensors as ``{name: (dtype, shape, bytes)}`` (views into
    one buffer, valid as long as the caller holds them)."""
    head_len, body_len = _LENGTHS.unpack(bytes(_read(sock, _LENGTHS.size)))
    if head_len + body_len > MAX_FRAME:
        raise FrameError(f"frame of {head_len + body_len} bytes exceeds {MAX_FRAME}")
    try:
        header = json.loads(bytes(_read(sock, head_len)))
    except ValueError as e:
        raise FrameError(f"frame header does not parse: {e}") from e
    body = memoryview(_read(sock, body_len)) if body_len else memoryview(b"")
    tensors = {}
    for name, dtype, shape, offset, nbytes in header.pop("tensors", ()):
        if offset + nbytes > body_len:
            raise FrameError(f"tensor {name!r} lies outside the frame body")
        tensors[name] = (dtype, tuple(shape), body[offset:offset + nbytes])
    return header, tensors
