"""The network in one process: framed stream pairs, peers' handlers and a DHT, all in memory.

For tests of the session handlers and the client without node processes or libp2p, the way
httpx tests through a mock transport. Everything here keeps the contracts of the real thing:
``MemoryStream`` is a ``FramedStream`` (the framing, limits and errors of node/net/streams.py,
held to them by tests/node/net/test_stream_conformance.py), ``MemoryNetwork.connector`` a
``Connector``, ``MemoryDHT`` validates values on store and on read with the swarm's validators
as ``SwarmDHT`` does.

    async with open_memory_network() as net:
        net.set_handler(server_peer, INFERENCE_PROTOCOL, span_server.handle_inference)
        stream = await net.connector(client_peer).open_stream(server_peer, INFERENCE_PROTOCOL)

``net.drop_peer(peer)`` is a node that dies: its streams are reset and it can no longer be
reached.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import trio

from node.net.dht import DHTError, SelectFn, StaleValue, ValidateFn, select_largest
from node.net.records import DHT_SELECTORS, DHT_VALIDATORS
from node.net.streams import FramedReader, FramedStream, StreamBroken, StreamHandler, frame, serve_stream

__all__ = ["MemoryConnector", "MemoryDHT", "MemoryNetwork", "MemoryStream", "memory_stream_pair",
           "open_memory_network"]

log = logging.getLogger(__name__)


class _Pipe:
    """One direction of a memory stream: the bytes in flight and how that direction ended."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False  # the sender closed
        self.reset = False  # either end reset the stream
        self._waiting = trio.lowlevel.ParkingLot()

    def put(self, data: bytes) -> None:
        self.data += data
        self._waiting.unpark_all()

    def end(self) -> None:
        self.eof = True
        self._waiting.unpark_all()

    def abort(self) -> None:
        self.reset = True
        self.data.clear()  # as a reset muxer stream: what was in flight is gone
        self._waiting.unpark_all()

    async def wait_readable(self) -> None:
        if self.data or self.eof or self.reset:
            await trio.lowlevel.checkpoint()
            return
        while not (self.data or self.eof or self.reset):
            await self._waiting.park()


class MemoryStream(FramedReader):
    """One end of an in-process stream (a FramedStream); make pairs with ``memory_stream_pair``.

    ``close`` half-closes (the peer reads a clean end, reading goes on), ``reset`` aborts both
    directions (the peer's reads and sends raise StreamBroken; bytes in flight are dropped).
    Cancellation: with ``cancel_breaks`` (the default, as a libp2p stream) a cancelled read or
    send resets the stream; without it reads are cancel-safe, as a direct channel's.
    ``send`` writes raw bytes, so a test can send a truncated or garbled frame.
    """

    def __init__(self, inbox: _Pipe, outbox: _Pipe, local_peer_id: str, remote_peer_id: str,
                 *, cancel_breaks: bool = True) -> None:
        super().__init__()
        self._inbox, self._outbox = inbox, outbox
        self._cancel_breaks = cancel_breaks
        self._send_closed = False
        self.local_peer_id = local_peer_id
        self.remote_peer_id = remote_peer_id

    @contextmanager
    def _on_cancel(self, what: str) -> Iterator[None]:
        """A cancellation inside resets the stream if it mimics libp2p (``cancel_breaks``)."""
        try:
            yield
        except trio.Cancelled:
            if self._cancel_breaks:
                self._abort(f"a {what} on this stream was cancelled")
            raise

    async def _receive_some(self, missing: int) -> bytes:
        with self._on_cancel("read"):
            await self._inbox.wait_readable()
        if self._inbox.reset:
            raise self._break(self._broken or "reset by the peer")
        chunk = bytes(self._inbox.data[:missing])
        del self._inbox.data[:missing]
        return chunk  # b"" once the peer closed and everything was read

    async def send(self, data: bytes) -> None:
        """Write raw bytes (whole frames, or anything a test wants to send)."""
        self._check_usable()
        if self._send_closed:
            raise StreamBroken("send after close")
        with self._on_cancel("send"):
            await trio.lowlevel.checkpoint()
        if self._outbox.reset:
            raise self._break("reset by the peer")
        self._outbox.put(bytes(data))

    async def send_frame(self, payload: bytes) -> None:
        await self.send(frame(payload))

    async def close(self) -> None:
        """Half-close: the peer reads a clean end after what was sent. Idempotent, never raises."""
        self._send_closed = True
        self._outbox.end()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def reset(self) -> None:
        """Abort both directions. Idempotent, never raises."""
        self._abort("reset locally")
        await trio.lowlevel.cancel_shielded_checkpoint()

    @property
    def finished(self) -> bool:
        """Both directions have ended (closed or reset)."""
        return all(p.eof or p.reset for p in (self._inbox, self._outbox))

    def _abort(self, reason: str) -> None:
        self._broken = self._broken or reason
        self._send_closed = True
        self._inbox.abort()
        self._outbox.abort()


def memory_stream_pair(a_peer_id: str, b_peer_id: str, *,
                       cancel_breaks: bool = True) -> tuple[MemoryStream, MemoryStream]:
    """Two connected ends: the first is ``a_peer_id``'s (its remote is ``b_peer_id``), the
    second ``b_peer_id``'s."""
    a_to_b, b_to_a = _Pipe(), _Pipe()
    a = MemoryStream(b_to_a, a_to_b, a_peer_id, b_peer_id, cancel_breaks=cancel_breaks)
    b = MemoryStream(a_to_b, b_to_a, b_peer_id, a_peer_id, cancel_breaks=cancel_breaks)
    return a, b


class MemoryNetwork:
    """Peers' stream handlers and a shared DHT, in one process (build with ``open_memory_network``)."""

    def __init__(self, nursery: trio.Nursery, validators: dict[str, ValidateFn],
                 selectors: dict[str, SelectFn]) -> None:
        self._nursery = nursery
        self._handlers: dict[tuple[str, str], StreamHandler] = {}
        self._streams: list[MemoryStream] = []
        self._dropped: set[str] = set()
        self.validators = validators
        self.selectors = selectors
        self.values: dict[str, bytes] = {}
        self.providers: dict[bytes, dict[str, None]] = {}  # key -> providers, in order
        self.streams_opened = 0

    def set_handler(self, peer_id: str, protocol_id: str, handler: StreamHandler) -> None:
        """Serve ``protocol_id`` at ``peer_id`` with ``handler``, as ``Host.set_handler`` does
        (one task per stream; an escaping exception resets the stream, a return closes it)."""
        self._dropped.discard(peer_id)
        self._handlers[(peer_id, protocol_id)] = handler

    def remove_handler(self, peer_id: str, protocol_id: str) -> None:
        self._handlers.pop((peer_id, protocol_id), None)

    def drop_peer(self, peer_id: str) -> None:
        """``peer_id`` dies: every stream to or from it is reset, it can no longer be reached."""
        self._dropped.add(peer_id)
        for key in [k for k in self._handlers if k[0] == peer_id]:
            del self._handlers[key]
        for stream in self._streams:
            if peer_id in (stream.local_peer_id, stream.remote_peer_id):
                stream._abort("the peer is gone")
        self._streams = [s for s in self._streams if peer_id not in (s.local_peer_id, s.remote_peer_id)]

    def connector(self, peer_id: str) -> MemoryConnector:
        """How ``peer_id`` opens streams to the others (a ``Connector``)."""
        return MemoryConnector(self, peer_id)

    def dht(self, peer_id: str) -> MemoryDHT:
        """``peer_id``'s view of the shared DHT."""
        return MemoryDHT(self, peer_id)

    def _open(self, local: str, peer_id: str, protocol_id: str) -> MemoryStream:
        if local in self._dropped or peer_id in self._dropped:
            raise StreamBroken(f"opening {protocol_id} to {peer_id}: unreachable")
        handler = self._handlers.get((peer_id, protocol_id))
        if handler is None:
            raise StreamBroken(f"opening {protocol_id} to {peer_id}: it does not speak {protocol_id}")
        ours, theirs = memory_stream_pair(local, peer_id)
        self._streams = [s for s in self._streams if not s.finished] + [ours, theirs]
        self.streams_opened += 1
        self._nursery.start_soon(serve_stream, handler, theirs, protocol_id, log)
        return ours


class MemoryConnector:
    """``Connector`` of one peer of a ``MemoryNetwork``. No direct channels: ``remote_ip`` is None."""

    def __init__(self, net: MemoryNetwork, peer_id: str) -> None:
        self.net = net
        self.peer_id = peer_id

    async def open_stream(self, peer_id: str, protocol_id: str, addrs: Sequence[str] = ()) -> FramedStream:
        await trio.lowlevel.checkpoint()
        return self.net._open(self.peer_id, peer_id, protocol_id)

    def remote_ip(self, stream: FramedStream) -> str | None:
        return None


class MemoryDHT:
    """One peer's view of a ``MemoryNetwork``'s DHT: the methods record readers and publishers
    use (``node.net.records.RecordDHT``). Values are validated on store and again on read (an
    expired record is not returned); among two values of one key the namespace's selector
    keeps the better, and a put of a worse one raises StaleValue, as ``SwarmDHT.put`` does."""

    def __init__(self, net: MemoryNetwork, peer_id: str) -> None:
        self.net = net
        self.peer_id = peer_id

    def _namespace(self, key: str) -> str:
        parts = key.split("/")
        if len(parts) < 3 or parts[0] != "" or parts[1] not in self.net.validators:
            raise DHTError(f"no validator for key {key!r}")
        return parts[1]

    def _valid(self, key: str, value: bytes) -> bool:
        try:
            self.net.validators[self._namespace(key)](key, value)
        except Exception:  # noqa: BLE001 - a validator rejects by raising anything
            return False
        return True

    async def put(self, key: str, value: bytes) -> int:
        await trio.lowlevel.checkpoint()
        ns = self._namespace(key)
        self.net.validators[ns](key, value)
        held = self.net.values.get(key)
        if held is not None and held != value and self._valid(key, held):
            select = self.net.selectors.get(ns, select_largest)
            if select(key, [value, held]) != 0:
                raise StaleValue(f"a newer value is already held for {key!r}")
        self.net.values[key] = value
        return 1

    async def get(self, key: str) -> bytes | None:
        await trio.lowlevel.checkpoint()
        value = self.net.values.get(key)
        return value if value is not None and self._valid(key, value) else None

    async def get_from(self, peer_id: str, key: str, timeout_s: float = 10.0) -> bytes | None:
        return await self.get(key)

    async def provide(self, key: bytes) -> bool:
        await trio.lowlevel.checkpoint()
        self.net.providers.setdefault(key, {})[self.peer_id] = None
        return True

    def stop_providing(self, key: bytes) -> None:
        self.net.providers.get(key, {}).pop(self.peer_id, None)

    async def find_providers(self, key: bytes, count: int = 50) -> list[str]:
        await trio.lowlevel.checkpoint()
        return [p for p in self.net.providers.get(key, {}) if p not in self.net._dropped][:count]


@asynccontextmanager
async def open_memory_network(
    validators: dict[str, ValidateFn] | None = None,
    selectors: dict[str, SelectFn] | None = None,
) -> AsyncIterator[MemoryNetwork]:
    """A ``MemoryNetwork`` whose handlers run in a nursery of this block (the swarm's DHT
    validators by default). Leaving the block cancels every handler still running."""
    async with trio.open_nursery() as nursery:
        yield MemoryNetwork(nursery, DHT_VALIDATORS if validators is None else validators,
                            DHT_SELECTORS if selectors is None else selectors)
        nursery.cancel_scope.cancel()
