"""Circuit relay v2 between hosts of one process on loopback (across a NAT: tests/integration/test_netns.py)."""

from __future__ import annotations

import pytest
import trio

from node.net.host import open_host
from node.net.relay import RelayOptions, is_circuit

ECHO = "/shiza/test-relay-echo/1.0.0"


async def test_a_host_reached_only_through_its_relay_serves_streams() -> None:
    async with open_host(b"\x01" * 32, relay_service=RelayOptions()) as relay:
        async with open_host(b"\x02" * 32, relays=[relay.addrs[0]]) as behind:
            circuit = [a for a in behind.addrs if is_circuit(a)]
            assert circuit == [f"{relay.addrs[0]}/p2p-circuit/p2p/{behind.peer_id}"]
            # Behind a NAT its own (private) addresses cannot be dialed: only the relayed one
            # is advertised (a dialer tried the private one first and waited out its timeout).
            assert behind.addrs == circuit
            seen_ips = []

            async def echo(stream) -> None:  # noqa: ANN001
                seen_ips.append(stream.remote_ip)
                await stream.send_frame(await stream.read_frame(1024) or b"")

            behind.set_handler(ECHO, echo)
            async with open_host(b"\x03" * 32) as dialer:
                with trio.fail_after(30):
                    assert await dialer.connect(circuit[0]) == behind.peer_id
                    stream = await dialer.open_stream(behind.peer_id, ECHO)
                    await stream.send_frame(b"through the relay")
                    assert await stream.read_frame(1024) == b"through the relay"
                assert stream.remote_ip is None  # a relayed connection: no direct channel to it
                assert seen_ips == [None]


async def test_a_relay_that_does_not_serve_refuses_the_reservation() -> None:
    async with open_host(b"\x04" * 32) as plain:
        with pytest.raises(Exception) as refused:  # noqa: PT011 - py-libp2p's refusal has several types
            async with open_host(b"\x05" * 32, relays=[plain.addrs[0]]):
                raise AssertionError("reserved on a host that is no relay")
        assert not isinstance(refused.value, AssertionError)


async def test_a_host_with_a_relay_and_an_announced_address_advertises_both() -> None:
    async with open_host(b"\x06" * 32, relay_service=RelayOptions()) as relay:
        async with open_host(b"\x07" * 32, announce=["/ip4/127.0.0.1/tcp/4001"],
                             relays=[relay.addrs[0]]) as forwarded:
            assert forwarded.addrs == [f"/ip4/127.0.0.1/tcp/4001/p2p/{forwarded.peer_id}",
                                       f"{relay.addrs[0]}/p2p-circuit/p2p/{forwarded.peer_id}"]


async def test_a_dialer_that_leaves_leaves_no_connection_behind_the_relay() -> None:
    """When a relayed peer goes away, the relay ends the circuit on both sides. py-libp2p's
    relay forwarded the end of one direction to nobody: the host behind it kept a dead
    connection per circuit, and after three (its per-peer limit) a client returning with the
    same identity had each new circuit closed as it opened (seen as a 7-12 s first token through
    a NATed node, benchmarks/wan --relayed)."""
    from tests.polling import eventually

    async with open_host(b"\x11" * 32, relay_service=RelayOptions()) as relay:
        async with open_host(b"\x12" * 32, relays=[relay.addrs[0]]) as behind:
            (circuit,) = [a for a in behind.addrs if is_circuit(a)]

            async def echo(stream) -> None:  # noqa: ANN001
                await stream.send_frame(await stream.read_frame(1024) or b"")

            behind.set_handler(ECHO, echo)
            for visit in range(4):  # the same identity each time, one more than the limit
                async with open_host(b"\x13" * 32) as dialer:
                    with trio.fail_after(30):
                        await dialer.connect(circuit)
                        stream = await dialer.open_stream(behind.peer_id, ECHO)
                        await stream.send_frame(b"visit %d" % visit)
                        assert await stream.read_frame(1024) == b"visit %d" % visit
                    dialer_id = dialer.peer_id

                async def gone() -> bool:
                    return dialer_id not in behind.connected_peers()

                await eventually(gone, timeout_s=20, interval_s=0.05,
                                 what="the host behind the relay to drop the departed dialer")
