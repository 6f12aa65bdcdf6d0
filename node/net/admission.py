"""Private swarms: a pre-shared swarm key and an admission step before any other protocol.

py-libp2p has no private-network (pnet) transport, so a private swarm is enforced one layer up
(SPEC.md, section 18). Every node and client of the swarm holds the same secret key file:

* Right after a connection is up, each side runs ``/shiza/admit/0.1.0`` towards the other: both
  prove knowledge of the key with an HMAC over both Noise-authenticated peer ids and fresh
  nonces of both sides (so a proof can be neither replayed nor relayed to a third peer).
* Every other stream handler of the host (inference, info, the Kademlia DHT, identify, ping) is
  gated: a stream from a peer not yet admitted waits (bounded) for the admission's outcome and is
  refused (an Error(NotAllowed) frame on /shiza/ protocols, a reset elsewhere) unless admitted.
  A peer that fails admission is disconnected.
* The swarm id, derived from the key, goes into receipts (``swarm_id``), so receipts of a
  private swarm can never be settled as the public swarm's.

``open_admission(host, key)`` installs all of this for the life of an ``async with`` block; call
it right after ``open_host`` and before anything registers handlers or dials.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
from libp2p.custom_types import TProtocol

from protocol.ids import ADMIT_PROTOCOL
from protocol.messages import Error, encode_message

from node.net.host import FrameTooLong, Host, Stream, StreamBroken

__all__ = [
    "ADMIT_PROTOCOL",
    "Admission",
    "SwarmKey",
    "SwarmKeyError",
    "open_admission",
    "write_swarm_key",
]

log = logging.getLogger(__name__)

ADMIT_TIMEOUT_S = 10.0  # a whole exchange, and how long a gated stream waits for its outcome
NONCE_LEN = 32
MAC_LEN = 32
_DOMAIN = b"shiza/admit/v0\x00"
_PNET_HEADER = "/key/swarm/psk/1.0.0/"


class SwarmKeyError(ValueError):
    """A swarm key file that cannot be used."""


class SwarmKey:
    """A swarm's pre-shared secret and what is derived from it."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise SwarmKeyError(f"a swarm key needs at least 32 bytes of secret, got {len(secret)}")
        self._admit_key = hmac.new(secret, b"shiza/admit-key/v0", hashlib.sha256).digest()
        #: Public name of the swarm: goes into receipts and separates its DHT keys.
        self.swarm_id = "private-" + hmac.new(secret, b"shiza/swarm-id/v0", hashlib.sha256).hexdigest()[:32]

    @classmethod
    def load(cls, path: str | Path) -> "SwarmKey":
        """Read a key file: go-libp2p's pnet format (``/key/swarm/psk/1.0.0/``, ``/base16/``,
        64 hex digits) or a single line of at least 64 hex digits. It must not be readable by
        group or others."""
        path = Path(path)
        try:
            mode = path.stat().st_mode
            text = path.read_text()
        except OSError as exc:
            raise SwarmKeyError(f"cannot read swarm key {path}: {exc.strerror}") from None
        if mode & 0o077:
            raise SwarmKeyError(f"swarm key {path} is accessible by group or others; chmod 600 it")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if lines and lines[0] == _PNET_HEADER:
            if len(lines) != 3 or lines[1] != "/base16/":
                raise SwarmKeyError(f"{path}: only the /base16/ encoding of a pnet key is supported")
            lines = lines[2:]
        if len(lines) != 1:
            raise SwarmKeyError(f"{path}: expected one line of hex digits")
        try:
            secret = bytes.fromhex(lines[0])
        except ValueError:
            raise SwarmKeyError(f"{path}: the key is not hex") from None
        return cls(secret)

    def mac(self, role: bytes, initiator: str, responder: str, nonce_i: bytes, nonce_r: bytes) -> bytes:
        msg = b"".join([_DOMAIN, role, _lp(initiator.encode()), _lp(responder.encode()), nonce_i, nonce_r])
        return hmac.new(self._admit_key, msg, hashlib.sha256).digest()


def _lp(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def write_swarm_key(path: str | Path) -> SwarmKey:
    """Create a new random swarm key file (pnet format, mode 0600); refuses to overwrite."""
    secret = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{_PNET_HEADER}\n/base16/\n{secret.hex()}\n")
    return SwarmKey(secret)


class Admission:
    """Admission state of one host: who proved the key on the current connection."""

    def __init__(self, host: Host, key: SwarmKey, nursery: trio.Nursery) -> None:
        self.host, self.key, self._nursery = host, key, nursery
        self._decided: dict[str, trio.Event] = {}
        self._admitted: set[str] = set()
        self.refused_total = 0

    # ---- state ------------------------------------------------------------------------------
    def _event(self, peer: str) -> trio.Event:
        ev = self._decided.get(peer)
        if ev is None:
            ev = self._decided[peer] = trio.Event()
        return ev

    def _decide(self, peer: str, admitted: bool, why: str = "") -> None:
        if admitted:
            self._admitted.add(peer)
        elif peer not in self._admitted:
            log.info("peer %s not admitted: %s", peer, why)
            self.refused_total += 1
        self._event(peer).set()

    def is_admitted(self, peer: str) -> bool:
        return peer in self._admitted

    async def wait(self, peer: str, timeout_s: float = ADMIT_TIMEOUT_S) -> bool:
        """Whether ``peer`` is admitted, waiting (bounded) for a running admission."""
        if peer in self._admitted:
            return True
        with trio.move_on_after(timeout_s):
            await self._event(peer).wait()
        return peer in self._admitted

    def forget(self, peer: str) -> None:
        """The connection to ``peer`` closed: it must be admitted again on the next one."""
        self._admitted.discard(peer)
        self._decided.pop(peer, None)

    # ---- the exchange -----------------------------------------------------------------------
    async def initiate(self, peer: str) -> None:
        """Run admission towards ``peer`` as the initiator; records the outcome."""
        try:
            with trio.fail_after(ADMIT_TIMEOUT_S):
                stream = await self.host.open_stream(peer, ADMIT_PROTOCOL)
                try:
                    nonce_i = secrets.token_bytes(NONCE_LEN)
                    await stream.send_frame(nonce_i)
                    reply = await stream.read_frame(NONCE_LEN + MAC_LEN)
                    if reply is None or len(reply) != NONCE_LEN + MAC_LEN:
                        raise StreamBroken("short admission reply")
                    nonce_r, mac_r = reply[:NONCE_LEN], reply[NONCE_LEN:]
                    me = self.host.peer_id
                    if not hmac.compare_digest(mac_r, self.key.mac(b"R", me, peer, nonce_i, nonce_r)):
                        await stream.reset()
                        self._decide(peer, False, "its proof of the swarm key is wrong")
                        return
                    await stream.send_frame(self.key.mac(b"I", me, peer, nonce_i, nonce_r))
                    verdict = await stream.read_frame(1)
                    await stream.close()
                except BaseException:
                    await stream.reset()
                    raise
        except Exception as exc:  # noqa: BLE001 - unreachable, no such protocol, timeout, reset
            if not self.is_admitted(peer):
                self._decide(peer, False, f"admission failed: {type(exc).__name__}: {exc}")
                await self._drop(peer)
            return
        if verdict == b"\x01":
            self._decide(peer, True)
        else:
            self._decide(peer, False, "it refused our proof")

    async def respond(self, stream: Stream) -> None:
        """The ``/shiza/admit/0.1.0`` handler: prove ourselves, check the initiator's proof."""
        peer, me = stream.remote_peer_id, self.host.peer_id
        ok = False
        try:
            with trio.move_on_after(ADMIT_TIMEOUT_S):
                nonce_i = await stream.read_frame(NONCE_LEN)
                if nonce_i is None or len(nonce_i) != NONCE_LEN:
                    return
                nonce_r = secrets.token_bytes(NONCE_LEN)
                await stream.send_frame(nonce_r + self.key.mac(b"R", peer, me, nonce_i, nonce_r))
                mac_i = await stream.read_frame(MAC_LEN)
                ok = mac_i is not None and hmac.compare_digest(mac_i, self.key.mac(b"I", peer, me, nonce_i, nonce_r))
                await stream.send_frame(b"\x01" if ok else b"\x00")
        except (StreamBroken, FrameTooLong):  # a peer that does not follow the exchange
            ok = False
        if ok:
            self._decide(peer, True)
        elif not self.is_admitted(peer):
            self._decide(peer, False, "wrong or missing proof of the swarm key")
            self._nursery.start_soon(self._drop, peer)

    async def _drop(self, peer: str) -> None:
        # A moment for refusals (Error frames) to reach the peer, then cut the connection.
        await trio.sleep(1.0)
        if not self.is_admitted(peer):
            try:
                await self.host.disconnect(peer)
            except Exception:  # noqa: BLE001 - already gone
                pass

    # ---- gating every other handler -----------------------------------------------------------
    def gate(self, protocol_id: str, handler: Any) -> Any:
        async def gated(net_stream: Any) -> None:
            peer = net_stream.muxed_conn.peer_id.to_base58()
            if await self.wait(peer):
                await handler(net_stream)
                return
            try:
                if protocol_id.startswith("/shiza/"):
                    with trio.move_on_after(2):
                        await net_stream.write(encode_message(Error(
                            28, "not admitted: this node belongs to a private swarm; "
                                "join it with the swarm's key (--swarm-key)")))
                        await net_stream.close()
                        return
                await net_stream.reset()
            except Exception:  # noqa: BLE001 - the peer may be gone
                pass

        gated.__shiza_gated__ = True  # type: ignore[attr-defined]
        return gated


class _Notifee:
    """py-libp2p network events: start admission on every new connection, forget on close."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission

    async def connected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id.to_base58()
        self.admission._nursery.start_soon(self.admission.initiate, peer)

    async def disconnected(self, network: Any, conn: Any) -> None:
        # One connection per peer (node.host): its end ends the admission.
        self.admission.forget(conn.muxed_conn.peer_id.to_base58())

    async def opened_stream(self, network: Any, stream: Any) -> None:
        return None

    async def closed_stream(self, network: Any, stream: Any) -> None:
        return None

    async def listen(self, network: Any, multiaddr: Any) -> None:
        return None

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        return None


@asynccontextmanager
async def open_admission(host: Host, key: SwarmKey | None) -> AsyncIterator[Admission | None]:
    """Make ``host`` a member of the private swarm of ``key`` (no-op for None); see the module
    docstring. Handlers registered before or inside the block are gated alike."""
    if key is None:
        yield None
        return
    libp2p = host.libp2p
    async with trio.open_nursery() as nursery:
        admission = Admission(host, key, nursery)
        mux = libp2p.get_mux()
        for proto, handler in list(mux.handlers.items()):
            if handler is not None and not getattr(handler, "__shiza_gated__", False):
                mux.handlers[proto] = admission.gate(str(proto), handler)
        original = libp2p.set_stream_handler

        def set_stream_handler(protocol_id: TProtocol, handler: Any) -> None:
            if str(protocol_id) != ADMIT_PROTOCOL:
                handler = admission.gate(str(protocol_id), handler)
            original(protocol_id, handler)

        libp2p.set_stream_handler = set_stream_handler  # type: ignore[method-assign]
        host.set_handler(ADMIT_PROTOCOL, admission.respond)
        libp2p.get_network().register_notifee(_Notifee(admission))
        try:
            yield admission
        finally:
            nursery.cancel_scope.cancel()


async def check_admitted(host: Host, bootstrap: list[str]) -> None:
    """Raise NotAllowed when a bootstrap peer refuses us as an outsider of its private swarm.

    A client without the swarm's key sees only empty DHT answers; asking one bootstrap peer for
    its info turns that into the node's own explanation. Bounded; silent on any other outcome.
    """
    from protocol.errors import NotAllowed
    from protocol.ids import INFO_PROTOCOL
    from protocol.messages import InfoRequest

    from node.net.wire import recv_message, send_message

    for addr in bootstrap[:3]:
        with trio.move_on_after(5):
            try:
                peer = await host.connect(addr)
                stream = await host.open_stream(peer, INFO_PROTOCOL)
                await send_message(stream, InfoRequest())
                reply = await recv_message(stream, 5)
                await stream.reset()
            except Exception:  # noqa: BLE001 - unreachable or reset: not our question
                continue
            if isinstance(reply, Error) and reply.code == NotAllowed.code:
                raise NotAllowed(f"peer {peer} refused us: {reply.message}")
