"""Private glue around py-libp2p 0.8.1: construction and conversions.

Everything that depends on py-libp2p internals (attribute names that are not
part of its documented API) lives here, so a version bump breaks one module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import multiaddr
from libp2p import new_host
from libp2p.abc import IHost
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as create_new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.identity_utils import create_identity_from_seed
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.net.addrs import addrs_factory

SEED_LEN = 32


def adopt_libp2p_logging() -> None:
    """Send py-libp2p's log records through the application's handlers, one step quieter.

    Importing libp2p cuts its loggers off (no handler, no propagation, unless LIBP2P_DEBUG is
    set), so Python's last-resort handler printed its warnings raw on stderr, past our format
    and level: a client with one unreachable bootstrap peer printed hundreds of "Failed to open
    TCP stream" lines. Now they propagate, at CRITICAL while the application logs warnings
    (our code reports what matters), ERROR at -v (info) and WARNING at -vv (debug).
    """
    import os

    if os.environ.get("LIBP2P_DEBUG"):
        return  # the operator asked for libp2p's own logging
    app = logging.getLogger().getEffectiveLevel()
    lib = logging.getLogger("libp2p")
    lib.propagate = True
    lib.setLevel(logging.CRITICAL if app >= logging.WARNING else logging.ERROR if app >= logging.INFO
                 else logging.WARNING)


adopt_libp2p_logging()


def key_pair_from_seed(seed: bytes) -> KeyPair:
    """The Ed25519 libp2p key pair of a 32-byte seed (same as protocol.identity)."""
    if len(seed) != SEED_LEN:
        raise ValueError(f"seed must be {SEED_LEN} bytes, got {len(seed)}")
    return create_identity_from_seed(seed)


def peer_id_of_seed(seed: bytes) -> str:
    """The base58 peer id that a host built from `seed` will have."""
    return ID.from_pubkey(key_pair_from_seed(seed).public_key).to_base58()


def build_libp2p_host(seed: bytes, listen: Sequence[multiaddr.Multiaddr], announce: Sequence[str] = ()) -> IHost:
    """A py-libp2p host with Noise as the only security transport and yamux only.

    py-libp2p's default security table also accepts /tls, /secio and /plaintext
    from a dialer; passing our own `sec_opt` replaces it entirely.
    `max_connections_per_peer=1` skips the 250 ms happy-eyeballs wait per dial.
    """
    key_pair = key_pair_from_seed(seed)
    noise = NoiseTransport(
        key_pair, noise_privkey=create_new_x25519_key_pair().private_key
    )
    host = new_host(
        key_pair=key_pair,
        sec_opt={TProtocol(NOISE_PROTOCOL_ID): noise},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=list(listen),
        # never 0.0.0.0 to a peer: wildcards become the interfaces' addresses (node/net/addrs.py)
        addrs_factory=addrs_factory(announce),
    )
    disable_auto_connector(host)
    shorten_failed_dial_memory(host)
    return host


NEGATIVE_DIAL_TTL_S = 5.0  # how long the swarm refuses to dial a peer whose addresses all failed


def shorten_failed_dial_memory(host: IHost, ttl_s: float = NEGATIVE_DIAL_TTL_S) -> None:
    """Make py-libp2p forget a failed dial after ``ttl_s`` instead of 60 s. Its swarm refuses
    every dial, the DHT's included, to a peer whose addresses all failed once; a node killed and
    started again a few seconds later (a new address, in a record the DHT holds) stayed out of
    reach, and out of every lookup that asks it for its own record, for that minute. Our own
    back-off (node/client/health.py) decides when a failed node is used again."""
    cache = getattr(host.get_network(), "_negative_peer_cache", None)
    if cache is not None and hasattr(cache, "_ttl"):
        cache._ttl = ttl_s


def disable_auto_connector(host: IHost) -> None:
    """Stop py-libp2p from dialling every peer in its peerstore.

    Its AutoConnector tries to hold 100-300 connections, dialling whatever the
    peerstore (fed by the DHT) knows. Our node dials only the peers it needs.
    `Swarm.run` calls `auto_connector.start()`, which is what arms it; a
    no-op `start` leaves `_started` False, so its periodic task and the
    on-disconnect trigger both return at once.
    """
    network = host.get_network()
    connector = getattr(network, "auto_connector", None)
    if connector is None:
        return

    async def _start_disabled() -> None:
        return None

    connector.start = _start_disabled  # type: ignore[method-assign]


def forget_failed_dial(host: IHost, peer_id: str | ID) -> None:
    """Let ``peer_id`` be dialed again now. py-libp2p's swarm refuses, for 60 s, every dial to a
    peer whose addresses all failed once ("recently failed all addresses (negative cache)"), even
    to the new address of a node that restarted a second later. The caller has an address it was
    just given (a bootstrap address, a peer's freshly signed record) and its own back-off."""
    unblock = getattr(host.get_network(), "unblock_peer", None)
    if unblock is not None:
        unblock(to_id(peer_id))


def peer_info_from_maddr(maddr: str) -> PeerInfo:
    """Parse a full multiaddr ending in /p2p/<peer id>."""
    return info_from_p2p_addr(multiaddr.Multiaddr(maddr))


def was_reset(raw_stream: object) -> bool:
    """Whether the peer reset this stream.

    py-libp2p 0.8.1 yamux drops a reset stream's bookkeeping at once, so a read
    after a remote reset raises StreamEOF ("Stream closed") as for a clean
    end; only the muxed stream's `reset_received` flag tells them apart.
    """
    muxed = getattr(raw_stream, "muxed_stream", None)
    return bool(getattr(muxed, "reset_received", False))


def is_relayed(raw_stream: object) -> bool:
    """Whether this stream's connection runs through a circuit relay (its remote address is then
    the relay's, not the peer's)."""
    muxed_conn = getattr(raw_stream, "muxed_conn", None)
    try:
        kind = muxed_conn.get_connection_type()  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - not every muxer or connection implements it
        return False
    return getattr(kind, "name", "") == "RELAYED"


def to_id(peer_id: str | ID) -> ID:
    return peer_id if isinstance(peer_id, ID) else ID.from_base58(peer_id)


class TruncateLongRecords(logging.Filter):
    """Shorten py-libp2p log lines that embed whole DHT values.

    The Kademlia handler logs a rejected PUT_VALUE at WARNING with the full value
    in hex (up to 2 MiB of text per rejected record, at a rate a remote peer
    chooses). Rejections are expected in an adversarial network: demote them to
    DEBUG and cut any line to `limit` characters.
    """

    def __init__(self, limit: int = 300) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            return True
        if message.startswith("Failed to store value "):
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
        if len(message) > self.limit:
            record.msg = f"{message[: self.limit]}... ({len(message)} chars)"
            record.args = None
        return True


_FILTERED_LOGGERS = (
    "libp2p.kad_dht.kad_dht",
    "libp2p.kad_dht.value_store",
    "libp2p.kad_dht.provider_store",
    "libp2p.kad_dht.peer_routing",
)


def quiet_dht_logs() -> None:
    """Install TruncateLongRecords once on the py-libp2p DHT loggers."""
    for name in _FILTERED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, TruncateLongRecords) for f in logger.filters):
            logger.addFilter(TruncateLongRecords())
