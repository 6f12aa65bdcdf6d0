"""The messages and signatures of node-to-node flow (SPEC 9.6)."""

from __future__ import annotations

import struct

import pytest

from protocol.codec import Tensor, pack, unpack
from protocol.errors import BadShape, InvalidMessage, InvalidSignature, LimitExceeded
from protocol.identity import Identity
from protocol.messages import Step, decode_message
from protocol.push import Link, Linked, LinkOpen, LinkOpened, Push, Pushed, push_digest, sign_push, verify_push

A, B = Identity.from_seed(bytes(32)), Identity.from_seed(bytes([1]) * 32)
IDS = Tensor("int64", (1, 2), struct.pack("<2q", 0, 1))
HIDDEN = Tensor("float32", (1, 2, 4), struct.pack("<8f", *range(8)))


def _wire(msg):
    return decode_message(unpack(pack(msg.to_wire())))


@pytest.mark.parametrize("msg", [
    Link(), Link(prev_peer=A.peer_id), Link(A.peer_id, B.peer_id, "s1", ("/ip4/127.0.0.1/tcp/1",)),
    Linked(True), Linked(False, "no route"), LinkOpen(), LinkOpen(bytes(32)), LinkOpened(),
    LinkOpened(4001, bytes(32)),
    Push("s1", A.peer_id, 3, HIDDEN, IDS, bytes(64), IDS),
    Pushed(3, bytes(32), bytes(64)),
])
def test_every_message_survives_the_wire(msg):
    assert _wire(msg) == msg


@pytest.mark.parametrize("build, error", [
    (lambda: Link(next_session="s1"), InvalidMessage),  # a session without its peer
    (lambda: Link(next_peer=A.peer_id), InvalidMessage),  # a peer without the session
    (lambda: Link(next_peer=A.peer_id, next_session="s", next_addrs=("a",) * 17), LimitExceeded),
    (lambda: Linked(1), InvalidMessage),  # not a boolean
    (lambda: LinkOpened(4001), InvalidMessage),  # port without key
    (lambda: Push("s1", A.peer_id, 0, HIDDEN, IDS, bytes(63)), InvalidMessage),
    (lambda: Push("s1", A.peer_id, 0, HIDDEN, Tensor("int64", (1, 3), bytes(24)), bytes(64)), BadShape),
    (lambda: Push("", A.peer_id, 0, HIDDEN, IDS, bytes(64)), InvalidMessage),
    (lambda: Pushed(0, bytes(31), bytes(64)), InvalidMessage),
])
def test_bad_fields_are_refused(build, error):
    with pytest.raises(error):
        build()


def test_unknown_fields_are_refused_on_the_wire():
    wire = Linked(True).to_wire() | {"extra": 1}
    with pytest.raises(InvalidMessage):
        decode_message(wire)


def test_the_push_digest_binds_session_step_and_bytes():
    step = Step(3, HIDDEN, IDS)
    d = push_digest("s1", step)
    assert push_digest("s2", step) != d
    assert push_digest("s1", Step(4, HIDDEN, IDS)) != d
    other = Tensor("float32", (1, 2, 4), struct.pack("<8f", *range(1, 9)))
    assert push_digest("s1", Step(3, other, IDS)) != d
    assert push_digest("s1", Step(3, HIDDEN, IDS)) == d


def test_only_the_sender_can_sign_a_push():
    d = push_digest("s1", Step(0, HIDDEN, IDS))
    sig = sign_push(A, d)
    verify_push(A.peer_id, d, sig)
    with pytest.raises(InvalidSignature):
        verify_push(B.peer_id, d, sig)
    with pytest.raises(InvalidSignature):
        verify_push(A.peer_id, push_digest("s2", Step(0, HIDDEN, IDS)), sig)
    # A receipt signature by the same key is no push signature (purposes differ).
    with pytest.raises(InvalidSignature):
        verify_push(A.peer_id, d, A.sign(b"shiza/receipt/v0\x00", d))
