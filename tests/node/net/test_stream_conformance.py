"""Every FramedStream keeps one contract (node/net/streams.py), whatever carries it.

The same tests run against each implementation: the in-memory pair (in both cancellation
modes), a real libp2p stream between two hosts on loopback, and a direct channel on loopback
TCP. Where the contract lets transports differ (cancellation, half-close), the test checks the
behaviour the transport documents.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from node.net.direct import DirectChannel, DirectListener, connect
from node.net.host import Stream, open_host
from node.net.memory import memory_stream_pair
from node.net.streams import HEADER, FramedStream, FrameTooLong, StreamBroken
from protocol import direct as direct_wire

MAX = 1 << 20
KINDS = ["memory", "memory-cancel-safe", "libp2p", "direct"]


@dataclass
class Pair:
    a: FramedStream  # the dialing end
    b: FramedStream  # the accepting end
    a_peer: str
    b_peer: str
    cancel_safe: bool  # a cancelled read leaves the stream usable
    half_close: bool  # after close() the closer can still read
    send_raw: Callable[[bytes], Awaitable[None]]  # raw bytes from a to b (truncated frames)
    header_overhead: int = 0  # what a frame's header counts beyond its payload (the tag)


def _seed(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


@asynccontextmanager
async def open_pair(kind: str) -> AsyncIterator[Pair]:
    if kind.startswith("memory"):
        safe = kind == "memory-cancel-safe"
        a, b = memory_stream_pair("peer-a", "peer-b", cancel_breaks=not safe)
        yield Pair(a, b, "peer-a", "peer-b", safe, True, a.send)
    elif kind == "libp2p":
        async with open_host(_seed("conf-a")) as ha, open_host(_seed("conf-b")) as hb:
            accepted, inbox = trio.open_memory_channel[Stream](1)
            done = trio.Event()

            async def handler(stream: Stream) -> None:
                await accepted.send(stream)
                await done.wait()  # keep the stream open until the test is over

            hb.set_handler("/shiza-test/conformance/1", handler)
            await ha.connect(hb.addrs[0])
            a = await ha.open_stream(hb.peer_id, "/shiza-test/conformance/1")
            await a.send_frame(b"hello")  # libp2p opens the stream on the peer lazily
            b = await inbox.receive()
            assert await b.read_frame(16) == b"hello"
            try:
                yield Pair(a, b, ha.peer_id, hb.peer_id, False, True, a.send)
            finally:
                done.set()
                await a.reset()
    else:
        listener = DirectListener("127.0.0.1", 0)
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)
            pk, sk = direct_wire.keypair()
            offer = listener.offer(pk, "client-peer")
            a = await connect("127.0.0.1", offer.port, offer.public, "node-peer", pk, sk, 10)
            b = await offer.wait(10)
            assert b is not None

            async def send_raw(data: bytes) -> None:
                await a._sock.send_all(data)  # below the sealing: bytes as they go on the wire

            yield Pair(a, b, "client-peer", "node-peer", True, False, send_raw,
                       header_overhead=direct_wire.TAG_BYTES)
            await a.close()
            await b.close()
            nursery.cancel_scope.cancel()


def _raw_frame_start(pair: Pair, payload: bytes) -> bytes:
    """What a sender puts on the wire for ``payload`` (sealed for a direct channel)."""
    if isinstance(pair.a, DirectChannel):
        return pair.a._sealer.seal(payload)
    return HEADER.pack(len(payload)) + payload


pytestmark = pytest.mark.parametrize("kind", KINDS)


async def test_frames_flow_both_ways_in_order(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            assert p.a.remote_peer_id == p.b_peer and p.b.remote_peer_id == p.a_peer
            payloads = [b"", b"x", bytes(range(256)) * 40, b"last"]
            for payload in payloads:
                await p.a.send_frame(payload)
            for payload in payloads:
                assert await p.b.read_frame(MAX) == payload
            big = bytes(range(256)) * 2048  # 512 KiB: several transport reads, beyond buffers
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.b.send_frame, big)  # a sender may wait for its reader
                assert await p.a.read_frame(MAX) == big


async def test_close_ends_the_peers_reads_cleanly_after_the_frames_in_flight(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            await p.a.send_frame(b"one")
            await p.a.send_frame(b"two")
            await p.a.close()
            await p.a.close()  # idempotent
            assert await p.b.read_frame(MAX) == b"one"
            assert await p.b.read_frame(MAX) == b"two"
            assert await p.b.read_frame(MAX) is None  # a clean end between frames
            if p.half_close:
                await p.b.send_frame(b"still heard")
                assert await p.a.read_frame(MAX) == b"still heard"
            else:
                with pytest.raises(StreamBroken):
                    await p.a.read_frame(MAX)
            with pytest.raises(StreamBroken):
                await p.a.send_frame(b"after close")


async def test_reset_breaks_both_ends_for_good(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            await p.a.reset()
            await p.a.reset()  # idempotent, never raises
            with pytest.raises(StreamBroken):
                await p.b.read_frame(MAX)  # a reset, never a clean end
            with pytest.raises(StreamBroken):
                await p.b.read_frame(MAX)  # stays broken
            with pytest.raises(StreamBroken):
                await p.a.read_frame(MAX)
            with pytest.raises(StreamBroken):
                await p.a.send_frame(b"late")
            await p.b.reset()


async def test_an_end_inside_a_frame_is_broken_not_clean(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            await p.send_raw(_raw_frame_start(p, b"0123456789")[:7])  # header + 3 bytes
            await p.a.close()
            with pytest.raises(StreamBroken, match="inside a frame"):
                await p.b.read_frame(MAX)
            with pytest.raises(StreamBroken):
                await p.b.read_frame(MAX)


async def test_an_oversized_header_raises_before_the_body_and_sending_still_works(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            await p.a.send_frame(b"y" * 100)
            with pytest.raises(FrameTooLong) as info:
                await p.b.read_frame(10)
            assert (info.value.length, info.value.max_len) == (100, 10)
            with pytest.raises(FrameTooLong):  # the reading side stays out of sync
                await p.b.read_frame(10)
            await p.b.send_frame(b"an error frame")  # e.g. Error(FrameTooLarge) before closing
            assert await p.a.read_frame(MAX) == b"an error frame"


async def test_a_cancelled_read_keeps_or_breaks_the_stream_as_documented(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            # Half a frame arrives, then the read is cancelled while it waits for the rest.
            frame = _raw_frame_start(p, b"0123456789")
            await p.send_raw(frame[:7])
            with trio.move_on_after(0.2) as scope:
                await p.b.read_frame(MAX)
            assert scope.cancelled_caught
            if p.cancel_safe:
                await p.send_raw(frame[7:])
                assert await p.b.read_frame(MAX) == b"0123456789"  # nothing was lost
                await p.b.send_frame(b"ok")
                assert await p.a.read_frame(MAX) == b"ok"
            else:
                with pytest.raises(StreamBroken):
                    await p.b.read_frame(MAX)
                with pytest.raises(StreamBroken):
                    await p.b.send_frame(b"late")


async def test_a_reader_and_a_sender_may_run_at_once(kind: str) -> None:
    with trio.fail_after(20):
        async with open_pair(kind) as p:
            got: list[bytes] = []

            async def read_all() -> None:
                for _ in range(20):
                    frame = await p.a.read_frame(MAX)
                    assert frame is not None
                    got.append(frame)

            async def echo() -> None:
                for _ in range(20):
                    frame = await p.b.read_frame(MAX)
                    assert frame is not None
                    await p.b.send_frame(frame[::-1])

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read_all)
                nursery.start_soon(echo)
                for i in range(20):
                    await p.a.send_frame(b"%d-abc" % i)
            assert got == [(b"%d-abc" % i)[::-1] for i in range(20)]

