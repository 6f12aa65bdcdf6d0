"""Circuit relay v2 (py-libp2p 0.8.1) for hosts behind a NAT: serve as a relay, reserve, dial.

Every host runs the relay protocol's client side (the stop role): it can dial a peer at a
``<relay>/p2p-circuit/p2p/<peer>`` address and accept connections that a relay brings it. A host
with ``serve=True`` is also a relay for others (the hop role, opt-in) within ``RelayLimits``. A host
behind a NAT calls ``reserve(relay_maddr)``: it connects out to the relay, reserves a slot, and
from then on advertises ``<relay>/p2p-circuit`` (node/net/addrs.py), so peers reach it through
the relay. What the library needs that it does not do itself (found by benchmarks/wan/relay_probe):
the hop and stop handlers are set by hand, the protocol runs as a service, and a reservation is
made explicitly (its discovery's auto-reserve made none).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.tools.anyio_service import background_trio_service

log = logging.getLogger(__name__)

__all__ = ["Relay", "RelayOptions", "is_circuit", "open_relay"]

RESERVE_TIMEOUT_S = 30.0
DIAL_TIMEOUT_S = 30.0
RELAY_READ_BYTES = 1 << 16  # one read of a relayed stream, at most


@dataclass(frozen=True)
class RelayOptions:
    """Limits of a host that relays for others (``shiza node run --relay-service``)."""

    max_reservations: int = 64
    max_circuits: int = 64
    circuit_s: int = 3600  # a relayed connection lives at most this long
    circuit_bytes: int = 1 << 30  # and carries at most this many bytes


def is_circuit(maddr: str) -> bool:
    return "/p2p-circuit" in maddr


class _Circuits(CircuitV2Protocol):
    """py-libp2p's relay, with each circuit's data copied by a loop of ours.

    Its own copy loop of one direction does not take the end of a yamux stream for an end
    (it retries the read, with pauses), and then closes the streams it keeps under a peer's id:
    for the source direction only the source's stream, for the other whatever circuit that
    peer has *now* (a newer one, when the peer was reached again). The host behind the relay
    never saw a circuit end, kept a dead connection per circuit, and a client coming back with
    the same identity had its new circuit closed as it opened (tests/node/net/test_relay.py).
    Here a direction that ends (end of stream, reset, the circuit's time or bytes used up)
    ends the stream it was writing to, which ends the other direction in turn."""

    async def _relay_data(self, src_stream: Any, dst_stream: Any, peer_id: Any,
                          deadline: float | None = None, circuit_data_limit: list[int] | None = None) -> None:
        clean = False
        try:
            while deadline is None or time.monotonic() < deadline:
                try:
                    data = await src_stream.read(RELAY_READ_BYTES)
                except StreamEOF:
                    data = b""
                if not data:
                    clean = True
                    return
                if circuit_data_limit is not None:  # shared by both directions of the circuit
                    if len(data) > circuit_data_limit[0]:
                        log.info("a circuit through us used up its %d bytes", self.limits.data)
                        return
                    circuit_data_limit[0] -= len(data)
                with trio.fail_after(self.write_timeout):
                    await dst_stream.write(data)
            log.info("a circuit through us reached its %d s", self.limits.duration)
        except (StreamError, trio.TooSlowError, OSError) as exc:
            log.debug("relayed stream ended: %r", exc)
        finally:
            with trio.CancelScope(shield=True):
                if clean:  # pass the end on; the other direction ends when its side answers it
                    await self._close_stream(dst_stream)
                else:
                    for stream in (src_stream, dst_stream):
                        try:
                            await stream.reset()
                        except Exception:  # noqa: BLE001 - already gone
                            pass
            if self._active_relays.get(peer_id, (None,))[0] in (src_stream, dst_stream):
                del self._active_relays[peer_id]  # ours, not a newer circuit of that peer


class Relay:
    """The relay protocol on one host: dial circuits, accept them, reserve slots, maybe relay."""

    def __init__(self, host: IHost, nursery: trio.Nursery, protocol: CircuitV2Protocol,
                 transport: CircuitV2Transport) -> None:
        self._host = host
        self._nursery = nursery
        self._protocol = protocol
        self._transport = transport
        self.circuit_addrs: list[str] = []  # what a reservation lets us advertise (without /p2p/<us>)

    async def reserve(self, relay_maddr: str) -> str:
        """Connect to the relay at ``relay_maddr`` (ending in /p2p/<relay>), reserve a slot and
        advertise ``<relay_maddr>/p2p-circuit`` from now on; returns that address. Raises
        ConnectionError when the relay refuses."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(relay_maddr))
        with trio.fail_after(RESERVE_TIMEOUT_S):
            await self._host.connect(info)
            stream = await self._host.new_stream(info.peer_id, [HOP_PROTOCOL_ID])
            if not await self._transport.reserve(stream, info.peer_id, self._nursery):
                raise ConnectionError(f"relay {relay_maddr} refused a reservation")
        addr = f"{relay_maddr}/p2p-circuit"
        if addr not in self.circuit_addrs:
            self.circuit_addrs.append(addr)
        log.info("reserved a slot on relay %s", relay_maddr)
        return addr

    async def dial(self, circuit_maddr: str) -> None:
        """Connect to the peer at ``<relay>/p2p-circuit/p2p/<peer>`` through its relay."""
        with trio.fail_after(DIAL_TIMEOUT_S):
            await self._transport.dial(multiaddr.Multiaddr(circuit_maddr))


@asynccontextmanager
async def open_relay(host: IHost, serve: RelayOptions | None = None) -> AsyncIterator[Relay]:
    """Run the relay protocol on a running ``host`` for the life of the block."""
    opts = serve or RelayOptions()
    limits = RelayLimits(duration=opts.circuit_s, data=opts.circuit_bytes,
                         max_circuit_conns=opts.max_circuits, max_reservations=opts.max_reservations)
    roles = RelayRole.STOP | RelayRole.CLIENT | (RelayRole.HOP if serve is not None else RelayRole.STOP)
    protocol = _Circuits(host, limits=limits, allow_hop=serve is not None)
    host.set_stream_handler(STOP_PROTOCOL_ID, protocol._handle_stop_stream)
    if serve is not None:
        host.set_stream_handler(HOP_PROTOCOL_ID, protocol._handle_hop_stream)
    async with trio.open_nursery() as nursery, background_trio_service(protocol):
        transport = CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=limits))
        try:
            yield Relay(host, nursery, protocol, transport)
        finally:
            nursery.cancel_scope.cancel()
