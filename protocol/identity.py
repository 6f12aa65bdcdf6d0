"""Ed25519 identities, libp2p-compatible peer ids and domain-separated signatures.

One key per node or agent: the same key is the libp2p identity and signs records and
receipts. Every signature covers ``purpose + message`` where purpose is one of the
``PURPOSE_*`` prefixes of ``protocol.ids``, so a signature cannot be replayed for another use.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import nacl.exceptions
import nacl.bindings
import nacl.signing

from .errors import InvalidMessage, InvalidSignature

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
IDENTITY_FILE = "identity.key"

# libp2p PublicKey protobuf {Type: Ed25519 (1), Data: 32 bytes}, inside an identity multihash.
_PROTOBUF_PREFIX = b"\x08\x01\x12\x20"
_MULTIHASH_PREFIX = b"\x00" + bytes([len(_PROTOBUF_PREFIX) + PUBLIC_KEY_BYTES])
_PEER_ID_PREFIX = _MULTIHASH_PREFIX + _PROTOBUF_PREFIX
_PEER_ID_BYTES = len(_PEER_ID_PREFIX) + PUBLIC_KEY_BYTES  # 38

_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}


class IdentityFileError(ValueError):
    """The identity key file exists but cannot be trusted (size, permissions, file type)."""


def b58encode(data: bytes) -> str:
    """Base58btc (bitcoin alphabet); each leading zero byte becomes a leading '1'."""
    zeros = len(data) - len(data.lstrip(b"\x00"))
    n = int.from_bytes(data, "big")
    out = []
    while n:
        n, rem = divmod(n, 58)
        out.append(_B58_ALPHABET[rem])
    return "1" * zeros + "".join(reversed(out))


def b58decode(text: str) -> bytes:
    """Inverse of b58encode; InvalidMessage on a character outside the alphabet."""
    n = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise InvalidMessage(f"not base58btc: character {char!r}")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\x00" * zeros + body


def peer_id_bytes_from_public_key(public_key: bytes) -> bytes:
    """The binary peer id (identity multihash of the protobuf-encoded key), 38 bytes."""
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidMessage("an Ed25519 public key is 32 bytes")
    return _PEER_ID_PREFIX + public_key


def peer_id_from_public_key(public_key: bytes) -> str:
    """The libp2p peer id of an Ed25519 public key, base58btc ("12D3KooW...")."""
    return b58encode(peer_id_bytes_from_public_key(public_key))


def public_key_from_peer_id(peer_id: str) -> bytes:
    """The Ed25519 public key inlined in a peer id.

    Raises InvalidMessage for text that is not a base58btc identity-multihash Ed25519 peer id
    (sha256-hashed ids of RSA keys, secp256k1 and ECDSA keys, CIDs are not accepted).
    """
    if type(peer_id) is not str or not 0 < len(peer_id) <= 64:
        raise InvalidMessage("peer id must be a base58btc string of at most 64 characters")
    raw = b58decode(peer_id)
    if len(raw) != _PEER_ID_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise InvalidMessage(f"{peer_id!r} is not an Ed25519 peer id with an inlined key")
    if b58encode(raw) != peer_id:  # one text per key: no alternative encodings
        raise InvalidMessage(f"{peer_id!r} is not in canonical base58btc form")
    return raw[len(_PEER_ID_PREFIX) :]


def _check_purpose(purpose: bytes) -> None:
    if type(purpose) is not bytes or not purpose.endswith(b"\x00") or purpose.count(b"\x00") != 1:
        raise ValueError("purpose must be bytes ending in a single NUL (see protocol.ids.PURPOSE_*)")


def verify(public_key: bytes, purpose: bytes, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature over ``purpose + message``; InvalidSignature if it fails."""
    _check_purpose(purpose)
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise InvalidSignature("a signature is 64 bytes")
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_BYTES:
        raise InvalidSignature("an Ed25519 public key is 32 bytes")
    try:
        # crypto_sign_open itself (what VerifyKey.verify calls): without building a key object
        # per call it takes about 60% of the time, which matters once per pushed step (9.6).
        nacl.bindings.crypto_sign_open(signature + purpose + bytes(message), public_key)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError, ValueError, TypeError):
        raise InvalidSignature("signature does not verify") from None


class Identity:
    """An Ed25519 key pair from a 32-byte seed. Holds secret material: never log it."""

    __slots__ = ("_key", "_public_key", "_peer_id")

    def __init__(self, signing_key: nacl.signing.SigningKey) -> None:
        self._key = signing_key
        self._public_key = bytes(signing_key.verify_key)
        self._peer_id = peer_id_from_public_key(self._public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(nacl.signing.SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        if type(seed) is not bytes or len(seed) != SEED_BYTES:
            raise ValueError("an Ed25519 seed is 32 bytes")
        return cls(nacl.signing.SigningKey(seed))

    @classmethod
    def load_or_create(cls, data_dir: str | Path) -> Identity:
        """Load ``data_dir/identity.key`` (32 raw seed bytes), creating it if absent.

        A new file is written to a uniquely named temporary file opened with mode 0600, fsynced
        and linked into place (a temporary file left by a crash is ignored), so a crash never leaves a partial key and a concurrent creator never
        overwrites another's key. An existing file that is not a regular file, not 32 bytes,
        or readable or writable by group or others raises IdentityFileError.
        """
        directory = Path(data_dir)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = directory / IDENTITY_FILE
        if not os.path.lexists(path):
            _create_key_file(path, nacl.signing.SigningKey.generate().encode())
        return cls.from_seed(_read_key_file(path))

    @property
    def seed(self) -> bytes:
        return self._key.encode()

    @property
    def public_key(self) -> bytes:
        return self._public_key

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def peer_id_bytes(self) -> bytes:
        return peer_id_bytes_from_public_key(self._public_key)

    def sign(self, purpose: bytes, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``purpose + message``."""
        _check_purpose(purpose)
        return self._key.sign(purpose + bytes(message)).signature

    def __repr__(self) -> str:
        return f"Identity(peer_id={self._peer_id!r})"


def _read_key_file(path: Path) -> bytes:
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise IdentityFileError(f"cannot open identity key {path}: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise IdentityFileError(f"identity key {path} is not a regular file")
        if os.name == "posix" and info.st_mode & 0o077:
            raise IdentityFileError(
                f"identity key {path} has mode {stat.S_IMODE(info.st_mode):04o}; it must not be "
                f"accessible by group or others (run: chmod 600 {path})"
            )
        if info.st_size != SEED_BYTES:
            raise IdentityFileError(
                f"identity key {path} is {info.st_size} bytes; it must hold exactly {SEED_BYTES} raw seed bytes"
            )
        data = os.read(fd, SEED_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != SEED_BYTES:
        raise IdentityFileError(f"identity key {path} changed while being read")
    return data


def _create_key_file(path: Path, seed: bytes) -> None:
    # A unique temporary name: a leftover from a crash (the same pid comes back after a restart,
    # pid 1 in every container) never blocks creating the key. mkstemp opens it O_EXCL, 0600.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        try:
            os.fchmod(fd, 0o600)  # in case of an unusual umask or ACL default
            os.write(fd, seed)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # fails if another process created the key first: keep theirs
        except FileExistsError:
            pass
        except OSError:  # filesystems without hard links
            os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
