"""Round trips of one activation-sized payload on loopback, for ``shiza bench``.

Plain TCP is the floor; the direct channel (node/direct.py) is what sessions use; a libp2p
stream (Noise + yamux, pure Python) is their fallback. Each is the median of ``rounds``
echoes of one frame, client and echo server in this process.
"""

from __future__ import annotations

import statistics
import time
from contextlib import AsyncExitStack
from functools import partial
from typing import Any

import trio


async def _tcp_rtt(payload: int, rounds: int) -> float:
    """Median round trip of ``payload`` bytes over a trio TCP socket pair on loopback."""
    async def echo(stream: trio.SocketStream) -> None:
        while True:
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            await stream.send_all(data)

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, echo, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        client = await trio.open_tcp_stream("127.0.0.1", port)
        blob = b"x" * payload
        samples = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            await client.send_all(blob)
            got = 0
            while got < payload:
                got += len(await client.receive_some(1 << 20))
            samples.append(time.perf_counter() - t0)
        await client.aclose()
        nursery.cancel_scope.cancel()
    return statistics.median(samples)


async def _libp2p_rtt(payload: int, rounds: int) -> float:
    """Median framed round trip of ``payload`` bytes between two in-process libp2p hosts."""
    from node.net.host import open_host
    from protocol.identity import Identity

    proto = "/shiza/bench-echo/1.0.0"

    async def echo(stream: Any) -> None:
        while True:
            data = await stream.read_frame(1 << 24)
            if data is None:
                return
            await stream.send_frame(data)

    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_host(Identity.generate().seed))
        b = await stack.enter_async_context(open_host(Identity.generate().seed))
        b.set_handler(proto, echo)
        await a.connect(b.addrs[0])
        stream = await a.open_stream(b.peer_id, proto)
        rtt = await _framed_rtt(stream, payload, rounds)
        await stream.close()
    return rtt


async def _direct_rtt(payload: int, rounds: int) -> float:
    """Median framed round trip of ``payload`` bytes over an in-process direct channel pair
    (node/direct.py: TCP, every frame sealed with ChaCha20-Poly1305 both ways)."""
    from node.net.direct import DirectListener, connect
    from protocol import direct as wire

    listener = DirectListener("127.0.0.1", 0)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(listener.serve)
        client_pk, client_sk = wire.keypair()
        offer = listener.offer(client_pk, "bench-client")

        async def echo() -> None:
            channel = await offer.wait(10)
            assert channel is not None, "the direct channel did not arrive"
            while (data := await channel.read_frame(1 << 24)) is not None:
                await channel.send_frame(data)
            await channel.close()

        nursery.start_soon(echo)
        channel = await connect("127.0.0.1", port, offer.public, "bench-node", client_pk,
                                client_sk, 10)
        rtt = await _framed_rtt(channel, payload, rounds)
        await channel.close()
        nursery.cancel_scope.cancel()
    return rtt


async def _framed_rtt(stream: Any, payload: int, rounds: int) -> float:
    """Median round trip of one ``payload``-byte frame to an echo behind ``stream``."""
    blob = b"x" * payload
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await stream.send_frame(blob)
        await stream.read_frame(1 << 24)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def round_trips(payload: int, rounds: int) -> dict[str, float]:
    """Median round trips of one activation-sized payload: plain TCP (the floor), the direct
    channel sessions use, and a libp2p stream (Noise + yamux, the fallback)."""
    return {"tcp_rtt_s": trio.run(_tcp_rtt, payload, rounds),
            "direct_rtt_s": trio.run(_direct_rtt, payload, rounds),
            "libp2p_rtt_s": trio.run(_libp2p_rtt, payload, rounds)}
