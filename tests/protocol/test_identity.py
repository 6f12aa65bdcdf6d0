from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    PURPOSE_CAPACITY_RECORD,
    PURPOSE_RECEIPT,
    PURPOSE_RECEIPT_COUNTERSIGN,
    PURPOSE_STATEMENT,
    Identity,
    IdentityFileError,
    InvalidMessage,
    InvalidSignature,
    peer_id_from_public_key,
    public_key_from_peer_id,
    verify,
)
from protocol.identity import b58decode, b58encode

SEEDS = [bytes(32), bytes(range(32)), b"\xff" * 32, bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")]


@pytest.mark.parametrize("seed", SEEDS, ids=["zeros", "range", "ones", "rfc8032"])
def test_peer_id_matches_py_libp2p(seed: bytes) -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    theirs = ID.from_pubkey(Ed25519PrivateKey.new(seed).get_public_key())
    ours = Identity.from_seed(seed)
    assert ours.peer_id == theirs.to_base58()
    assert ours.peer_id_bytes == theirs.to_bytes()
    assert ours.peer_id.startswith("12D3KooW")
    assert public_key_from_peer_id(ours.peer_id) == ours.public_key


def test_random_peer_ids_match_py_libp2p() -> None:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    for _ in range(5):
        pair = create_new_key_pair()
        pk = pair.public_key.to_bytes()
        assert peer_id_from_public_key(pk) == ID.from_pubkey(pair.public_key).to_base58()


def test_rfc8032_vector() -> None:
    ident = Identity.from_seed(SEEDS[3])
    assert ident.public_key.hex() == "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"


@given(st.binary(max_size=40))
@settings(max_examples=200, deadline=None)
def test_base58_round_trip(data: bytes) -> None:
    assert b58decode(b58encode(data)) == data


def test_base58_known_values() -> None:
    assert b58encode(b"\x00\x00\x01") == "112"
    assert b58encode(b"hello world") == "StV1DL6CwTryKyV"
    with pytest.raises(InvalidMessage):
        b58decode("0OIl")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # sha256 multihash (RSA-style) id
        "16Uiu2HAmLhLvBoYaoZfaMUKuibM6ac163GwKY74c5kiSLg5KvLpY",  # secp256k1 id
        "12D3KooW",
        "not base58!",
        "1" + Identity.from_seed(bytes(32)).peer_id,  # leading zero byte: another encoding
    ],
)
def test_public_key_from_bad_peer_ids(bad: str) -> None:
    with pytest.raises(InvalidMessage):
        public_key_from_peer_id(bad)


def test_sign_and_verify_with_purposes() -> None:
    ident = Identity.from_seed(bytes(range(32)))
    sig = ident.sign(PURPOSE_RECEIPT, b"payload")
    verify(ident.public_key, PURPOSE_RECEIPT, b"payload", sig)
    for other in (PURPOSE_CAPACITY_RECORD, PURPOSE_RECEIPT_COUNTERSIGN, PURPOSE_STATEMENT):
        with pytest.raises(InvalidSignature):
            verify(ident.public_key, other, b"payload", sig)
    with pytest.raises(InvalidSignature):
        verify(ident.public_key, PURPOSE_RECEIPT, b"payloaD", sig)
    with pytest.raises(InvalidSignature):
        verify(Identity.generate().public_key, PURPOSE_RECEIPT, b"payload", sig)
    with pytest.raises(InvalidSignature):
        verify(ident.public_key, PURPOSE_RECEIPT, b"payload", sig[:-1])
    with pytest.raises(ValueError):
        ident.sign(b"no-nul", b"x")


def test_purposes_are_prefix_free() -> None:
    purposes = [PURPOSE_CAPACITY_RECORD, PURPOSE_RECEIPT, PURPOSE_RECEIPT_COUNTERSIGN, PURPOSE_STATEMENT]
    assert len(set(purposes)) == 4
    for a in purposes:
        assert a.endswith(b"\x00") and a.count(b"\x00") == 1
        for b in purposes:
            assert a == b or not b.startswith(a)


def test_seed_validation() -> None:
    with pytest.raises(ValueError):
        Identity.from_seed(b"short")
    ident = Identity.from_seed(bytes(range(32)))
    assert ident.seed == bytes(range(32))
    assert ident.peer_id in repr(ident) and ident.seed.hex() not in repr(ident)


def test_load_or_create_0600_and_reload(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    first = Identity.load_or_create(data_dir)
    key = data_dir / "identity.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_bytes() == first.seed
    assert Identity.load_or_create(str(data_dir)).peer_id == first.peer_id
    assert [p.name for p in data_dir.iterdir()] == ["identity.key"]  # no temp file left


def test_load_rejects_open_permissions(tmp_path: Path) -> None:
    Identity.load_or_create(tmp_path)
    os.chmod(tmp_path / "identity.key", 0o644)
    with pytest.raises(IdentityFileError, match="chmod 600"):
        Identity.load_or_create(tmp_path)


def test_load_rejects_wrong_size(tmp_path: Path) -> None:
    key = tmp_path / "identity.key"
    fd = os.open(key, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, bytes(64))
    os.close(fd)
    with pytest.raises(IdentityFileError, match="32"):
        Identity.load_or_create(tmp_path)


def test_load_rejects_symlink_and_directory(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(bytes(32))
    os.chmod(target, 0o600)
    (tmp_path / "a").mkdir()
    os.symlink(target, tmp_path / "a" / "identity.key")
    with pytest.raises(IdentityFileError):
        Identity.load_or_create(tmp_path / "a")
    (tmp_path / "b" / "identity.key").mkdir(parents=True)
    with pytest.raises(IdentityFileError):
        Identity.load_or_create(tmp_path / "b")


def test_a_stale_temporary_file_does_not_block_creation(tmp_path: Path) -> None:
    """A crash between creating the temporary key and linking it leaves the temp behind; a later
    start with the same pid (pid 1 in every container) must still create its key."""
    for name in (f".identity.key.{os.getpid()}.tmp", ".identity.key.1.tmp"):
        (tmp_path / name).write_bytes(b"partial")
    ident = Identity.load_or_create(tmp_path)
    assert (tmp_path / "identity.key").read_bytes() == ident.seed
    assert stat.S_IMODE((tmp_path / "identity.key").stat().st_mode) == 0o600
    assert Identity.load_or_create(tmp_path).peer_id == ident.peer_id
    assert (tmp_path / f".identity.key.{os.getpid()}.tmp").read_bytes() == b"partial"  # not ours: left alone

