"""Cheap attacks on SpanServer's handlers (issue 15), over memory streams with the real tiny
engine: decoding cost bounded per frame and per session state, malformed frames counted as
violations, streams waiting for their first frame capped, a step's output bounded before the
engine runs. Each asserts by counting (strikes, error codes, engine calls), not by timing."""

from __future__ import annotations

import struct

import trio

from protocol.errors import Busy, FrameTooLarge, LimitExceeded, MalformedFrame, RateLimited
from protocol.codec import Tensor
from protocol.messages import OpenSession, SessionOpened, Step, StepResult
from node.engine.errors import SessionUnknown
from node.net.wire import int64_tensor, recv_message, send_message
from node.serve.limits import PeerLimits
from node.serve.server import ServerLimits

from tests.node.client.inproc import engine, reference
from tests.node.serve.test_server_seam import PROMPT, _error_then_end, _idle, _open, _send, _step, serving


def _nested_empty_arrays(n_bytes: int) -> bytes:
    """One frame of arrays of 65535 empty arrays: within every size, length and nesting limit,
    each byte a Python list (about 64 times the frame's size in memory once decoded)."""
    inner = b"\xdc\xff\xff" + b"\x90" * 65535
    k = n_bytes // len(inner)
    payload = b"\xdc" + k.to_bytes(2, "big") + inner * k
    return struct.pack(">I", len(payload)) + payload


async def test_a_nested_array_frame_before_open_is_refused_unread_and_struck(tiny_llama):
    async with serving(tiny_llama) as (server, open_stream):
        good, _ = await _open(open_stream, tiny_llama.model_id)
        bad = await open_stream()
        await bad.send(_nested_empty_arrays(4 * 2**20))
        # Control messages are small: the header alone refuses it, nothing is decoded.
        assert (await _error_then_end(bad)).code == FrameTooLarge.code
        assert server.peers.strikes_total == 1
        assert await _send(good, _step(0, PROMPT, 0)) == reference(tiny_llama, PROMPT, 1)[0]
        await good.reset()
        await _idle(server)


async def test_a_step_frame_is_bounded_by_its_session(tiny_llama):
    async with serving(tiny_llama) as (server, open_stream):
        stream, _ = await _open(open_stream, tiny_llama.model_id, max_length=32)
        # batch 1 x 32 tokens of ids: far below 1 MiB however it is encoded.
        await stream.send(_nested_empty_arrays(2**20))
        assert (await _error_then_end(stream)).code == FrameTooLarge.code
        assert server.peers.strikes_total == 1
        await _idle(server)


async def test_a_nested_array_frame_within_a_large_sessions_bound_stops_at_the_object_cap(tiny_llama):
    limits = ServerLimits(max_batch_size=15, max_length=4096, peer=PeerLimits(max_kv_tokens=2**20))
    async with serving(tiny_llama, limits=limits) as (server, open_stream):
        good, _ = await _open(open_stream, tiny_llama.model_id)
        stream = await open_stream()
        # 15 x 4096 tokens (what the tiny engine's cache holds): Steps of up to ~1.5 MB.
        await send_message(stream, OpenSession(tiny_llama.model_id, 0, 6, 4096, batch_size=15))
        assert isinstance(await recv_message(stream, 10), SessionOpened)
        await stream.send(_nested_empty_arrays(2**20))  # under this session's Step bound
        assert (await _error_then_end(stream)).code == LimitExceeded.code
        assert server.peers.strikes_total == 1
        assert await _send(good, _step(0, PROMPT, 0)) == reference(tiny_llama, PROMPT, 1)[0]
        await good.reset()
        await _idle(server)


async def test_repeated_malformed_frames_earn_a_ban(tiny_llama):
    peer = PeerLimits(strikes_to_ban=3)
    async with serving(tiny_llama, limits=ServerLimits(peer=peer)) as (server, open_stream):
        for _ in range(3):
            bad = await open_stream()
            await bad.send(struct.pack(">I", 3) + b"\xc1ab")  # 0xc1: never valid msgpack
            assert (await _error_then_end(bad)).code == MalformedFrame.code
        refused = await open_stream()
        await send_message(refused, OpenSession(tiny_llama.model_id, 0, 6, 32))
        assert (await _error_then_end(refused)).code == RateLimited.code
        assert server.peers.bans_total == 1
        await _idle(server)


async def test_streams_waiting_for_their_first_frame_are_capped_per_peer(tiny_llama):
    cap = PeerLimits().max_waiting_streams
    async with serving(tiny_llama) as (server, open_stream):
        silent = [await open_stream() for _ in range(cap)]
        extra = await open_stream()
        with trio.fail_after(30):  # generous: the refusal is immediate, the open deadline is 30 s
            assert (await _error_then_end(extra)).code == Busy.code
        for stream in silent:
            await stream.reset()
        again, _ = await _open(open_stream, tiny_llama.model_id)  # the slots are free again
        await again.reset()
        await _idle(server)


class CountingEngine:
    """The real engine's span, sizes and dtype, counting the steps it is asked to run. Its
    sessions are only recorded (the real one would reserve a KV cache larger than a test
    should hold), so a step that reaches it fails after being counted."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.steps = 0
        self._open: set[str] = set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    max_cache_tokens = None

    def open_session(self, session_id, batch_size, max_length, sampling=None, layers=None):
        self._open.add(session_id)

    def close_session(self, session_id):
        self._open.discard(session_id)

    def sessions(self):
        return sorted(self._open)

    def cache_tokens_used(self):
        return 0

    def cache_tokens_reserved(self):
        return 0

    def run_steps(self, steps):
        self.steps += len(steps)
        return [SessionUnknown("a counting stub computes nothing") for _ in steps]


async def test_a_first_span_step_whose_output_exceeds_a_frame_is_refused_before_computing(tiny_llama):
    counting = CountingEngine(engine(tiny_llama, 0, 3))
    limits = ServerLimits(max_batch_size=64, max_length=8192,
                          peer=PeerLimits(max_kv_tokens=2**20, tokens_per_s=2**20))
    async with serving(tiny_llama, span=(0, 3), limits=limits) as (server, open_stream):
        server.engine = counting
        stream = await open_stream()
        await send_message(stream, OpenSession(tiny_llama.model_id, 0, 3, 4200, batch_size=64))
        assert isinstance(await recv_message(stream, 10), SessionOpened)
        # 64 x 4200 token ids (2 MiB) pass every input check; the hidden states out would be
        # 64 x 4200 x 64 float32 = 69 MB, more than any frame may carry.
        ids = int64_tensor([[1] * 4200] * 64)
        await send_message(stream, Step(0, ids, int64_tensor([list(range(4200))] * 64)))
        assert (await _error_then_end(stream)).code == LimitExceeded.code
        assert counting.steps == 0
        assert server.peers.strikes_total == 1
        await _idle(server)


async def test_the_largest_step_a_session_allows_fits_its_frame_bound(tiny_llama):
    async with serving(tiny_llama, span=(3, 6)) as (server, open_stream):
        stream = await open_stream()
        await send_message(stream, OpenSession(tiny_llama.model_id, 3, 6, 32, batch_size=2))
        assert isinstance(await recv_message(stream, 10), SessionOpened)
        hidden = Tensor("float32", (2, 32, 64), bytes(2 * 32 * 64 * 4))  # every row, every token
        rows = [list(range(32))] * 2
        await send_message(stream, Step(0, hidden, int64_tensor(rows), int64_tensor([[1] * 32] * 2)))
        reply = await recv_message(stream, 10)
        assert isinstance(reply, StepResult) and reply.output.shape == (2,), reply  # the last span: tokens
        assert server.peers.strikes_total == 0
        await stream.reset()
        await _idle(server)
