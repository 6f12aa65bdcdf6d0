"""The direct channel's keys and sealed frames (protocol/direct.py, SPEC.md 9.5)."""

from __future__ import annotations

import pytest

from protocol import direct
from protocol.direct import ChannelBroken, Opener, Sealer


def _pair() -> tuple[tuple[bytes, bytes], tuple[bytes, bytes]]:
    cpk, csk = direct.keypair()
    npk, nsk = direct.keypair()
    return direct.client_keys(cpk, csk, npk), direct.node_keys(npk, nsk, cpk)


def _body(sealed: bytes) -> bytes:
    assert direct.frame_length(sealed[:4]) == len(sealed) - 4
    return sealed[4:]


def test_both_sides_derive_matching_direction_keys():
    (c_rx, c_tx), (n_rx, n_tx) = _pair()
    assert c_tx == n_rx and c_rx == n_tx and c_tx != c_rx
    assert len(c_tx) == direct.KEY_BYTES


def test_frames_open_in_order_and_hide_the_payload():
    (_, c_tx), (n_rx, _) = _pair()
    sealer, opener = Sealer(c_tx), Opener(n_rx)
    frames = [sealer.seal(b"step %d" % i * 50) for i in range(3)]
    assert all(b"step" not in f for f in frames)
    assert [opener.open(_body(f)) for f in frames] == [b"step %d" % i * 50 for i in range(3)]


@pytest.mark.parametrize("attack", ["flip", "replay", "reorder", "other_key", "truncate"])
def test_altered_replayed_reordered_or_foreign_frames_fail(attack):
    (_, c_tx), (n_rx, _) = _pair()
    sealer = Sealer(c_tx)
    first, second = _body(sealer.seal(b"a" * 100)), _body(sealer.seal(b"b" * 100))
    opener = Opener(n_rx)
    if attack == "flip":
        bad = bytearray(first)
        bad[10] ^= 1
        frames = [bytes(bad)]
    elif attack == "replay":
        assert opener.open(first) == b"a" * 100
        frames = [first]
    elif attack == "reorder":
        frames = [second]
    elif attack == "other_key":
        (_, other_tx), _ = _pair()
        frames = [_body(Sealer(other_tx).seal(b"a" * 100))]
    else:
        frames = [first[:10]]
    with pytest.raises(ChannelBroken):
        opener.open(frames[0])


def test_a_key_of_one_direction_does_not_open_the_other():
    (c_rx, c_tx), _ = _pair()
    with pytest.raises(ChannelBroken):
        Opener(c_rx).open(_body(Sealer(c_tx).seal(b"x")))


def test_hello_carries_the_client_key_and_proves_it_holds_the_secret():
    cpk, csk = direct.keypair()
    npk, nsk = direct.keypair()
    _, c_tx = direct.client_keys(cpk, csk, npk)
    hello = direct.client_hello(cpk, Sealer(c_tx))
    assert direct.frame_length(hello[:4]) == direct.HELLO_BYTES == len(hello) - 4
    key, sealed = direct.split_hello(hello[4:])
    assert key == cpk
    n_rx, _ = direct.node_keys(npk, nsk, key)
    assert Opener(n_rx).open(sealed) == direct.HELLO
    # Someone who saw only the public key cannot make a hello the node accepts.
    epk, esk = direct.keypair()
    _, forged_tx = direct.client_keys(epk, esk, npk)
    forged = direct.client_hello(cpk, Sealer(forged_tx))
    with pytest.raises(ChannelBroken):
        Opener(n_rx).open(direct.split_hello(forged[4:])[1])


def test_limits_and_malformed_input():
    with pytest.raises(ChannelBroken):
        direct.frame_length((direct.MAX_SEALED_BYTES + 1).to_bytes(4, "big"))
    with pytest.raises(ChannelBroken):
        direct.split_hello(b"\x00" * (direct.HELLO_BYTES - 1))
    with pytest.raises(ChannelBroken):
        direct.check_public_key(b"\x00" * 31)
    with pytest.raises(ChannelBroken):
        direct.check_plain(b"nope", direct.HELLO)
