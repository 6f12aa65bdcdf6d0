"""Direct activation channels over real loopback TCP (node/direct.py, SPEC.md 9.5)."""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from tests.polling import eventually
from node.net.direct import DirectChannel, DirectListener, connect
from node.net.host import StreamBroken
from protocol import direct as wire

PEER = "12D3KooWclient"


@asynccontextmanager
async def _listener(**kwargs: float) -> AsyncIterator[DirectListener]:
    listener = DirectListener("127.0.0.1", 0, **kwargs)
    async with trio.open_nursery() as nursery:
        await nursery.start(listener.serve)
        yield listener
        nursery.cancel_scope.cancel()


async def _pair(listener: DirectListener) -> tuple[DirectChannel, DirectChannel]:
    pk, sk = wire.keypair()
    offer = listener.offer(pk, PEER)
    client = await connect("127.0.0.1", offer.port, offer.public, "node", pk, sk, 10)
    node = await offer.wait(10)
    assert node is not None and node.remote_peer_id == PEER
    return client, node


async def _closed_by_node(sock: trio.SocketStream) -> bool:
    """True once the node closed this raw connection (EOF or reset)."""
    with trio.fail_after(10):
        try:
            while await sock.receive_some(1 << 16):
                pass
        except trio.BrokenResourceError:
            pass
    return True


async def test_frames_flow_both_ways_and_the_offer_is_single_use():
    async with _listener() as listener:
        client, node = await _pair(listener)
        for i in range(3):
            await client.send_frame(b"step-%d" % i + os.urandom(2000))
            got = await node.read_frame(1 << 20)
            assert got is not None and got.startswith(b"step-%d" % i)
            await node.send_frame(got[::-1])
            assert await client.read_frame(1 << 20) == got[::-1]
        assert listener.channels == 1
        await client.close()
        assert await node.read_frame(1 << 20) is None  # clean EOF between frames
        await node.close()


async def test_a_client_without_the_secret_key_is_refused_and_others_still_connect():
    async with _listener() as listener:
        pk, _ = wire.keypair()
        offer = listener.offer(pk, PEER)
        other_pk, other_sk = wire.keypair()  # knows pk, but not its secret
        _, tx = wire.client_keys(other_pk, other_sk, offer.public)
        sock = await trio.open_tcp_stream("127.0.0.1", offer.port)
        await sock.send_all(wire.client_hello(pk, wire.Sealer(tx)))
        assert await _closed_by_node(sock)
        assert listener.refused == 1
        client, node = await _pair(listener)  # the listener serves on
        await client.send_frame(b"hi")
        assert await node.read_frame(16) == b"hi"


@pytest.mark.parametrize("garbage", [b"GET / HTTP/1.1\r\n\r\n" + b"x" * 100, b"\x00" * 200])
async def test_garbage_and_unknown_keys_are_refused(garbage: bytes):
    async with _listener() as listener:
        sock = await trio.open_tcp_stream("127.0.0.1", listener.port)
        await sock.send_all(garbage)
        assert await _closed_by_node(sock)
        stranger_pk, stranger_sk = wire.keypair()  # no offer for this key
        npk, _ = wire.keypair()
        _, tx = wire.client_keys(stranger_pk, stranger_sk, npk)
        sock = await trio.open_tcp_stream("127.0.0.1", listener.port)
        await sock.send_all(wire.client_hello(stranger_pk, wire.Sealer(tx)))
        assert await _closed_by_node(sock)
        assert listener.refused == 2 and listener.channels == 0


async def test_an_altered_frame_breaks_the_channel():
    async with _listener() as listener:
        pk, sk = wire.keypair()
        offer = listener.offer(pk, PEER)
        rx, tx = wire.client_keys(pk, sk, offer.public)
        sock = await trio.open_tcp_stream("127.0.0.1", offer.port)
        sealer = wire.Sealer(tx)
        await sock.send_all(wire.client_hello(pk, sealer))
        node = await offer.wait(10)
        assert node is not None
        frame = bytearray(sealer.seal(b"activation" * 10))
        frame[20] ^= 0x40
        await sock.send_all(bytes(frame))
        with pytest.raises(StreamBroken, match="authentication"):
            await node.read_frame(1 << 20)
        assert await _closed_by_node(sock)


async def test_silent_connections_time_out_and_are_capped():
    async with _listener(handshake_timeout_s=0.5, max_handshakes=1) as listener:
        silent = await trio.open_tcp_stream("127.0.0.1", listener.port)
        await eventually(lambda: listener.handshakes_in_progress, timeout_s=10, interval_s=0.01,
                         what="the listener to start the silent connection's handshake")
        second = await trio.open_tcp_stream("127.0.0.1", listener.port)
        assert await _closed_by_node(second)  # over the cap: closed at once
        assert await _closed_by_node(silent)  # no hello within the handshake timeout
        assert listener.refused == 2


async def test_an_offer_nobody_takes_up_expires():
    async with _listener() as listener:
        pk, sk = wire.keypair()
        offer = listener.offer(pk, PEER)
        assert await offer.wait(0.05) is None
        listener.withdraw(offer)  # the session gave up waiting: its key opens nothing now
        with pytest.raises(StreamBroken):
            await connect("127.0.0.1", listener.port, offer.public, "node", pk, sk, 10)


async def _hello_from(local_ip: str, listener: DirectListener) -> DirectChannel | None:
    """A full handshake from a connection bound to ``local_ip`` (loopback is 127.0.0.0/8)."""
    pk, sk = wire.keypair()
    offer = listener.offer(pk, PEER)
    _, tx = wire.client_keys(pk, sk, offer.public)
    sock = await trio.open_tcp_stream("127.0.0.1", offer.port, local_address=local_ip)
    await sock.send_all(wire.client_hello(pk, wire.Sealer(tx)))
    return await offer.wait(10)


async def test_one_address_holds_only_its_share_of_the_handshake_slots():
    # A long deadline: the idle connections must still be held when the other address comes.
    async with _listener(handshake_timeout_s=60, max_handshakes=8,
                         max_handshakes_per_address=2) as listener:
        idle = [await trio.open_tcp_stream("127.0.0.1", listener.port) for _ in range(8)]
        await eventually(lambda: listener.refused == 6, timeout_s=10, interval_s=0.01,
                         what="the connections over this address's share to be refused")
        assert listener.handshakes_in_progress == 2
        for sock in idle[2:]:
            assert await _closed_by_node(sock)  # over the per-address cap: closed at once
        node = await _hello_from("127.0.0.2", listener)  # another address still gets a slot
        assert node is not None and node.remote_peer_id == PEER
        assert listener.channels == 1 and listener.handshakes_in_progress == 2


@pytest.mark.parametrize("end", ["close", "reset"])
async def test_a_sender_sees_that_the_peer_is_gone_without_reading(end):
    """A link's pushing end never reads. When the node it pushes to dies (its end closed or
    reset), ``peer_gone`` says so before the next push is written into a dead socket."""
    async with _listener() as listener:
        client, node = await _pair(listener)
        await client.send_frame(b"push")
        assert await node.read_frame(1 << 20) == b"push"
        assert not client.peer_gone()
        await (node.close() if end == "close" else node.reset())
        await eventually(client.peer_gone, what="the sender sees the closed link", timeout_s=10)
        await client.close()
