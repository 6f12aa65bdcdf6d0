"""Direct activation channels: a session's Step frames over TCP instead of the libp2p stream.

SPEC.md 9.5; the keys, hello and frame sealing are protocol/direct.py. A node runs one
``DirectListener`` (a TCP port beside its libp2p port). When a client asks for a direct
channel in OpenSession, the session handler makes an ``Offer`` (an ephemeral key pair bound to
that session and that client peer) and sends its public key and the port in SessionOpened.
The client connects, proves it holds the keys (hello), gets the node's answer, and from then
on the session's frames travel sealed on that connection. The libp2p stream stays open beside
it and is closed with the session.

``DirectChannel`` is a ``FramedStream`` (node/net/streams.py) like a libp2p stream, so the
server's and client's session code is the same on either path. Unlike a py-libp2p stream its
reads are cancel-safe: a read cancelled by a deadline loses no bytes (trio's socket reads are
atomic), so a timed-out read leaves the channel usable.

Why: a py-libp2p round trip of a 2 KB activation costs ~20x a plain TCP round trip on loopback
(pure-Python Noise and yamux); measured by ``shiza bench`` (round_trip in results.json).
"""

from __future__ import annotations

import logging
import socket
import struct
from dataclasses import dataclass, field

import trio

from protocol import direct as wire

from node.net.streams import HEADER, FramedReader, FrameTooLong, StreamBroken

log = logging.getLogger(__name__)

# An honest client sends its hello right after connecting: a short deadline and a per-address
# share keep one address reconnecting idle connections from holding every slot (SPEC 9.5).
HANDSHAKE_TIMEOUT_S = 3.0
MAX_HANDSHAKES = 64  # unauthenticated connections at once; more are closed at once
MAX_HANDSHAKES_PER_ADDRESS = 4  # of those, from one source IP address
_RECV = 1 << 16


class DirectChannel(FramedReader):
    """One sealed TCP connection carrying one session's frames (a FramedStream).

    Each frame on the wire is the 4-byte length of the sealed body, then the body (payload
    plus a 16-byte tag); ``read_frame(max_len)`` limits the payload. A frame that fails
    authentication breaks the channel and closes the connection.

    Cancellation: a cancelled read loses no bytes (trio's socket reads are atomic and the
    shared reader keeps a partial frame buffered), so a read that timed out leaves the channel
    usable. A cancelled send may have sent part of a frame: it breaks the channel.
    ``close`` closes the connection in both directions (no half-close: the session ends).
    """

    def __init__(self, sock: trio.SocketStream, sealer: wire.Sealer, opener: wire.Opener,
                 remote_peer_id: str, buf: bytes = b"") -> None:
        super().__init__(buf)
        self._sock = sock
        self._sealer = sealer
        self._opener = opener
        self._closed = False
        self.remote_peer_id = remote_peer_id
        self.ended = trio.Event()  # set once closed or reset (the listener's task waits on it)

    async def send_frame(self, payload: bytes) -> None:
        """Seal ``payload`` and send it as one frame."""
        self._check_usable()
        sealed = self._sealer.seal(payload)
        try:
            await self._sock.send_all(sealed)
        except trio.Cancelled:
            self._broken = "a send was cancelled midway"
            raise
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._break(f"send failed: {exc}") from None

    async def _receive_some(self, missing: int) -> bytes:
        try:
            return await self._sock.receive_some(max(_RECV, missing))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise self._break(f"read failed: {exc}") from None

    def _frame_size(self, announced: int, max_len: int) -> int:
        # The header counts the sealed body: payload plus the tag.
        try:
            wire.frame_length(HEADER.pack(announced))
        except wire.ChannelBroken as exc:
            raise self._break(str(exc)) from None
        if announced > max_len + wire.TAG_BYTES:
            raise FrameTooLong(announced - wire.TAG_BYTES, max_len)
        return announced

    async def _open_frame(self, body: bytes) -> bytes:
        try:
            return self._opener.open(body)
        except wire.ChannelBroken as exc:
            error = self._break(str(exc))
            await self.reset()
            raise error from None

    async def close(self) -> None:
        """Close the connection (the session ends with it). Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            try:
                await self._sock.aclose()
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.ended.set()

    async def reset(self) -> None:
        """Abort: reset the connection (TCP RST, so the peer reads StreamBroken, not a clean end)
        and mark the channel broken. Idempotent, never raises."""
        self._broken = self._broken or "reset locally"
        if not self._closed:
            try:  # linger 0: close() sends RST and drops what is unsent
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:  # already gone
                pass
        await self.close()

    def peer_gone(self) -> bool:
        """Whether the peer has closed or reset the connection, as far as the kernel knows now
        (a non-blocking peek, nothing consumed). A sender that never reads (a link's pushing
        end) learns this way that the node it pushes to died, before it writes into a socket
        whose first write would vanish and second would fail."""
        if self._closed or self._broken is not None:
            return True
        sock = self._sock.socket  # trio's; its recv is async: peek on a duplicate of its fd
        try:
            with socket.fromfd(sock.fileno(), sock.family, sock.type) as raw:
                return raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # open, nothing to read
        except OSError:
            return True  # reset

    def _check_usable(self) -> None:
        super()._check_usable()
        if self._closed:
            raise StreamBroken("channel closed")


@dataclass(eq=False)
class Offer:
    """One session's pending direct channel, waiting for its client to connect."""

    client_pk: bytes
    peer_id: str
    public: bytes
    secret: bytes
    port: int
    _arrived: trio.MemorySendChannel = field(init=False, repr=False)
    _inbox: trio.MemoryReceiveChannel = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._arrived, self._inbox = trio.open_memory_channel[DirectChannel](1)

    async def wait(self, timeout_s: float) -> DirectChannel | None:
        """The connected channel, or None if the client did not come within ``timeout_s``."""
        with trio.move_on_after(timeout_s):
            return await self._inbox.receive()
        return None


class DirectListener:
    """The node's direct-channel port: hands each authenticated connection to its session."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
                 max_handshakes: int = MAX_HANDSHAKES,
                 max_handshakes_per_address: int = MAX_HANDSHAKES_PER_ADDRESS) -> None:
        self.host = host
        self.port = port
        self.handshake_timeout_s = handshake_timeout_s
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self._offers: dict[bytes, Offer] = {}
        self._handshaking = 0  # unauthenticated connections now (bounded by max_handshakes)
        self._handshaking_from: dict[str, int] = {}  # of those, per source address
        self.refused = 0  # connections closed before a session was bound (bad hello, unknown key)
        self.channels = 0  # channels bound to sessions since start

    @property
    def handshakes_in_progress(self) -> int:
        """Connections accepted and not yet authenticated (or timed out)."""
        return self._handshaking

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self._handle, listeners)

    def offer(self, client_pk: bytes, peer_id: str) -> Offer:
        """Register a session's offer; the caller must ``withdraw`` it when the session ends."""
        wire.check_public_key(client_pk)
        if client_pk in self._offers:
            raise wire.ChannelBroken("this direct key is already in use")
        public, secret = wire.keypair()
        offer = Offer(client_pk, peer_id, public, secret, self.port)
        self._offers[client_pk] = offer
        return offer

    def withdraw(self, offer: Offer) -> None:
        if self._offers.get(offer.client_pk) is offer:
            del self._offers[offer.client_pk]

    async def _handle(self, sock: trio.SocketStream) -> None:
        try:
            address = str(sock.socket.getpeername()[0])
        except OSError:  # gone before we looked
            address = ""
        from_address = self._handshaking_from.get(address, 0)
        if self._handshaking >= self.max_handshakes or from_address >= self.max_handshakes_per_address:
            self.refused += 1
            await sock.aclose()
            return
        self._handshaking += 1
        self._handshaking_from[address] = from_address + 1
        channel = None
        try:
            with trio.move_on_after(self.handshake_timeout_s):
                channel = await self._handshake(sock)
        except (wire.ChannelBroken, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("direct connection refused: %s", exc)
        finally:
            self._handshaking -= 1
            left = self._handshaking_from[address] - 1
            if left:
                self._handshaking_from[address] = left
            else:  # no entry per address ever seen: the map stays bounded by the handshakes
                del self._handshaking_from[address]
        if channel is None:
            self.refused += 1
            await sock.aclose()
            return
        self.channels += 1
        log.info("direct channel from %s bound to its session", channel.remote_peer_id)
        await channel.ended.wait()  # serve_listeners closes the socket when this returns

    async def _handshake(self, sock: trio.SocketStream) -> DirectChannel | None:
        buf = bytearray()
        while len(buf) < 4 + wire.HELLO_BYTES:
            chunk = await sock.receive_some(4 + wire.HELLO_BYTES - len(buf))
            if not chunk:
                return None
            buf += chunk
        if int.from_bytes(buf[:4], "big") != wire.HELLO_BYTES:
            raise wire.ChannelBroken("not a direct-channel hello")
        client_pk, sealed = wire.split_hello(bytes(buf[4:]))
        offer = self._offers.get(client_pk)
        if offer is None:
            raise wire.ChannelBroken("no session waits for this key")
        rx, tx = wire.node_keys(offer.public, offer.secret, client_pk)
        opener, sealer = wire.Opener(rx), wire.Sealer(tx)
        wire.check_plain(opener.open(sealed), wire.HELLO)  # the client holds the keys
        self.withdraw(offer)  # one connection per offer
        await sock.send_all(sealer.seal(wire.ACCEPT))
        channel = DirectChannel(sock, sealer, opener, offer.peer_id)
        try:
            offer._arrived.send_nowait(channel)
        except (trio.WouldBlock, trio.BrokenResourceError):
            return None  # the session stopped waiting
        return channel


async def connect(host: str, port: int, node_pk: bytes, remote_peer_id: str,
                  client_pk: bytes, client_sk: bytes, timeout_s: float) -> DirectChannel:
    """The client side: connect, say hello, wait for the node's answer (all within
    ``timeout_s``). Raises StreamBroken when any of it fails."""
    rx, tx = wire.client_keys(client_pk, client_sk, node_pk)
    opener, sealer = wire.Opener(rx), wire.Sealer(tx)
    sock: trio.SocketStream | None = None
    try:
        with trio.fail_after(timeout_s):
            sock = await trio.open_tcp_stream(host, port)
            await sock.send_all(wire.client_hello(client_pk, sealer))
            channel = DirectChannel(sock, sealer, opener, remote_peer_id)
            answer = await channel.read_frame(len(wire.ACCEPT))
            if answer != wire.ACCEPT:
                raise StreamBroken("the node did not accept the direct channel")
            return channel
    except (trio.TooSlowError, OSError, trio.BrokenResourceError, wire.ChannelBroken,
            StreamBroken, FrameTooLong) as exc:
        if sock is not None:
            with trio.CancelScope(shield=True):
                await sock.aclose()
        raise StreamBroken(f"direct channel to {host}:{port} failed: {exc or type(exc).__name__}") from None
