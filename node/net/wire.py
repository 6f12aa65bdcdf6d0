"""Typed messages over a framed stream (any ``FramedStream``: libp2p, direct channel, memory),
and token-id tensors built without torch."""

from __future__ import annotations

import contextlib
import struct
from typing import Sequence

import trio

from protocol.codec import Tensor, pack, unpack
from protocol.errors import FrameTooLarge, MalformedFrame, Timeout
from protocol.ids import DECODE_IN_THREAD_BYTES, MAX_FRAME_BYTES
from protocol.messages import Message, decode_message, message_to_wire

from node.net.streams import FramedStream, FrameTooLong


async def send_message(stream: FramedStream, msg: Message) -> None:
    """Send ``msg`` as one frame. Raises LimitExceeded or FrameTooLarge for a message over the
    protocol's limits (nothing is sent), StreamBroken from the stream."""
    await stream.send_frame(pack(message_to_wire(msg)))


async def recv_message(stream: FramedStream, timeout: float | None = None,
                       max_bytes: int = MAX_FRAME_BYTES) -> Message | None:
    """The next message, or None when the peer closed the stream cleanly between frames.

    Raises a protocol error for a bad frame (FrameTooLarge for a header announcing more than
    ``max_bytes``, before its body is read) and Timeout past ``timeout`` seconds, StreamBroken
    from the stream. After a Timeout (or any cancellation) a libp2p stream is broken; a direct
    channel or memory stream can be read again (node/net/streams.py). A frame over
    DECODE_IN_THREAD_BYTES is decoded in a worker thread, so that decoding it (bounded by
    MAX_DECODED_OBJECTS) does not hold the event loop.
    """
    try:
        with trio.fail_after(timeout) if timeout is not None else contextlib.nullcontext():
            payload = await stream.read_frame(min(max_bytes, MAX_FRAME_BYTES))
    except trio.TooSlowError:
        raise Timeout(f"no message within {timeout:g} s") from None
    except FrameTooLong as exc:
        raise FrameTooLarge(str(exc)) from None
    if payload is None:
        return None
    if len(payload) > DECODE_IN_THREAD_BYTES:
        return await trio.to_thread.run_sync(_decode, payload)
    return _decode(payload)


def _decode(payload: bytes) -> Message:
    return decode_message(unpack(payload))


def int64_tensor(rows: Sequence[Sequence[int]]) -> Tensor:
    """A [B, T] int64 tensor from nested lists (all rows the same length)."""
    if not rows:
        raise MalformedFrame("empty batch")
    width = len(rows[0])
    flat: list[int] = []
    for row in rows:
        if len(row) != width:
            raise MalformedFrame("ragged batch")
        flat.extend(int(v) for v in row)
    return Tensor("int64", (len(rows), width), struct.pack(f"<{len(flat)}q", *flat))


def int64_values(t: Tensor) -> list[int]:
    """The values of an int64 tensor, flattened."""
    if t.dtype != "int64":
        raise MalformedFrame(f"expected int64 tensor, got {t.dtype}")
    n = len(t.data) // 8
    return list(struct.unpack(f"<{n}q", bytes(t.data)))


def concat_steps(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate [B, T_i, ...] tensors of one dtype along T (row-major bytes, no torch)."""
    first = tensors[0]
    batch, rest = first.shape[0], first.shape[2:]
    if any(t.dtype != first.dtype or t.shape[0] != batch or t.shape[2:] != rest for t in tensors):
        raise MalformedFrame("tensors to concatenate differ in dtype, batch or inner shape")
    inner = len(first.data) // (batch * first.shape[1]) if first.shape[1] else 0
    rows = []
    for b in range(batch):
        for t in tensors:
            row = t.shape[1] * inner
            rows.append(bytes(memoryview(t.data)[b * row:(b + 1) * row]))
    total = sum(t.shape[1] for t in tensors)
    return Tensor(first.dtype, (batch, total, *rest), b"".join(rows))


def take_positions(t: Tensor, n: int) -> Tensor:
    """The first ``n`` positions of each row of a [B, T, ...] tensor (row-major bytes, no torch)."""
    batch, length = t.shape[0], t.shape[1]
    if not 0 <= n <= length:
        raise MalformedFrame(f"cannot take {n} of {length} positions")
    if n == length:
        return t
    inner = len(t.data) // (batch * length) if length else 0
    view = memoryview(t.data)
    rows = [bytes(view[b * length * inner:(b * length + n) * inner]) for b in range(batch)]
    return Tensor(t.dtype, (batch, n, *t.shape[2:]), b"".join(rows))



def float32_rows(t: Tensor) -> list[list[float]]:
    """A float32 tensor as rows of Python floats over its last dimension."""
    if t.dtype != "float32":
        raise MalformedFrame(f"expected float32 tensor, got {t.dtype}")
    n = len(t.data) // 4
    flat = struct.unpack(f"<{n}f", bytes(t.data))
    width = t.shape[-1] if t.shape else 1
    if width == 0:
        return [[] for _ in range(n)]
    return [list(flat[i:i + width]) for i in range(0, n, width)]
