"""node/net/wire.py: per-call frame bounds and large frames decoded off the event loop."""

from __future__ import annotations

import threading

import pytest

import node.net.wire as wire
from node.net.memory import memory_stream_pair
from node.net.wire import int64_tensor, recv_message, send_message
from protocol.codec import Tensor
from protocol.errors import FrameTooLarge
from protocol.ids import DECODE_IN_THREAD_BYTES, MAX_CONTROL_FRAME_BYTES
from protocol.messages import InfoRequest, Step


def _big_step() -> Step:
    n = DECODE_IN_THREAD_BYTES // 4 + 1
    return Step(0, Tensor("float32", (1, 1, n), bytes(4 * n)), int64_tensor([[0]]))


async def test_a_frame_over_max_bytes_is_refused_before_its_body_is_read():
    a, b = memory_stream_pair("a", "b")
    await send_message(a, _big_step())
    with pytest.raises(FrameTooLarge):
        await recv_message(b, 10, max_bytes=MAX_CONTROL_FRAME_BYTES)


async def test_large_frames_are_decoded_in_a_worker_thread(monkeypatch):
    threads: list[bool] = []
    real = wire.unpack

    def spy(payload):
        threads.append(threading.current_thread() is threading.main_thread())
        return real(payload)

    monkeypatch.setattr(wire, "unpack", spy)
    a, b = memory_stream_pair("a", "b")
    await send_message(a, InfoRequest())
    await send_message(a, _big_step())
    assert isinstance(await recv_message(b, 10), InfoRequest)
    step = await recv_message(b, 10)
    assert isinstance(step, Step) and step.input.nbytes > DECODE_IN_THREAD_BYTES
    assert threads == [True, False]  # the small frame in the event loop, the large one off it
