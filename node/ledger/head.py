"""The ledger's signed head and the head file beside the database (node/ledger/store.py).

The owner signs (count, hash of the last entry) with its identity key:

    sig = Ed25519-sign(owner key, "shiza/ledger-head/v1\\x00" || int64_be(count) || hash)

The signature is kept in the database's head row and, after each commit, in ``<ledger>.head``:
``b"SHZLHD01" || int64_be(count) || hash (32) || sig (64)``, written whole (temporary file,
fsync, rename). The head file is what shows a database copied or restored without its ``-wal``:
entries still in the WAL are missing from such a copy, which is otherwise a consistent, shorter
chain.
"""

from __future__ import annotations

import struct
from pathlib import Path

from protocol.errors import ShizaError
from protocol.identity import Identity, public_key_from_peer_id, verify

from node.ledger.errors import LedgerCorrupt, LedgerError
from node.util.atomic import write_atomic

__all__ = [
    "GENESIS_HASH",
    "Owner",
    "check_head_file",
    "head_file_of",
    "head_signed_by",
    "owner_key",
    "read_head_file",
    "sign_head",
    "write_head_file",
]

GENESIS_HASH = bytes(32)  # the "previous hash" of the first entry, and the head of none

Owner = Identity | bytes | str  # the owner's Identity, or its 32-byte public key or peer id

# Local to the ledger, never on the wire; no other purpose is a prefix of it.
_HEAD_PURPOSE = b"shiza/ledger-head/v1\x00"
_MAGIC = b"SHZLHD01"
_FILE_BYTES = len(_MAGIC) + 8 + 32 + 64


def head_file_of(path: str | Path) -> Path:
    """The head file kept beside the ledger database at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".head")


def owner_key(owner: Owner) -> tuple[Identity | None, bytes]:
    """(identity or None, public key) of a ledger owner given as Identity, key or peer id."""
    if isinstance(owner, Identity):
        return owner, owner.public_key
    if isinstance(owner, bytes) and len(owner) == 32:
        return None, owner
    if isinstance(owner, str):
        try:
            return None, public_key_from_peer_id(owner)
        except ShizaError as e:
            raise ValueError(f"ledger owner {owner!r:.80} is not a peer id: {e}") from None
    raise TypeError(f"a ledger owner is an Identity, a 32-byte public key or a peer id, "
                    f"not {type(owner).__name__}")


def _message(count: int, head_hash: bytes) -> bytes:
    return struct.pack(">q", count) + head_hash


def sign_head(identity: Identity, count: int, head_hash: bytes) -> bytes:
    return identity.sign(_HEAD_PURPOSE, _message(count, head_hash))


def head_signed_by(public_key: bytes, count: int, head_hash: bytes, sig: bytes) -> bool:
    try:
        verify(public_key, _HEAD_PURPOSE, _message(count, head_hash), sig)
    except ShizaError:
        return False
    return True


def write_head_file(path: Path, count: int, head_hash: bytes, sig: bytes) -> None:
    """Replace the head file of the ledger at ``path`` whole (OSError if it cannot)."""
    write_atomic(head_file_of(path), _MAGIC + _message(count, head_hash) + sig)


def read_head_file(path: Path, public_key: bytes) -> tuple[int, bytes] | None:
    """(count, head hash) the head file of the ledger at ``path`` records, checked against the
    owner's key; None if there is no head file."""
    where = head_file_of(path)
    try:
        data = where.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise LedgerError(f"cannot read {where}: {e}") from e
    if len(data) != _FILE_BYTES or not data.startswith(_MAGIC):
        raise LedgerCorrupt(f"{where}: not a ledger head file")
    body = data[len(_MAGIC):]
    (count,), head_hash, sig = struct.unpack(">q", body[:8]), body[8:40], body[40:]
    if count < 0 or not head_signed_by(public_key, count, head_hash, sig):
        raise LedgerCorrupt(f"{where}: the head file is not signed by the ledger's owner")
    return count, head_hash


def check_head_file(where: Path, recorded: tuple[int, bytes] | None, count: int,
                    at_recorded: bytes | None) -> None:
    """Compare what the head file records with the database's chain of ``count`` entries;
    ``at_recorded`` is the database's entry hash at the recorded count (None if beyond it)."""
    name = head_file_of(where).name
    if recorded is None:  # written with the schema: a ledger never lacks it
        raise LedgerCorrupt(
            f"{where}: its head file {name} is missing, so committed entries may be missing "
            "too (copied without its -wal and .head files?)")
    rec_count, rec_hash = recorded
    if rec_count > count:
        raise LedgerCorrupt(
            f"{where}: committed entries {count + 1}..{rec_count} are missing: the head file "
            f"records {rec_count} entries, the database holds {count} (copied or restored "
            "without its -wal file?)")
    expected = GENESIS_HASH if rec_count == 0 else at_recorded
    if expected != rec_hash:
        raise LedgerCorrupt(
            f"{where}: entry {rec_count} does not match the head file {name} (a -wal or head "
            "file of another copy of this ledger?)")
