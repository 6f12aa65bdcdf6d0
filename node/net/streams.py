"""One interface for framed streams, whatever carries them, and the framing written once.

Every frame is a 4-byte big-endian length followed by that many bytes (the layout of
``protocol.codec.encode_frame``). What node/net/wire.py, the session handlers and the client
use of a stream is ``FramedStream``:

    remote_peer_id        the authenticated peer at the other end (base58)
    send_frame(payload)   send one frame
    read_frame(max_len)   the next frame's payload; None on a clean end between frames
    close()               we send no more (the peer reads a clean end). Idempotent, never raises
    reset()               abort both directions. Idempotent, never raises

Implementations: ``node.net.host.Stream`` (a libp2p stream), ``node.net.direct.DirectChannel``
(a sealed TCP connection, SPEC.md 9.5) and ``node.net.memory.MemoryStream`` (an in-process
pair, for tests). tests/node/net/test_stream_conformance.py holds each to this contract.

Errors, the same for every implementation:

    StreamBroken   reset by either side, the connection died, the stream ended inside a frame,
                   a frame failed authentication (direct), or the stream is unusable after a
                   cancelled call (see below). Every later read raises it too.
    FrameTooLong   a header announced more than ``max_len``. The body is not read; the reading
                   side is out of sync (every later read raises FrameTooLong again), sending
                   still works, so an Error frame can go out before the stream is closed.

Where they differ (each class documents its own):

* Cancellation. A read of a direct channel or a memory stream that is cancelled loses nothing:
  bytes already received stay in the buffer and the next read goes on from them. A libp2p
  stream is reset when a read or send on it is cancelled (py-libp2p's reads and writes are not
  atomic under cancellation), so a deadline on it ends it. A memory pair mimics either.
* ``close``: a libp2p or memory stream half-closes (reading goes on); a direct channel closes
  its connection (the session ends with it).

``FramedReader`` is the shared part: the buffer, header parsing, the limit and the errors of a
frame cut short. A transport supplies ``_receive_some`` (its bytes, its errors, its
cancellation) and, for sealed frames, ``_frame_size`` and ``_open_frame``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol, TypeVar

__all__ = [
    "HEADER",
    "Connector",
    "FrameTooLong",
    "FramedReader",
    "FramedStream",
    "StreamBroken",
    "StreamHandler",
    "frame",
    "serve_stream",
]

HEADER = struct.Struct(">I")


class StreamBroken(Exception):
    """The stream can no longer be used: reset, dropped, truncated or cancelled."""


class FrameTooLong(Exception):
    """A frame header announced more bytes than the reader allows."""

    def __init__(self, length: int, max_len: int) -> None:
        super().__init__(f"frame of {length} bytes exceeds the limit of {max_len}")
        self.length = length
        self.max_len = max_len


def frame(payload: bytes) -> bytes:
    """``payload`` with its 4-byte big-endian length prefix."""
    return HEADER.pack(len(payload)) + payload


class FramedStream(Protocol):
    """A stream of length-prefixed frames to one authenticated peer (see the module docstring).

    One task may read while another sends; two concurrent readers (or senders) are not
    supported by any implementation.
    """

    @property
    def remote_peer_id(self) -> str: ...

    async def send_frame(self, payload: bytes) -> None: ...

    async def read_frame(self, max_len: int) -> bytes | None: ...

    async def close(self) -> None: ...

    async def reset(self) -> None: ...


StreamHandler = Callable[[FramedStream], Awaitable[None]]


class Connector(Protocol):
    """How a client opens streams to peers: ``node.net.host.Libp2pConnector`` over a libp2p
    host, ``node.net.memory.MemoryNetwork.connector`` in one process (tests)."""

    async def open_stream(self, peer_id: str, protocol_id: str, addrs: Sequence[str] = ()) -> FramedStream:
        """A new stream to ``peer_id`` speaking ``protocol_id`` (``addrs``: where to dial it).
        Raises StreamBroken when the peer cannot be reached or does not speak the protocol."""
        ...

    def remote_ip(self, stream: FramedStream) -> str | None:
        """The IP address ``stream``'s peer is reached at (for a direct channel), if any."""
        ...


class FramedReader:
    """Reading frames out of a transport's bytes: buffer, header, limit, truncation, written once.

    Subclasses implement ``_receive_some(missing)``: some bytes (at least one), or ``b""`` at a
    clean end of the byte stream; transport failures raise ``self._break(reason)``. The buffer
    only loses bytes once a whole frame is in it, so when ``_receive_some`` is atomic under
    cancellation (a trio socket, a memory pipe) a cancelled ``read_frame`` loses nothing. A
    transport that is not (libp2p) breaks the stream in ``_receive_some`` instead.
    """

    def __init__(self, buffered: bytes = b"") -> None:
        self._buf = bytearray(buffered)
        self._broken: str | None = None

    # -- what a transport supplies ------------------------------------------------------------
    async def _receive_some(self, missing: int) -> bytes:
        """Up to (about) ``missing`` more bytes; b"" at a clean end; raises StreamBroken."""
        raise NotImplementedError

    def _frame_size(self, announced: int, max_len: int) -> int:
        """The body length to read for a header announcing ``announced`` bytes (plain frames:
        as announced). Raises FrameTooLong past ``max_len``."""
        if announced > max_len:
            raise FrameTooLong(announced, max_len)
        return announced

    async def _open_frame(self, body: bytes) -> bytes:
        """The payload carried by a frame's body (plain frames: the body itself)."""
        return body

    # -- shared ---------------------------------------------------------------------------------
    def _break(self, reason: str) -> StreamBroken:
        """Mark the stream unusable; returns the exception to raise."""
        self._broken = reason
        return StreamBroken(reason)

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise StreamBroken(self._broken)

    async def _fill(self, n: int) -> bool:
        """Read until the buffer holds ``n`` bytes; False at a clean end before that."""
        while len(self._buf) < n:
            chunk = await self._receive_some(n - len(self._buf))
            if not chunk:
                return False
            self._buf += chunk
        return True

    async def read_exactly(self, n: int) -> bytes:
        """Exactly ``n`` raw bytes; StreamBroken if the stream ends before them."""
        self._check_usable()
        if not await self._fill(n):
            raise self._break(f"stream ended after {len(self._buf)} of {n} bytes")
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def read_frame(self, max_len: int) -> bytes | None:
        """The payload of the next frame, or None on a clean end of stream between frames.

        Raises FrameTooLong (without reading the body) if the header announces more than
        ``max_len`` bytes, StreamBroken on an end inside a frame, on reset, and once broken.
        """
        self._check_usable()
        if not await self._fill(HEADER.size):
            if self._buf:
                raise self._break(f"stream ended inside a frame header ({len(self._buf)} bytes)")
            return None
        (announced,) = HEADER.unpack_from(self._buf)
        size = self._frame_size(announced, max_len)
        end = HEADER.size + size
        if not await self._fill(end):
            raise self._break(f"stream ended inside a frame ({len(self._buf) - HEADER.size} of {size} bytes)")
        body = bytes(self._buf[HEADER.size:end])
        del self._buf[:end]
        return await self._open_frame(body)


S = TypeVar("S", bound=FramedStream)


async def serve_stream(handler: Callable[[S], Awaitable[None]], stream: S, protocol_id: str,
                       log: logging.Logger) -> None:
    """Run one inbound stream's handler the way every transport does.

    An exception escaping ``handler`` is logged (StreamBroken quietly: the peer went away) and
    the stream is reset; it never reaches the connection or the host. When ``handler`` returns,
    the stream is closed (a no-op if the handler closed or reset it). trio.Cancelled propagates.
    """
    try:
        await handler(stream)
    except StreamBroken as exc:
        log.debug("%s stream from %s broke: %s", protocol_id, stream.remote_peer_id, exc)
        await stream.reset()
    except Exception:
        log.warning("handler for %s from %s failed; resetting the stream", protocol_id,
                    stream.remote_peer_id, exc_info=True)
        await stream.reset()
    else:
        await stream.close()
