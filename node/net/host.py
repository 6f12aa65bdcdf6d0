"""The libp2p host of a node: Noise only, yamux, one connection per peer.

`open_host(seed)` runs a py-libp2p host for the life of an `async with` block
and yields a `Host`, a thin wrapper that speaks in base58 peer ids and
multiaddr strings. Streams are wrapped in `Stream`, a `FramedStream`
(node/net/streams.py: the framing, the errors and the contract shared with
direct channels and in-memory streams), which converts py-libp2p's
exceptions into our own:

    StreamBroken   the peer reset the stream, the connection died, the stream
                   ended in the middle of a frame, or a read/send on it was
                   cancelled (the stream is then unusable; see Stream).
    FrameTooLong   a frame header announced more than the caller's max_len.

A clean end of stream between frames is not an error: `read_frame` returns
None. `Libp2pConnector` is how a client opens streams to peers through a host
(the client's connector seam; node/net/memory.py has the in-process one).
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.host.exceptions import StreamFailure
from libp2p.network.stream.exceptions import StreamEOF, StreamError
from libp2p.protocol_muxer.exceptions import MultiselectClientError

from node.net._libp2p import build_libp2p_host, forget_failed_dial, is_relayed, peer_info_from_maddr, to_id, was_reset
from node.net.relay import Relay, RelayOptions, is_circuit, open_relay
from node.net.streams import HEADER, FramedReader, FramedStream, FrameTooLong, StreamBroken, frame, serve_stream

__all__ = [
    "HEADER",
    "FrameTooLong",
    "Handler",
    "Host",
    "Libp2pConnector",
    "Stream",
    "StreamBroken",
    "frame",
    "open_host",
]

log = logging.getLogger(__name__)

# How long addresses we were told about stay in the peerstore (seconds).
ADDR_TTL = 6 * 60 * 60
# Bound on the best-effort reset sent when a read or send is cancelled.
_RESET_GRACE = 1.0


class Stream(FramedReader):
    """One libp2p stream to one remote peer (a FramedStream).

    One task may read while another sends; two concurrent readers (or senders)
    interleave bytes and are not supported.

    Cancellation: py-libp2p's read and write are not atomic under trio
    cancellation (a read can take bytes out of the muxer buffer and then be
    cancelled while it sends the window update; a send can stop between yamux
    frames). So when `send`, `read_exactly` or `read_frame` is cancelled (for
    example by `trio.fail_after` around it), the stream is reset (best effort,
    bounded to one second, shielded) and every later call raises StreamBroken.
    The Cancelled exception itself propagates unchanged. Treat a deadline on a
    stream as the end of that stream. (Direct channels and memory streams keep
    the shared reader's cancel-safety instead: node/net/streams.py.)
    """

    def __init__(self, raw: INetStream) -> None:
        super().__init__()
        self._raw = raw
        self._done = False  # closed or reset by us
        self.remote_peer_id: str = raw.muxed_conn.peer_id.to_base58()

    @property
    def protocol_id(self) -> str | None:
        proto = self._raw.get_protocol()
        return None if proto is None else str(proto)

    @property
    def libp2p(self) -> INetStream:
        return self._raw

    @property
    def remote_ip(self) -> str | None:
        """The IP address of the peer's end of this stream's connection, if it has one (a
        connection through a relay has none: its socket ends at the relay)."""
        if is_relayed(self._raw):
            return None
        remote = self._raw.get_remote_address()
        return None if remote is None else str(remote[0])

    # -- sending ------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Write all of `data` (raw bytes: whole frames, or anything a test
        wants to send). Raises StreamBroken if the stream is unusable.

        py-libp2p resets a stream whose reader leaves the window full for 5 s;
        that surfaces here as StreamBroken.
        """
        self._check_usable()
        try:
            await self._raw.write(data)
        except trio.Cancelled:
            await self._break_on_cancel()
            raise
        except StreamError as exc:
            raise self._break(f"send failed: {type(exc).__name__}: {exc}") from exc

    async def send_frame(self, payload: bytes) -> None:
        """Send `payload` as one length-prefixed frame."""
        await self.send(frame(payload))

    # -- receiving ----------------------------------------------------------

    async def _receive_some(self, missing: int) -> bytes:
        try:
            chunk = await self._raw.read(missing)
        except StreamEOF:
            if was_reset(self._raw):
                raise self._break("reset by the peer") from None
            return b""
        except trio.Cancelled:
            await self._break_on_cancel()
            raise
        except StreamError as exc:
            raise self._break(f"read failed: {type(exc).__name__}: {exc}") from exc
        return chunk or b""  # some py-libp2p paths return b"" at EOF instead of raising

    # -- ending -------------------------------------------------------------

    async def close(self) -> None:
        """Half-close: tell the peer we send no more. Reads still work.

        Idempotent, never raises for an already-broken stream.
        """
        if self._done:
            return
        self._done = True
        try:
            await self._raw.close()
        except Exception:  # a dead connection can raise anything here
            log.debug("close of a stream to %s failed", self.remote_peer_id, exc_info=True)

    async def reset(self) -> None:
        """Abort the stream in both directions. Idempotent, never raises."""
        self._broken = self._broken or "reset locally"
        self._done = True
        try:
            await self._raw.reset()
        except Exception:  # py-libp2p may raise anything from a dead connection
            log.debug("reset of a stream to %s failed", self.remote_peer_id, exc_info=True)

    async def _break_on_cancel(self) -> None:
        self._broken = "a read or send on this stream was cancelled"
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_RESET_GRACE):
                await self.reset()


Handler = Callable[[Stream], Awaitable[None]]


class Host:
    """Our view of a running py-libp2p host (see `open_host`)."""

    def __init__(self, libp2p_host: IHost, nursery: trio.Nursery | None = None,
                 relay_service: RelayOptions | None = None, circuit_only: bool = False) -> None:
        self.libp2p = libp2p_host
        self.peer_id: str = libp2p_host.get_id().to_base58()
        self._nursery = nursery
        self._relay_service = relay_service
        self.relay: Relay | None = None
        # Behind a NAT (relays and no announced address): our own addresses cannot be dialed
        # from outside, so once a reservation holds only the relayed ones are advertised.
        self.circuit_only = circuit_only

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs with the bound port and /p2p/<peer id>; then the relayed addresses
        of our reservations (``<relay>/p2p-circuit/p2p/<us>``; node/net/relay.py). py-libp2p's
        own get_addrs cannot carry those (it cuts an address at its first /p2p/)."""
        own = [str(a) for a in self.libp2p.get_addrs()]
        circuits = [f"{c}/p2p/{self.peer_id}" for c in (self.relay.circuit_addrs if self.relay else [])]
        if self.circuit_only and circuits:
            return circuits  # a private address first made every dialer wait for its timeout
        return own + circuits

    async def start_relay(self) -> Relay:
        """Run the circuit relay protocol on this host (once; a relay for others only if the host
        was opened with ``relay_service``)."""
        if self.relay is None:
            if self._nursery is None:
                raise RuntimeError("this host was not opened with open_host: no relay")
            self.relay = await self._nursery.start(_run_relay, self.libp2p, self._relay_service)
        return self.relay

    def set_handler(self, protocol_id: str, handler: Handler) -> None:
        """Serve `protocol_id` with `handler`, one task per inbound stream.

        An exception escaping `handler` is logged and the stream is reset; it
        never reaches the connection or the host. When `handler` returns, the
        stream is closed (a no-op if the handler already closed or reset it).
        trio.Cancelled (host shutdown) propagates.
        """

        async def run_handler(raw: INetStream) -> None:
            await serve_stream(handler, Stream(raw), protocol_id, log)

        self.libp2p.set_stream_handler(TProtocol(protocol_id), run_handler)

    def remove_handler(self, protocol_id: str) -> None:
        self.libp2p.remove_stream_handler(TProtocol(protocol_id))

    def add_addrs(self, peer_id: str, maddrs: list[str]) -> None:
        """Remember addresses of `peer_id` (without /p2p/) for later dials."""
        addrs = [multiaddr.Multiaddr(a) for a in maddrs]
        if addrs:
            self.libp2p.get_peerstore().add_addrs(to_id(peer_id), addrs, ADDR_TTL)

    async def connect(self, maddr: str) -> str:
        """Connect to the peer at a full multiaddr (ending in /p2p/<id>).

        Returns its peer id. Raises whatever py-libp2p raises when the dial or
        the Noise/yamux upgrade fails (SwarmException and subclasses). A peer
        whose addresses all failed before is dialed anyway (``forget_failed_dial``).
        Cancellation abandons the dial; nothing is left half-registered.
        """
        if is_circuit(maddr):  # <relay>/p2p-circuit/p2p/<peer>: through the relay
            peer = maddr.rsplit("/p2p/", 1)[1]
            if peer == self.peer_id:
                raise ValueError("refusing to connect to ourselves")
            relay = await self.start_relay()
            await relay.dial(maddr)
            return peer
        info = peer_info_from_maddr(maddr)
        if info.peer_id == self.libp2p.get_id():
            raise ValueError("refusing to connect to ourselves")
        # An address given now is tried now, even if this peer failed all its addresses a
        # moment ago (it may have restarted there); callers back off on their own.
        forget_failed_dial(self.libp2p, info.peer_id)
        await self.libp2p.connect(info)
        # host.connect stores the address for 120 s only; keep it longer so
        # open_stream can redial after a dropped connection.
        self.libp2p.get_peerstore().add_addrs(info.peer_id, info.addrs, ADDR_TTL)
        return info.peer_id.to_base58()

    async def open_stream(self, peer_id: str, protocol_id: str) -> Stream:
        """Open a stream to `peer_id` speaking `protocol_id`.

        Dials the peer first if needed, using the addresses in the peerstore
        (from `connect`, `add_addrs` or the DHT). Raises py-libp2p's
        SwarmException if it cannot be reached and StreamBroken if it does not
        speak `protocol_id`. Cancellation leaves no stream open.
        """
        try:
            raw = await self.libp2p.new_stream(to_id(peer_id), [TProtocol(protocol_id)])
        except (StreamError, StreamFailure, MultiselectClientError) as exc:
            # A peer that does not speak protocol_id, or a stream that died
            # during negotiation. Dial failures stay SwarmException.
            raise StreamBroken(f"opening {protocol_id} to {peer_id}: {exc}") from exc
        return Stream(raw)

    def connected_peers(self) -> list[str]:
        return [p.to_base58() for p in self.libp2p.get_connected_peers()]

    async def disconnect(self, peer_id: str) -> None:
        await self.libp2p.disconnect(to_id(peer_id))


class Libp2pConnector:
    """How a client reaches peers through a libp2p host (a ``node.net.streams.Connector``)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    async def open_stream(self, peer_id: str, protocol_id: str, addrs: Sequence[str] = ()) -> Stream:
        """Dial ``peer_id`` (the first of ``addrs`` that answers, else the peerstore's) and open
        a ``protocol_id`` stream. Every failure to reach it or to negotiate is StreamBroken."""
        for addr in addrs:
            try:
                await self.host.connect(addr)
                break
            except Exception as exc:  # noqa: BLE001 - py-libp2p raises many kinds; try the next
                log.debug("dial %s failed: %s", addr, exc)
        try:
            return await self.host.open_stream(peer_id, protocol_id)
        except StreamBroken:
            raise
        except Exception as exc:  # noqa: BLE001 - SwarmException and kin: unreachable
            raise StreamBroken(f"cannot open {protocol_id} to {peer_id}: {exc}") from None

    def remote_ip(self, stream: FramedStream) -> str | None:
        return stream.remote_ip if isinstance(stream, Stream) else None


CLOSE_TIMEOUT_S = 5.0  # closing a host's connections and listener, at most


def _check_can_listen(addr: multiaddr.Multiaddr) -> None:
    """OSError (EADDRINUSE, EADDRNOTAVAIL, EACCES...) naming ``addr`` if its TCP port cannot be
    bound now: py-libp2p only logs a listener that fails, and the node would serve unreachable."""
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols or not protocols & {"ip4", "ip6"}:
        return
    port = int(addr.value_for_protocol("tcp"))
    if port == 0:
        return  # any free port
    family = socket.AF_INET6 if "ip6" in protocols else socket.AF_INET
    ip = addr.value_for_protocol("ip6" if family == socket.AF_INET6 else "ip4")
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the real listener does
        try:
            probe.bind((ip, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {addr}: {exc.strerror}") from None


async def _run_relay(host: IHost, serve: RelayOptions | None,
                     task_status: trio.TaskStatus[Relay] = trio.TASK_STATUS_IGNORED) -> None:
    async with open_relay(host, serve) as relay:
        task_status.started(relay)
        await trio.sleep_forever()


@asynccontextmanager
async def open_host(seed: bytes, listen: str = "/ip4/127.0.0.1/tcp/0",
                    announce: Sequence[str] = (), *, relay_service: RelayOptions | None = None,
                    relays: Sequence[str] = ()) -> AsyncIterator[Host]:
    """Run a host with the Ed25519 identity of `seed`, listening on `listen`.

    `Host.addrs` (and what identify and the DHT tell peers) never holds a wildcard: a
    0.0.0.0 or :: listen address is advertised as the interfaces' addresses, and `announce`
    (multiaddrs without /p2p/) replaces them all (node/net/addrs.py).

    Circuit relay (node/net/relay.py): with `relay_service` the host relays for others within
    those limits; with `relays` (full multiaddrs of relays) it reserves a slot on each before the
    block starts and advertises only the relayed addresses (a host behind a NAT; with `announce`
    too, both: the announced ones first). Any host dials a
    ``/p2p-circuit`` address through its relay (the protocol starts on first use).

    Noise is the only security transport (a dialer offering only plaintext,
    TLS or SECIO is refused), yamux the only muxer, at most one connection per
    peer, and py-libp2p's auto-connector is disabled. Port 0 binds a free port;
    `Host.addrs` reports the real one. Leaving the block closes the listener
    and every connection.
    """
    listen_addr = multiaddr.Multiaddr(listen)
    _check_can_listen(listen_addr)
    libp2p_host = build_libp2p_host(seed, [listen_addr], announce)
    async with libp2p_host.run(listen_addrs=[listen_addr]):
        if not libp2p_host.get_network().listeners:  # py-libp2p logs a failed listen and goes on
            raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {listen}")
        try:
            async with trio.open_nursery() as nursery:  # the relay protocol, when it runs
                host = Host(libp2p_host, nursery, relay_service, circuit_only=bool(relays) and not announce)
                if relay_service is not None or relays:
                    relay = await host.start_relay()
                    for addr in relays:
                        await relay.reserve(addr)
                yield host
                nursery.cancel_scope.cancel()
        finally:
            # py-libp2p's run() only cancels the swarm's tasks: once a DHT had run on the host,
            # its listener kept accepting and peers stayed connected to a host that no longer
            # served them (their requests then hung until a timeout). Close it explicitly.
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await libp2p_host.get_network().close()
