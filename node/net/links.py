"""Node-to-node links: one connection per neighbour pair carrying the pushed steps of many
sessions (SPEC.md 9.6).

The sending node opens a libp2p stream with /shiza/link/0.1.0 to the next hop (Noise: both
node identities authenticated), says ``LinkOpen`` with a fresh X25519 key, and, when the
receiver runs a direct-channel port, moves the link to a sealed TCP connection exactly as a
session's direct channel is made (node/net/direct.py, SPEC 9.5). Without one the pushes travel
on the libp2p stream itself. ``LinkPool`` keeps one ``OutLink`` per peer and closes links left
unused for ``idle_s``; ``accept_link`` is the receiving side of the handshake (the server then
reads ``Push`` frames from what it returns and hands each to its session).

Sends on one link are serialised frame by frame (a lock held for one write, never across an
engine step), so many sessions share a link without waiting on each other's computation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import trio

from protocol import direct as direct_wire
from protocol.errors import InvalidMessage, ShizaError
from protocol.ids import LINK_PROTOCOL, MAX_CONTROL_FRAME_BYTES
from protocol.messages import Error
from protocol.push import LinkOpen, LinkOpened, Push

from node.net.direct import DirectChannel, DirectListener, connect as connect_direct
from node.net.streams import Connector, FramedStream, StreamBroken
from node.net.wire import recv_message, send_message

__all__ = ["LINK_IDLE_S", "LINK_OPEN_TIMEOUT_S", "LinkPool", "OutLink", "accept_link"]

log = logging.getLogger(__name__)

LINK_OPEN_TIMEOUT_S = 10.0  # to open a link (stream, handshake, direct channel)
LINK_IDLE_S = 60.0  # a link no session has used for this long is closed
PUSH_SEND_TIMEOUT_S = 5.0  # a push not written within this breaks the link


@dataclass(eq=False)
class OutLink:
    """The sending end of one link to ``peer_id``."""

    peer_id: str
    io: FramedStream  # the direct channel, or the libp2p stream when there is none
    anchor: FramedStream | None = None  # the libp2p stream the link was opened on, if it moved
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)
    broken: str | None = None
    _lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def direct(self) -> bool:
        return self.anchor is not None

    def usable(self) -> bool:
        """Not broken, and (a direct channel) not closed by the peer: a node that restarted
        closed its end of the old link (``DirectChannel.peer_gone``)."""
        if self.broken is None and isinstance(self.io, DirectChannel) and self.io.peer_gone():
            self.broken = "the peer closed the link"
        return self.broken is None

    async def send(self, push: Push, timeout_s: float = PUSH_SEND_TIMEOUT_S) -> None:
        """Send one push; StreamBroken when the link is (or becomes) unusable."""
        if self.broken is not None:
            raise StreamBroken(self.broken)
        async with self._lock:
            with trio.move_on_after(timeout_s) as scope:
                try:
                    await send_message(self.io, push)
                except StreamBroken as exc:
                    self.broken = str(exc)
                    raise
            if scope.cancelled_caught:
                self.broken = f"a push took over {timeout_s:g} s to send"
                await self.reset()
                raise StreamBroken(self.broken)
        self.last_used = time.monotonic()

    async def close(self) -> None:
        self.broken = self.broken or "closed"
        await self.io.close()
        if self.anchor is not None:
            await self.anchor.close()

    async def reset(self) -> None:
        self.broken = self.broken or "reset"
        await self.io.reset()
        if self.anchor is not None:
            await self.anchor.reset()


class LinkPool:
    """One link per next-hop peer, opened on first use and shared by every session."""

    def __init__(self, connector: Connector, *, direct: bool = True,
                 open_timeout_s: float = LINK_OPEN_TIMEOUT_S, idle_s: float = LINK_IDLE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connector = connector
        self.direct = direct
        self.open_timeout_s = open_timeout_s
        self.idle_s = idle_s
        self.clock = clock
        self._links: dict[str, OutLink] = {}
        self._opening: dict[str, trio.Lock] = {}
        self.opened = 0  # links opened since start
        self.direct_opened = 0  # of those, moved to a direct channel

    def links(self) -> list[OutLink]:
        return list(self._links.values())

    async def acquire(self, peer_id: str, addrs: Sequence[str] = ()) -> OutLink:
        """The link to ``peer_id`` (opened now if there is none usable), counted as used
        until ``release``. Raises StreamBroken when it cannot be opened."""
        lock = self._opening.setdefault(peer_id, trio.Lock())
        async with lock:
            link = self._links.get(peer_id)
            if link is None or not link.usable():
                if link is not None:
                    await link.reset()
                with trio.move_on_after(self.open_timeout_s) as scope:
                    link = await self._open(peer_id, addrs)
                if scope.cancelled_caught or link is None:
                    raise StreamBroken(f"no link to {peer_id} within {self.open_timeout_s:g} s")
                self._links[peer_id] = link
                self.opened += 1
                self.direct_opened += link.direct
            link.users += 1
            link.last_used = self.clock()
            return link

    def release(self, link: OutLink) -> None:
        link.users = max(0, link.users - 1)
        link.last_used = self.clock()

    async def _open(self, peer_id: str, addrs: Sequence[str], direct: bool | None = None) -> OutLink:
        direct = self.direct if direct is None else direct
        public, secret = direct_wire.keypair() if direct else (None, None)
        stream = await self.connector.open_stream(peer_id, LINK_PROTOCOL, addrs)
        try:
            await send_message(stream, LinkOpen(public))
            reply = await recv_message(stream, self.open_timeout_s, MAX_CONTROL_FRAME_BYTES)
            if isinstance(reply, Error):
                raise StreamBroken(f"the peer refused the link: {reply.message}")
            if not isinstance(reply, LinkOpened):
                raise StreamBroken(f"expected link_opened, got {type(reply).__name__}")
        except (ShizaError, StreamBroken) as exc:
            await stream.reset()
            raise StreamBroken(str(exc)) from None
        if reply.direct_port is None or public is None or secret is None:
            return OutLink(peer_id, stream)
        ip = self.connector.remote_ip(stream)
        try:
            if ip is None:
                raise StreamBroken("no IP address for this peer's connection")
            channel = await connect_direct(ip, reply.direct_port, reply.direct_key or b"", peer_id,
                                           public, secret, self.open_timeout_s)
        except StreamBroken as exc:
            log.info("direct link to %s failed (%s); pushing on the libp2p stream", peer_id, exc)
            # The receiver waits for the channel it offered: this link cannot be used; open
            # one without asking.
            await stream.reset()
            return await self._open(peer_id, addrs, direct=False)
        return OutLink(peer_id, channel, anchor=stream)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
                  period_s: float = 5.0) -> None:
        """Close links idle for ``idle_s`` (or broken), until cancelled; then close them all."""
        task_status.started()
        try:
            while True:
                await trio.sleep(period_s)
                now = self.clock()
                for peer_id, link in list(self._links.items()):
                    if link.broken is not None or (link.users == 0 and now - link.last_used > self.idle_s):
                        del self._links[peer_id]
                        lock = self._opening.get(peer_id)
                        if lock is not None and not lock.locked():  # one lock per peer linked now
                            del self._opening[peer_id]
                        await link.close()
        finally:
            with trio.CancelScope(shield=True):
                await self.close_all()

    async def close_all(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            with trio.move_on_after(2):
                await link.close()


async def accept_link(stream: FramedStream, direct: DirectListener | None,
                      timeout_s: float = LINK_OPEN_TIMEOUT_S) -> tuple[FramedStream, bool]:
    """The receiving side of a link's handshake on ``stream`` (the caller has checked that its
    peer may link): answer LinkOpen, and move to a direct channel when asked and offered.
    Returns (where the pushes will arrive, whether that is a direct channel). Raises a
    protocol error for a bad first frame, Timeout when the channel does not come."""
    msg = await recv_message(stream, timeout_s, MAX_CONTROL_FRAME_BYTES)
    if msg is None:
        raise StreamBroken("the link closed before its first frame")
    if not isinstance(msg, LinkOpen):
        raise InvalidMessage(f"expected link_open, got {type(msg).__name__}")
    offer = None
    if msg.direct_key is not None and direct is not None:
        try:
            offer = direct.offer(msg.direct_key, stream.remote_peer_id)
        except ValueError as exc:
            raise InvalidMessage(f"direct_key: {exc}") from None
    try:
        await send_message(stream, LinkOpened(offer.port if offer else None, offer.public if offer else None))
        if offer is None:
            return stream, False
        channel = await offer.wait(timeout_s)
        if channel is None:
            raise StreamBroken("the peer did not connect the direct link it asked for")
        return channel, True
    finally:
        if offer is not None and direct is not None:
            direct.withdraw(offer)
