"""Node-to-node activations (SPEC.md 9.6): their messages, the push digest and the sender's
signature of it.

A hop that pushes its output of step ``n`` to the next hop's session ``S`` signs

    push_digest = sha256(PUSH_DIGEST_DOMAIN + utf8(S) + 0x00 + sha256(canonical(step)))

where ``step`` is the wire map of ``Step(n, output, positions, mask)``: what the next hop runs.
The next hop reports that digest and signature to the client (``Pushed``); the client, which
received the sender's output itself, recomputes the digest. A hop that pushed something other
than what it reported is caught by its own signature; a hop that claims to have received
something else cannot forge the sender's.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from ._fields import check_bytes, check_int, check_seq, check_str, set_field
from .codec import Tensor, canonical_pack
from .direct import KEY_BYTES as DIRECT_KEY_BYTES
from .errors import InvalidMessage
from .identity import Identity, public_key_from_peer_id, verify
from .ids import MAX_ADDR_LEN, MAX_ADDRS, MAX_ERROR_MESSAGE_LEN, MAX_ID_LEN, PURPOSE_PUSH
from ._message import omit_unset
from .messages import _MAX_STEP, MESSAGE_TYPES, Step, _Message, step_tensors

PUSH_DIGEST_DOMAIN: Final = b"shiza/push-digest/v0\x00"


def push_digest(session_id: str, step: Step) -> bytes:
    """The 32-byte digest of ``step`` pushed to session ``session_id``."""
    inner = hashlib.sha256(canonical_pack(step.to_wire())).digest()
    return hashlib.sha256(PUSH_DIGEST_DOMAIN + session_id.encode("utf-8") + b"\x00" + inner).digest()


def sign_push(identity: Identity, digest: bytes) -> bytes:
    return identity.sign(PURPOSE_PUSH, digest)


@functools.lru_cache(maxsize=1024)
def _public_key(peer_id: str) -> bytes:
    return public_key_from_peer_id(peer_id)


def verify_push(sender_peer_id: str, digest: bytes, sig: bytes) -> None:
    """InvalidSignature unless ``sig`` is ``sender_peer_id``'s signature of ``digest``."""
    verify(_public_key(sender_peer_id), PURPOSE_PUSH, digest, sig)


# Messages ------------------------------------------------------------------------------


def _check_peer(name: str, value: Any) -> None:
    check_str(name, value, MAX_ID_LEN, nonempty=True)


@dataclass(frozen=True)
class Link(_Message):
    """Client to a hop, in an OPEN session with no receipt pending: take Steps pushed by
    ``prev_peer`` (None: from the client only) and push each output to session
    ``next_session`` of ``next_peer`` (None: send it to the client only), reached at
    ``next_addrs``. Answered by Linked. A later Link replaces an earlier one."""

    TYPE: ClassVar[str] = "link"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"prev_peer": None, "next_peer": None, "next_session": "",
                                           "next_addrs": ()}
    prev_peer: str | None = None
    next_peer: str | None = None
    next_session: str = ""
    next_addrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.prev_peer is not None:
            _check_peer("prev_peer", self.prev_peer)
        if self.next_peer is not None:
            _check_peer("next_peer", self.next_peer)
            check_str("next_session", self.next_session, MAX_ID_LEN, nonempty=True)
        elif self.next_session:
            raise InvalidMessage("next_session without next_peer")
        addrs = check_seq("next_addrs", self.next_addrs, MAX_ADDRS)
        for addr in addrs:
            check_str("next_addrs[]", addr, MAX_ADDR_LEN, nonempty=True)
        set_field(self, "next_addrs", addrs)


@dataclass(frozen=True)
class Linked(_Message):
    """Answer to Link. ``pushing``: the hop reached ``next_peer`` and pushes its outputs there
    (False when the Link named none, or when the link could not be made: ``reason``)."""

    TYPE: ClassVar[str] = "linked"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"reason": ""}
    pushing: bool
    reason: str = ""

    def __post_init__(self) -> None:
        if type(self.pushing) is not bool:
            raise InvalidMessage("pushing must be a boolean")
        check_str("reason", self.reason, MAX_ERROR_MESSAGE_LEN)


@dataclass(frozen=True)
class LinkOpen(_Message):
    """First frame of a /shiza/link stream, node to node; ``direct_key`` asks for a direct
    channel as in OpenSession (9.5)."""

    TYPE: ClassVar[str] = "link_open"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"direct_key": None}
    direct_key: bytes | None = None

    def __post_init__(self) -> None:
        if self.direct_key is not None:
            check_bytes("direct_key", self.direct_key, DIRECT_KEY_BYTES, exact=True)


@dataclass(frozen=True)
class LinkOpened(_Message):
    """Answer to LinkOpen: the link is open; ``direct_port``/``direct_key`` as in SessionOpened."""

    TYPE: ClassVar[str] = "link_opened"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"direct_port": None, "direct_key": None}
    direct_port: int | None = None
    direct_key: bytes | None = None

    def __post_init__(self) -> None:
        if (self.direct_port is None) != (self.direct_key is None):
            raise InvalidMessage("direct_port and direct_key come together")
        if self.direct_port is not None:
            check_int("direct_port", self.direct_port, 1, 65535)
            check_bytes("direct_key", self.direct_key, DIRECT_KEY_BYTES, exact=True)


@dataclass(frozen=True)
class Push(_Message):
    """Node to node, on a link: a Step for session ``session_id`` of the receiver (opened by
    ``client``), the sender's output; ``sig`` is the sender's signature of its push digest (protocol.push).
    ``keep`` and ``draft``: those of the sender's step (a window step, 9.7), left out when None."""

    TYPE: ClassVar[str] = "push"
    _OPTIONAL: ClassVar[dict[str, Any]] = {"mask": None, "keep": None, "draft": None}
    session_id: str
    client: str  # the client of the sender's session: the receiver's session must have it too
    step: int
    input: Tensor
    positions: Tensor
    sig: bytes
    mask: Tensor | None = None
    keep: int | None = None
    draft: Tensor | None = None

    def __post_init__(self) -> None:
        check_str("session_id", self.session_id, MAX_ID_LEN, nonempty=True)
        _check_peer("client", self.client)
        check_bytes("sig", self.sig, 64, exact=True)
        self.as_step()  # the same checks as a Step

    def as_step(self) -> "Step":
        return Step(self.step, self.input, self.positions, self.mask, self.keep, self.draft)

    def to_wire(self) -> dict[str, Any]:
        return omit_unset(super().to_wire(), keep=None, draft=None)

    @classmethod
    def from_wire(cls, obj: Any) -> Push:
        return cls(**step_tensors(cls._wire_fields(obj)))


@dataclass(frozen=True)
class Pushed(_Message):
    """Hop to client, right before the StepResult of a step whose input was pushed to it: the
    push digest of that input as received and the sender's signature of it."""

    TYPE: ClassVar[str] = "pushed"
    step: int
    input_digest: bytes
    sig: bytes

    def __post_init__(self) -> None:
        check_int("step", self.step, 0, _MAX_STEP)
        check_bytes("input_digest", self.input_digest, 32, exact=True)
        check_bytes("sig", self.sig, 64, exact=True)


MESSAGE_TYPES.update({cls.TYPE: cls for cls in (Link, Linked, LinkOpen, LinkOpened, Push, Pushed)})
