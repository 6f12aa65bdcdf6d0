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
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import multiaddr
import trio
from libp2p.abc import IHost
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


@dataclass(frozen=True)
class RelayOptions:
    """Limits of a host that relays for others (``shiza node run --relay-service``)."""

    max_reservations: int = 64
    max_circuits: int = 64
    circuit_s: int = 3600  # a relayed connection lives at most this long
    circuit_bytes: int = 1 << 30  # and carries at most this many bytes


def is_circuit(maddr: str) -> bool:
    return "/p2p-circuit" in maddr


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
    protocol = CircuitV2Protocol(host, limits=limits, allow_hop=serve is not None)
    host.set_stream_handler(STOP_PROTOCOL_ID, protocol._handle_stop_stream)
    if serve is not None:
        host.set_stream_handler(HOP_PROTOCOL_ID, protocol._handle_hop_stream)
    async with trio.open_nursery() as nursery, background_trio_service(protocol):
        transport = CircuitV2Transport(host, protocol, RelayConfig(roles=roles, limits=limits))
        try:
            yield Relay(host, nursery, protocol, transport)
        finally:
            nursery.cancel_scope.cancel()
