"""Receipts: what a serving node signs for the work of one inference session (SPEC.md, 16).

A receipt is cumulative: checkpoint k of a session counts every token since the session began,
and a later checkpoint of the same (server, client, session_id) supersedes the earlier ones.

    signed by the server:  PURPOSE_RECEIPT             + canonical(body)
    countersigned:         PURPOSE_RECEIPT_COUNTERSIGN + canonical(body) + server_sig

where body is the receipt map without the two signatures. A receipt on the wire or in a ledger
is the canonical map with both ("client_sig" empty until the client countersigns); any other
encoding of the same values is rejected, so one receipt has exactly one byte form.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ._fields import check_bool, check_bytes, check_float, check_hex, check_int, check_str, set_field
from ._signed import check_signature_slot, parse_canonical, versioned_fields
from .codec import canonical_pack
from .errors import (
    DuplicateReceipt,
    InvalidSignature,
    KeyMismatch,
    ReceiptMismatch,
)
from .identity import SIGNATURE_BYTES, Identity, public_key_from_peer_id, verify
from .ids import (
    IO_DIGEST_BYTES,
    MAX_ID_LEN,
    MAX_LAYERS,
    MAX_RECEIPT_BYTES,
    MAX_UINT64,
    PROTOCOL_VERSION,
    PURPOSE_IO_DIGEST,
    PURPOSE_RECEIPT,
    PURPOSE_RECEIPT_COUNTERSIGN,
    PURPOSE_RECEIPT_ID,
    RECEIPT_ID_LEN,
)
from .messages import Step

_BODY_FIELDS = (
    "receipt_id",
    "swarm_id",
    "model_id",
    "start",
    "end",
    "server",
    "client",
    "session_id",
    "seq",
    "checkpoint",
    "final",
    "prefill_tokens",
    "decode_tokens",
    "work_units",
    "started_at",
    "ended_at",
    "unit_price",
    "io_digest",
)


@functools.lru_cache(maxsize=4096)
def _public_key(peer_id: str) -> bytes:
    """The key inlined in a peer id; cached because a ledger names few peers many times."""
    return public_key_from_peer_id(peer_id)


def receipt_id_for(swarm_id: str, server: str, client: str, seq: int) -> str:
    """The id of receipt ``seq`` of ``server`` to ``client``: 32 lowercase hex characters."""
    packed = canonical_pack([swarm_id, server, client, seq])
    return hashlib.sha256(PURPOSE_RECEIPT_ID + packed).hexdigest()[:RECEIPT_ID_LEN]


@dataclass(frozen=True)
class Receipt:
    """Work of layers [start, end) of ``model_id`` done by ``server`` for ``client`` in one
    session, cumulative up to ``checkpoint``. Times are Unix seconds of the server's clock;
    ``unit_price`` is what the server asks per work unit (nil: no price stated)."""

    receipt_id: str
    swarm_id: str
    model_id: str
    start: int
    end: int
    server: str
    client: str
    session_id: str
    seq: int  # per (server, client), strictly increasing, one per receipt
    checkpoint: int  # 0, 1, 2, ... within the session
    final: bool  # the session ended
    prefill_tokens: int
    decode_tokens: int
    work_units: int  # (prefill_tokens + decode_tokens) * (end - start)
    started_at: float
    ended_at: float
    unit_price: float | None
    io_digest: bytes  # IoDigest of the session's steps so far
    server_sig: bytes = b""
    client_sig: bytes = b""

    def __post_init__(self) -> None:
        check_hex("receipt_id", self.receipt_id, RECEIPT_ID_LEN)
        for name in ("swarm_id", "model_id", "server", "client", "session_id"):
            check_str(name, getattr(self, name), MAX_ID_LEN, nonempty=True)
        check_int("start", self.start, 0, MAX_LAYERS)
        check_int("end", self.end, 0, MAX_LAYERS)
        for name in ("seq", "checkpoint", "prefill_tokens", "decode_tokens", "work_units"):
            check_int(name, getattr(self, name), 0, MAX_UINT64)
        check_bool("final", self.final)
        set_field(self, "started_at", check_float("started_at", self.started_at, 0.0))
        set_field(self, "ended_at", check_float("ended_at", self.ended_at, 0.0))
        if self.unit_price is not None:
            set_field(self, "unit_price", check_float("unit_price", self.unit_price, 0.0))
        check_bytes("io_digest", self.io_digest, IO_DIGEST_BYTES, exact=True)
        for name in ("server_sig", "client_sig"):
            check_signature_slot(name, getattr(self, name))

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens

    @property
    def is_countersigned(self) -> bool:
        return len(self.client_sig) == SIGNATURE_BYTES

    def body_wire(self) -> dict[str, Any]:
        """The map both signatures cover: every field but the signatures, with "v"."""
        return {"v": PROTOCOL_VERSION, **{name: getattr(self, name) for name in _BODY_FIELDS}}

    def signed_bytes(self) -> bytes:
        """Exactly the bytes the server signature covers (purpose prefix included)."""
        return PURPOSE_RECEIPT + canonical_pack(self.body_wire())

    def countersigned_bytes(self) -> bytes:
        """Exactly the bytes the client signature covers: it commits to the server's too."""
        return PURPOSE_RECEIPT_COUNTERSIGN + canonical_pack(self.body_wire()) + self.server_sig

    def to_wire(self) -> dict[str, Any]:
        return {**self.body_wire(), "server_sig": self.server_sig, "client_sig": self.client_sig}

    def to_bytes(self) -> bytes:
        """The canonical msgpack form sent in StepResult / Closed and kept in ledgers."""
        return canonical_pack(self.to_wire())

    @classmethod
    def from_wire(cls, obj: Any) -> Receipt:
        return cls(**versioned_fields(obj, "receipt", (*_BODY_FIELDS, "server_sig", "client_sig")))

    @classmethod
    def from_bytes(cls, data: bytes) -> Receipt:
        """Parse and validate the fields (not the signatures: see verify_receipt)."""
        return parse_canonical(cls, data, "receipt", MAX_RECEIPT_BYTES)

    def with_client_sig(self, sig: bytes) -> Receipt:
        """This receipt carrying ``sig`` as its countersignature (not verified here)."""
        return dataclasses.replace(self, client_sig=sig)


def sign_receipt(identity: Identity, receipt: Receipt) -> Receipt:
    """A copy of ``receipt`` signed by its server, without any countersignature."""
    if identity.peer_id != receipt.server:
        raise KeyMismatch(f"receipt names server {receipt.server}, identity is {identity.peer_id}")
    sig = identity.sign(PURPOSE_RECEIPT, canonical_pack(receipt.body_wire()))
    return dataclasses.replace(receipt, server_sig=sig, client_sig=b"")


def countersign_receipt(identity: Identity, receipt: Receipt) -> Receipt:
    """A copy of ``receipt`` countersigned by its client, after checking the server's
    signature. Check the counts first (check_receipt): this signs what it is given."""
    if identity.peer_id != receipt.client:
        raise KeyMismatch(f"receipt names client {receipt.client}, identity is {identity.peer_id}")
    verify_receipt(dataclasses.replace(receipt, client_sig=b""))
    body = canonical_pack(receipt.body_wire())
    sig = identity.sign(PURPOSE_RECEIPT_COUNTERSIGN, body + receipt.server_sig)
    return dataclasses.replace(receipt, client_sig=sig)


def verify_receipt(receipt: Receipt, *, require_countersigned: bool = False) -> Receipt:
    """Return the receipt if every check passes, in this order:

    1. receipt_id is receipt_id_for(swarm_id, server, client, seq) (ReceiptMismatch);
    2. 0 <= start < end, work_units = (prefill_tokens + decode_tokens) * (end - start),
       ended_at >= started_at (ReceiptMismatch);
    3. server and client are Ed25519 peer ids (InvalidMessage) and the server signature
       verifies with the server's key (InvalidSignature);
    4. the client signature, when present or when ``require_countersigned``, verifies with
       the client's key (InvalidSignature).
    """
    if not isinstance(receipt, Receipt):
        raise TypeError("verify_receipt takes a Receipt (parse bytes with Receipt.from_bytes)")
    expected = receipt_id_for(receipt.swarm_id, receipt.server, receipt.client, receipt.seq)
    if receipt.receipt_id != expected:
        raise ReceiptMismatch(f"receipt_id {receipt.receipt_id} is not derived from its swarm, peers and seq")
    if not receipt.start < receipt.end:
        raise ReceiptMismatch(f"span end ({receipt.end}) must be greater than start ({receipt.start})")
    units = receipt.tokens * (receipt.end - receipt.start)
    if receipt.work_units != units:
        raise ReceiptMismatch(f"work_units {receipt.work_units} != tokens x layers = {units}")
    if receipt.ended_at < receipt.started_at:
        raise ReceiptMismatch("receipt ended_at is earlier than started_at")
    if not receipt.server_sig:
        raise InvalidSignature(f"receipt {receipt.receipt_id} has no server signature")
    body = canonical_pack(receipt.body_wire())
    verify(_public_key(receipt.server), PURPOSE_RECEIPT, body, receipt.server_sig)
    if receipt.client_sig or require_countersigned:
        if not receipt.client_sig:
            raise InvalidSignature(f"receipt {receipt.receipt_id} is not countersigned")
        client_key = _public_key(receipt.client)
        verify(client_key, PURPOSE_RECEIPT_COUNTERSIGN, body + receipt.server_sig, receipt.client_sig)
    return receipt


def check_receipt(
    receipt: Receipt,
    *,
    server: str,
    client: str,
    model_id: str,
    start: int,
    end: int,
    session_id: str,
    prefill_tokens: int,
    decode_tokens: int,
    io_digest: bytes,
) -> None:
    """What a client runs before countersigning: the receipt verifies (verify_receipt) and says
    exactly what the client observed, else ReceiptMismatch naming the first field that differs
    ("decode_tokens 12 != observed 11"). The client also checks, with its own state, that seq
    grows per server and checkpoint per session (SPEC.md 16.4)."""
    verify_receipt(receipt)
    observed = (
        ("server", server),
        ("client", client),
        ("model_id", model_id),
        ("start", start),
        ("end", end),
        ("session_id", session_id),
        ("prefill_tokens", prefill_tokens),
        ("decode_tokens", decode_tokens),
    )
    for name, value in observed:
        got = getattr(receipt, name)
        if got != value:
            raise ReceiptMismatch(f"{name} {got!r:.100} != observed {value!r:.100}")
    if receipt.io_digest != io_digest:
        raise ReceiptMismatch(f"io_digest {receipt.io_digest.hex()} != observed {bytes(io_digest).hex()}")


class IoDigest:
    """Running hash of a session's steps, the same on both ends of the stream:

        h0 = sha256(PURPOSE_IO_DIGEST + utf8(session_id))
        h  = sha256(h + sha256(canonical(step)) + sha256(canonical(output)))

    where step is the Step message's wire map and output the StepResult's output tensor map.
    """

    __slots__ = ("_h", "_steps")

    def __init__(self, session_id: str) -> None:
        check_str("session_id", session_id, MAX_ID_LEN)
        self._h = hashlib.sha256(PURPOSE_IO_DIGEST + session_id.encode("utf-8")).digest()
        self._steps = 0

    def update(self, step_wire: dict[str, Any], output_wire: dict[str, Any]) -> None:
        step_hash = hashlib.sha256(canonical_pack(step_wire)).digest()
        output_hash = hashlib.sha256(canonical_pack(output_wire)).digest()
        self._h = hashlib.sha256(self._h + step_hash + output_hash).digest()
        self._steps += 1

    @property
    def digest(self) -> bytes:
        return self._h

    @property
    def steps(self) -> int:
        return self._steps

    def copy(self) -> IoDigest:
        other = IoDigest.__new__(IoDigest)
        other._h, other._steps = self._h, self._steps
        return other


def count_step_tokens(step: Step) -> tuple[int, int]:
    """(prefill, decode) tokens of one Step: the 1s of its mask (B x T without a mask), all
    decode for a window step (its positions are the next token and drafts, each verified: work
    done whether or not the client accepts it, SPEC 9.7), else all prefill when it is step 0 or
    carries more than one position per row, else all decode."""
    batch, length = step.input.shape[0], step.input.shape[1]
    if step.mask is None:
        tokens = batch * length
    else:
        values = array("q", bytes(step.mask.data))
        if sys.byteorder != "little":
            values.byteswap()
        tokens = values.count(1)
    if step.step == 0 or (length > 1 and step.draft is None):
        return tokens, 0
    return 0, tokens


def latest_per_session(receipts: Iterable[Receipt]) -> list[Receipt]:
    """For each (server, client, session_id), the receipt with the highest checkpoint, sorted
    by (server, client, seq). Two receipts of one session at one checkpoint: DuplicateReceipt."""
    best: dict[tuple[str, str, str], Receipt] = {}
    seen: dict[tuple[str, str, str, int], str] = {}
    for count, receipt in enumerate(receipts):
        key = (receipt.server, receipt.client, receipt.session_id)
        other = seen.setdefault((*key, receipt.checkpoint), receipt.receipt_id)
        if len(seen) == count:
            raise DuplicateReceipt(
                f"receipts {other} and {receipt.receipt_id} are both checkpoint "
                f"{receipt.checkpoint} of session {receipt.session_id!r:.100}"
            )
        held = best.get(key)
        if held is None or receipt.checkpoint > held.checkpoint:
            best[key] = receipt
    return sorted(best.values(), key=lambda r: (r.server, r.client, r.seq))
