"""node.host on loopback: Noise-only hosts, framed streams, contained handlers."""

from __future__ import annotations

import hashlib
import logging

import multiaddr
import pytest
import trio
from libp2p import new_host
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport

from tests.polling import eventually
from node.net.host import FrameTooLong, Stream, StreamBroken, frame, open_host

ECHO = "/shiza-test/echo/1.0.0"
MAX = 1 << 20
TIMEOUT = 10


def seed(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


async def echo(stream: Stream) -> None:
    while (payload := await stream.read_frame(MAX)) is not None:
        await stream.send_frame(payload)


async def test_echo_round_trip_and_peer_ids() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_host(seed("a")) as a, open_host(seed("b")) as b:
            expected = ID.from_pubkey(create_identity_from_seed(seed("b")).public_key)
            assert b.peer_id == expected.to_base58()
            assert b.libp2p.get_id() == expected
            assert all(addr.endswith(f"/p2p/{b.peer_id}") for addr in b.addrs)
            assert all("/tcp/0/" not in addr for addr in b.addrs)

            b.set_handler(ECHO, echo)
            assert await a.connect(b.addrs[0]) == b.peer_id
            assert b.peer_id in a.connected_peers()

            stream = await a.open_stream(b.peer_id, ECHO)
            assert stream.remote_peer_id == b.peer_id
            payloads = [b"", b"x", bytes(range(256)) * 40, b"last"]
            for payload in payloads:
                await stream.send_frame(payload)
                assert await stream.read_frame(MAX) == payload
            # Several frames in one write, read back one by one.
            await stream.send(b"".join(frame(p) for p in payloads))
            for payload in payloads:
                assert await stream.read_frame(MAX) == payload
            await stream.close()
            assert await stream.read_frame(MAX) is None  # server closed after our EOF


async def test_plaintext_dialer_is_refused() -> None:
    with trio.fail_after(TIMEOUT):
        async with open_host(seed("noise-only")) as ours:
            ours.set_handler(ECHO, echo)
            key_pair = create_identity_from_seed(seed("plaintext"))
            plain = new_host(
                key_pair=key_pair,
                sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(key_pair)},
            )
            async with plain.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with pytest.raises(Exception):
                    await plain.connect(info_from_p2p_addr(multiaddr.Multiaddr(ours.addrs[0])))
                assert ID.from_base58(ours.peer_id) not in plain.get_connected_peers()

            # Control: the same kind of host offering Noise does get in.
            noise_pair = create_identity_from_seed(seed("noise-dialer"))
            noise = NoiseTransport(noise_pair, create_new_x25519_key_pair().private_key)
            dialer = new_host(key_pair=noise_pair, sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise})
            async with dialer.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                await dialer.connect(info_from_p2p_addr(multiaddr.Multiaddr(ours.addrs[0])))
                assert ID.from_base58(ours.peer_id) in dialer.get_connected_peers()


async def test_failing_handler_does_not_stop_the_host(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def flaky(stream: Stream) -> None:
        nonlocal calls
        calls += 1
        payload = await stream.read_frame(MAX)
        if payload == b"boom":
            raise RuntimeError("handler bug")
        await stream.send_frame(payload or b"")

    with trio.fail_after(TIMEOUT):
        async with open_host(seed("c")) as client, open_host(seed("d")) as server:
            server.set_handler(ECHO, flaky)
            await client.connect(server.addrs[0])
            with caplog.at_level(logging.WARNING, logger="node.net.host"):
                bad = await client.open_stream(server.peer_id, ECHO)
                await bad.send_frame(b"boom")
                with pytest.raises(StreamBroken):
                    await bad.read_frame(MAX)
            assert any("handler bug" in (r.exc_text or "") or r.exc_info for r in caplog.records)

            good = await client.open_stream(server.peer_id, ECHO)
            await good.send_frame(b"fine")
            assert await good.read_frame(MAX) == b"fine"
            assert calls == 2
            assert server.peer_id in client.connected_peers()


async def test_remote_reset_and_truncation_surface_as_stream_broken() -> None:
    async def reset_mid_frame(stream: Stream) -> None:
        await stream.send(frame(b"0123456789")[:7])  # header + 3 of 10 bytes
        await stream.reset()

    async def close_mid_frame(stream: Stream) -> None:
        await stream.send(frame(b"0123456789")[:7])

    with trio.fail_after(TIMEOUT):
        async with open_host(seed("e")) as client, open_host(seed("f")) as server:
            server.set_handler("/t/reset", reset_mid_frame)
            server.set_handler("/t/close", close_mid_frame)
            await client.connect(server.addrs[0])
            for proto in ("/t/reset", "/t/close"):
                stream = await client.open_stream(server.peer_id, proto)
                with pytest.raises(StreamBroken):
                    await stream.read_frame(MAX)
                with pytest.raises(StreamBroken):  # stays broken
                    await stream.read_frame(MAX)
            with pytest.raises(StreamBroken):
                await client.open_stream(server.peer_id, "/t/unknown")


async def test_oversized_header_raises_without_reading_body() -> None:
    async def announce_huge(stream: Stream) -> None:
        await stream.send((MAX + 1).to_bytes(4, "big") + b"abc")
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        async with open_host(seed("g")) as client, open_host(seed("h")) as server:
            server.set_handler("/t/huge", announce_huge)
            await client.connect(server.addrs[0])
            stream = await client.open_stream(server.peer_id, "/t/huge")
            with pytest.raises(FrameTooLong) as info:
                await stream.read_frame(MAX)
            assert info.value.length == MAX + 1
            await stream.reset()


async def test_cancelled_read_breaks_the_stream() -> None:
    async def silent(stream: Stream) -> None:
        await stream.read_frame(MAX)

    with trio.fail_after(TIMEOUT):
        async with open_host(seed("i")) as client, open_host(seed("j")) as server:
            server.set_handler("/t/silent", silent)
            await client.connect(server.addrs[0])
            stream = await client.open_stream(server.peer_id, "/t/silent")
            with trio.move_on_after(0.2) as scope:
                await stream.read_frame(MAX)
            assert scope.cancelled_caught
            with pytest.raises(StreamBroken):
                await stream.read_frame(MAX)
            with pytest.raises(StreamBroken):
                await stream.send_frame(b"late")


async def test_latency_figures(capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion on speed: prints connect / open / round-trip times."""
    with trio.fail_after(TIMEOUT):
        async with open_host(seed("k")) as a, open_host(seed("l")) as b:
            b.set_handler(ECHO, echo)
            t0 = trio.current_time()
            await a.connect(b.addrs[0])
            t1 = trio.current_time()
            stream = await a.open_stream(b.peer_id, ECHO)
            t2 = trio.current_time()
            rtts = []
            for _ in range(50):
                start = trio.current_time()
                await stream.send_frame(b"x" * 100)
                await stream.read_frame(MAX)
                rtts.append(trio.current_time() - start)
            rtts.sort()
            await stream.close()
    with capsys.disabled():
        print(
            f"\n[host] connect {1e3 * (t1 - t0):.1f} ms, open_stream {1e3 * (t2 - t1):.1f} ms, "
            f"100 B round trip median {1e3 * rtts[len(rtts) // 2]:.2f} ms "
            f"p90 {1e3 * rtts[int(len(rtts) * 0.9)]:.2f} ms"
        )


@pytest.mark.parametrize("transport", ["tls", "secio"])
async def test_tls_or_secio_dialer_is_refused(transport: str) -> None:
    """A dialer offering only /tls/1.0.0 or only /secio/1.0.0 gets no connection."""
    with trio.fail_after(TIMEOUT):
        async with open_host(seed(f"noise-only-{transport}")) as ours:
            ours.set_handler(ECHO, echo)
            key_pair = create_identity_from_seed(seed(f"{transport}-dialer"))
            if transport == "tls":
                from libp2p.security.tls.transport import PROTOCOL_ID, TLSTransport

                sec = {TProtocol(PROTOCOL_ID): TLSTransport(key_pair)}
            else:
                from libp2p.security.secio.transport import ID as SECIO_ID
                from libp2p.security.secio.transport import Transport as SecioTransport

                sec = {TProtocol(SECIO_ID): SecioTransport(key_pair)}
            other = new_host(key_pair=key_pair, sec_opt=sec)
            async with other.run(listen_addrs=[multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                with pytest.raises(Exception):
                    await other.connect(info_from_p2p_addr(multiaddr.Multiaddr(ours.addrs[0])))
                assert ID.from_base58(ours.peer_id) not in other.get_connected_peers()
                assert other.get_id() not in ours.libp2p.get_connected_peers()


async def test_leaving_the_block_closes_listener_and_connections_even_after_a_dht() -> None:
    """py-libp2p's run() only cancels the swarm's tasks; once a DHT had run on a host, its
    listener kept accepting and peers stayed connected to it. open_host closes the swarm."""
    import socket

    from node.net.records import DHT_SELECTORS, DHT_VALIDATORS
    from node.net.dht import open_dht

    with trio.fail_after(30):
        async with open_host(seed("stays")) as a, open_dht(a, DHT_VALIDATORS, DHT_SELECTORS):
            async with open_host(seed("leaves")) as b:
                async with open_dht(b, DHT_VALIDATORS, DHT_SELECTORS, [a.addrs[0]]):
                    assert b.peer_id in a.connected_peers() or a.peer_id in b.connected_peers()
                port = int(b.addrs[0].split("/tcp/")[1].split("/")[0])
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0  # nothing listens there any more
            await eventually(lambda: b.peer_id not in a.connected_peers(), timeout_s=10, interval_s=0.05,
                             what="the peer to see the connection end")
            with pytest.raises(Exception):
                await a.open_stream(b.peer_id, ECHO)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_peer_that_restarts_on_its_address_is_reachable_at_once() -> None:
    """py-libp2p refuses, for 60 s, to dial a peer whose addresses all failed once. A node that
    was killed and came back a second later on the same address was unreachable for that minute
    (the chaos run's "recently failed all addresses (negative cache)"): an address given to
    ``connect`` is now tried at once."""
    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    with trio.fail_after(TIMEOUT):
        async with open_host(seed("dialer")) as a:
            async with open_host(seed("restarts"), listen) as b:
                addr = b.addrs[0]
                b.set_handler(ECHO, echo)
            with pytest.raises(Exception):  # noqa: B017 - py-libp2p raises several kinds
                await a.connect(addr)  # gone: every address fails, the peer is negative-cached
            async with open_host(seed("restarts"), listen) as b:
                b.set_handler(ECHO, echo)
                assert await a.connect(addr) == b.peer_id
                stream = await a.open_stream(b.peer_id, ECHO)
                await stream.send_frame(b"back")
                assert await stream.read_frame(MAX) == b"back"
                await stream.close()


async def test_the_swarm_forgets_a_failed_dial_as_told() -> None:
    """The DHT dials through the swarm, not ``connect``: its memory of failed dials is shortened
    (5 s by default, from py-libp2p's 60 s). With 0 s, a peer back on its address is dialed from
    the peerstore at once; this fails if py-libp2p moves the cache the setting reaches into."""
    from node.net._libp2p import shorten_failed_dial_memory

    listen = f"/ip4/127.0.0.1/tcp/{_free_port()}"
    with trio.fail_after(TIMEOUT):
        async with open_host(seed("dialer2")) as a:
            shorten_failed_dial_memory(a.libp2p, 0.0)
            async with open_host(seed("restarts2"), listen) as b:
                addr, peer = b.addrs[0], b.peer_id
            with pytest.raises(Exception):  # noqa: B017 - py-libp2p raises several kinds
                await a.connect(addr)
            async with open_host(seed("restarts2"), listen) as b:
                b.set_handler(ECHO, echo)
                stream = await a.open_stream(peer, ECHO)  # the peerstore's address, no connect
                await stream.send_frame(b"back")
                assert await stream.read_frame(MAX) == b"back"
                await stream.close()
