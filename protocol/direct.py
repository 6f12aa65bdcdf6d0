"""The direct activation channel: session frames over plain TCP, sealed with ChaCha20-Poly1305.

SPEC.md 9.5. A client and a node that already share an inference session on a libp2p stream
(Noise: both peers authenticated by their Ed25519 keys) exchange one ephemeral X25519 public
key each inside that stream (``OpenSession.direct_key``, ``SessionOpened.direct_key``). Both
derive two session keys with libsodium's ``crypto_kx`` (one per direction); only the two
authenticated peers can, since the public keys travelled encrypted and each side keeps its
secret key. The session's later frames then go over a TCP connection, each sealed with
ChaCha20-Poly1305 (IETF) under a per-direction counter nonce, so a frame that is forged,
altered, replayed, dropped or reordered fails to open and the connection is closed.

This module is the wire contract alone (no sockets): key pairs, key derivation, the hello that
proves both sides hold the keys, and sealing and opening frames.
"""

from __future__ import annotations

import struct
from typing import Final

from nacl import bindings as _sodium
from nacl.exceptions import CryptoError

from .ids import MAX_FRAME_BYTES

KEY_BYTES: Final = 32
TAG_BYTES: Final = 16
NONCE_BYTES: Final = 12
#: Associated data of every sealed frame: a key of this channel never opens anything else.
AAD: Final = b"shiza-direct/1"
#: Plaintext of the first frame in each direction: the client's hello and the node's answer.
HELLO: Final = b"shiza-direct/1 hello"
ACCEPT: Final = b"shiza-direct/1 accept"
#: A sealed frame is at most a message frame plus the tag.
MAX_SEALED_BYTES: Final = MAX_FRAME_BYTES + TAG_BYTES
#: The client's first bytes: 4-byte length, its public key, then its sealed HELLO.
HELLO_BYTES: Final = KEY_BYTES + len(HELLO) + TAG_BYTES
_LEN = struct.Struct(">I")
_NONCE = struct.Struct("<Q4x")  # 64-bit little-endian counter, then four zero bytes


class ChannelBroken(ValueError):
    """A sealed frame did not open: wrong key, altered bytes, replayed or reordered frame,
    or a counter past its end. The channel must be closed."""


def keypair() -> tuple[bytes, bytes]:
    """A fresh ephemeral X25519 key pair ``(public, secret)``, for one session only."""
    return _sodium.crypto_kx_keypair()


def check_public_key(key: bytes) -> bytes:
    if not isinstance(key, bytes) or len(key) != KEY_BYTES:
        raise ChannelBroken(f"a direct-channel public key is {KEY_BYTES} bytes")
    return key


def client_keys(client_pk: bytes, client_sk: bytes, node_pk: bytes) -> tuple[bytes, bytes]:
    """``(receive, send)`` keys of the client side."""
    try:
        return _sodium.crypto_kx_client_session_keys(client_pk, client_sk, check_public_key(node_pk))
    except CryptoError as exc:  # a degenerate public key
        raise ChannelBroken(f"key exchange failed: {exc}") from None


def node_keys(node_pk: bytes, node_sk: bytes, client_pk: bytes) -> tuple[bytes, bytes]:
    """``(receive, send)`` keys of the node side (its receive key is the client's send key)."""
    try:
        return _sodium.crypto_kx_server_session_keys(node_pk, node_sk, check_public_key(client_pk))
    except CryptoError as exc:
        raise ChannelBroken(f"key exchange failed: {exc}") from None


class Sealer:
    """Seals the frames one side sends: nonce ``n`` for the n-th frame, from 0."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._n = 0

    def seal(self, payload: bytes | memoryview) -> bytes:
        """The sealed frame with its 4-byte big-endian length prefix, ready to send."""
        if self._n >= 2**64:
            raise ChannelBroken("nonce counter exhausted")
        body = _sodium.crypto_aead_chacha20poly1305_ietf_encrypt(
            bytes(payload), AAD, _NONCE.pack(self._n), self._key)
        self._n += 1
        return _LEN.pack(len(body)) + body


class Opener:
    """Opens the frames one side receives, in order; any failure is final."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._n = 0

    def open(self, body: bytes) -> bytes:
        """The payload of the next sealed frame (without its length prefix)."""
        if len(body) < TAG_BYTES or self._n >= 2**64:
            raise ChannelBroken("sealed frame too short")
        try:
            payload = _sodium.crypto_aead_chacha20poly1305_ietf_decrypt(
                body, AAD, _NONCE.pack(self._n), self._key)
        except CryptoError:
            raise ChannelBroken(f"frame {self._n} failed authentication") from None
        self._n += 1
        return payload


def frame_length(header: bytes) -> int:
    """The length a 4-byte header announces; ChannelBroken past MAX_SEALED_BYTES."""
    (n,) = _LEN.unpack(header)
    if n > MAX_SEALED_BYTES:
        raise ChannelBroken(f"sealed frame of {n} bytes exceeds {MAX_SEALED_BYTES}")
    return n


def client_hello(client_pk: bytes, sealer: Sealer) -> bytes:
    """The client's first frame: its public key (to find the session) and a sealed HELLO
    (proof that it holds the matching secret key)."""
    sealed = sealer.seal(HELLO)
    return _LEN.pack(KEY_BYTES + len(sealed) - 4) + client_pk + sealed[4:]


def split_hello(body: bytes) -> tuple[bytes, bytes]:
    """``(client public key, sealed HELLO)`` of a hello frame's body."""
    if len(body) != HELLO_BYTES:
        raise ChannelBroken(f"hello must be {HELLO_BYTES} bytes, got {len(body)}")
    return body[:KEY_BYTES], body[KEY_BYTES:]


def check_plain(got: bytes, want: bytes) -> None:
    if got != want:
        raise ChannelBroken("unexpected handshake frame")
