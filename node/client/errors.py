"""Everything the agent side raises, in one tree.

    ClientError                  base: ``except ClientError`` catches every failure of the client
    ├── InvalidRequest           the caller's arguments are wrong (empty prompt, max_new_tokens < 1,
    │                            an unusable swarm key file); also a ValueError
    ├── NoRoute                  no chain of peers covers the model's layers now
    │   └── LayersLost           a hop failed mid-generation and no peer can take its layers over
    └── PeerError                a peer could not serve: ``peer_id``, ``code`` (its wire code),
        │                        ``reason``; also a protocol.errors.ShizaError
        ├── PeerUnreachable      it could not be reached, or its stream broke before it answered
        │                        (code 0: no wire code)
        └── Peer<Name>           one class per wire error (PeerBusy, PeerNotAllowed, PeerTimeout,
                                 PeerInvalidMessage, ...): the peer answered Error(code), or what it
                                 sent broke the protocol in that way. Each is also an instance of
                                 that protocol.errors class, so ``except Busy``, ``except NotAllowed``
                                 and ``except ShizaError`` go on working.

Decision on the protocol's own errors: the wire codes (protocol/errors.py) are public vocabulary
and stay visible, but only inside the tree: a peer's error reaches a caller as a ``PeerError``
that is also of the peer's class, carrying the peer's id and, when the peer gave one, its retry
hint (``retry_after_s``: a Busy open is retried after it, node/client/pacing.py). So ``shiza
generate`` maps NoRoute to exit 3, InvalidRequest to 2 and every other ClientError to 4; the
gateway maps load (Busy, RateLimited) and NoRoute to 503 with Retry-After, LimitExceeded to 400
and the rest to 502.

Converted at the lowest layer: the hop sessions (node/client/hops.py) turn StreamBroken, an Error
frame or an unexpected message into a PeerError as they read it; routing raises NoRoute. Callers
of ``SwarmClient.generate``, ``open``, ``route``, ``wait_for_route`` and ``generate_text`` see
these and trio.Cancelled, never StreamBroken, ValueError or a bare Exception.

Inside the client a PeerError is also the signal that one hop failed: generation catches it and
fails the hop over (``HopFailed`` is its former name, kept as an alias).
"""

from __future__ import annotations

from protocol.errors import ERROR_CLASSES, ShizaError

__all__ = [
    "ClientError",
    "HopFailed",
    "InvalidRequest",
    "LayersLost",
    "NoRoute",
    "PeerError",
    "PeerUnreachable",
    "peer_error",
]


class ClientError(Exception):
    """Base of every error the agent side raises."""


class InvalidRequest(ClientError, ValueError):
    """The caller asked for something the client cannot do as asked."""


class NoRoute(ClientError):
    """No chain of candidates covers every layer."""

    def __init__(
        self, num_layers: int, missing: list[tuple[int, int]], peers_seen: list[str], detail: str = ""
    ):
        self.num_layers = num_layers
        self.missing = missing
        self.peers_seen = peers_seen
        gaps = ", ".join(f"{a}:{b}" for a, b in missing) or "none (spans do not chain)"
        seen = ", ".join(peers_seen) or "none"
        head = detail or f"no chain of peers covers layers 0:{num_layers}"
        super().__init__(
            f"{head}; missing layers: {gaps}; "
            f"peers seen: {seen}. Start a node serving the missing layers "
            f"(shiza node run --layers START:END) or bootstrap from another peer."
        )


class LayersLost(NoRoute):
    """A hop failed mid-generation and nobody else serves its layers."""

    def __init__(self, start: int, end: int, detail: str) -> None:
        Exception.__init__(self, f"layers {start}:{end} were lost mid-generation and no peer can take "
                                 f"them over ({detail})")
        self.num_layers, self.missing, self.peers_seen = end, [(start, end)], []


class PeerError(ClientError, ShizaError):
    """A peer could not serve. ``reason`` is what went wrong, ``str()`` names the peer too."""

    name = "peer_error"

    def __init__(self, reason: str, *, peer_id: str = "", layers: tuple[int, int] | None = None,
                 code: int | None = None, retry_after_s: float | None = None) -> None:
        where = f"peer {peer_id}" + (f" (layers {layers[0]}:{layers[1]})" if layers else "")
        ShizaError.__init__(self, f"{where}: {reason}" if peer_id else reason, code=code,
                            retry_after_s=retry_after_s)
        self.reason = reason
        self.peer_id = peer_id
        self.layers = layers


class PeerUnreachable(PeerError):
    """The peer could not be reached, or its stream broke before it answered (code 0)."""

    name = "peer_unreachable"


HopFailed = PeerError  # round one's name for "one hop failed"; failover catches it


def _peer_class(cls: type[ShizaError]) -> type[PeerError]:
    name = f"Peer{cls.__name__}"
    made = type(name, (PeerError, cls), {
        "__module__": __name__, "__qualname__": name, "name": cls.name,
        "__doc__": f"A peer answered {cls.__name__} (wire code {cls.code}), or sent something that is one."})
    return made  # type: ignore[return-value]


#: The PeerError class of each wire error class (``PEER_ERRORS[Busy] is PeerBusy``).
PEER_ERRORS: dict[type[ShizaError], type[PeerError]] = {cls: _peer_class(cls) for cls in ERROR_CLASSES.values()}
globals().update({cls.__name__: cls for cls in PEER_ERRORS.values()})  # importable and picklable by name


def peer_error(error: ShizaError, *, peer_id: str = "", layers: tuple[int, int] | None = None) -> PeerError:
    """``error`` (a peer's Error answer, or a protocol violation in what it sent) as a PeerError
    that is also of ``error``'s own class, with its code and message, naming the peer."""
    if isinstance(error, PeerError):
        return error
    cls = PEER_ERRORS.get(type(error), PeerError)
    return cls(error.message, peer_id=peer_id, layers=layers, code=error.code,
               retry_after_s=getattr(error, "retry_after_s", None))
