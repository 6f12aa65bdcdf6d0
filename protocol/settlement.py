"""Settlement statements: what two peers owe each other, over a Merkle root of receipts
(SPEC.md, 16.6-16.8).

    leaf = sha256(0x00 || receipt bytes)          node = sha256(0x01 || left || right)

is the tree of RFC 6962 (2.1): the root of n > 1 leaves hashes the root of the first k leaves,
k the largest power of two below n, with the root of the rest; the empty tree is sha256("").

    signed by the issuer:        PURPOSE_STATEMENT             + canonical(body)
    countersigned:               PURPOSE_STATEMENT_COUNTERSIGN + canonical(body) + issuer_sig
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._fields import check_bytes, check_float, check_int, check_str, set_field
from ._signed import check_signature_slot, parse_canonical, versioned_fields
from .codec import canonical_pack
from .errors import (
    BadProof,
    DuplicateReceipt,
    InvalidMessage,
    InvalidSignature,
    KeyMismatch,
    ShizaError,
)
from .identity import SIGNATURE_BYTES, Identity, public_key_from_peer_id, verify
from .ids import (
    DEFAULT_SWARM_ID,
    MAX_ID_LEN,
    MAX_STATEMENT_BYTES,
    MAX_UINT64,
    PROTOCOL_VERSION,
    PURPOSE_STATEMENT,
    PURPOSE_STATEMENT_COUNTERSIGN,
)
from .receipts import Receipt, latest_per_session, verify_receipt

HASH_BYTES = 32
_EMPTY_ROOT = hashlib.sha256(b"").digest()

# Merkle tree ------------------------------------------------------------------------------


def receipt_leaf(receipt: Receipt) -> bytes:
    return hashlib.sha256(b"\x00" + receipt.to_bytes()).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _levels(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """Every level of the tree, leaves first. Pairing neighbours and carrying an odd last
    node up unchanged builds exactly the RFC 6962 tree."""
    levels = [list(leaves)]
    while len(levels[-1]) > 1:
        below = levels[-1]
        above = [_node(below[i], below[i + 1]) for i in range(0, len(below) - 1, 2)]
        if len(below) % 2:
            above.append(below[-1])
        levels.append(above)
    return levels


def merkle_root(leaves: Sequence[bytes]) -> bytes:
    """The RFC 6962 tree head of ``leaves`` (leaf hashes); sha256("") for none."""
    if not leaves:
        return _EMPTY_ROOT
    return _levels(leaves)[-1][0]


def _path(levels: list[list[bytes]], index: int) -> list[bytes]:
    proof = []
    for level in levels[:-1]:
        sibling = index ^ 1
        if sibling < len(level):  # the last node of an odd level has no sibling: carried up
            proof.append(level[sibling])
        index //= 2
    return proof


def merkle_proof(leaves: Sequence[bytes], index: int) -> list[bytes]:
    """The RFC 6962 audit path of leaf ``index``, from the leaf's sibling up to the root."""
    if not 0 <= index < len(leaves):
        raise IndexError(f"leaf index {index} outside a tree of {len(leaves)} leaves")
    return _path(_levels(leaves), index)


def merkle_proofs(leaves: Sequence[bytes]) -> list[list[bytes]]:
    """The audit path of every leaf, sharing one tree (n log n hashes in all)."""
    levels = _levels(leaves)
    return [_path(levels, index) for index in range(len(leaves))]


def verify_proof(leaf: bytes, index: int, n: int, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf`` is leaf ``index`` of the tree of ``n`` leaves with head ``root``
    (RFC 9162, 2.1.3.2); BadProof if not."""
    if not 0 <= index < n:
        raise BadProof(f"leaf index {index} outside a tree of {n} leaves")
    fn, sn, r = index, n - 1, leaf
    for p in proof:
        if sn == 0 or len(p) != HASH_BYTES:
            raise BadProof("Merkle proof is too long or holds a value that is not a hash")
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0 or r != root:
        raise BadProof(f"Merkle proof of leaf {index} of {n} does not lead to the root")


# Statements -------------------------------------------------------------------------------

_TOTALS = ("count", "prefill_tokens", "decode_tokens", "work_units")
_BODY_FIELDS = ("swarm_id", "issuer", "counterparty", "period_start", "period_end", *_TOTALS, "merkle_root")


@dataclass(frozen=True)
class Statement:
    """The receipts ``issuer`` and ``counterparty`` settle for a period: the latest
    countersigned checkpoint of each of their sessions (either may be the server) that ended
    in [``period_start``, ``period_end``), counted, summed and committed to by ``merkle_root``."""

    swarm_id: str
    issuer: str
    counterparty: str
    period_start: float
    period_end: float
    count: int
    prefill_tokens: int
    decode_tokens: int
    work_units: int
    merkle_root: bytes
    issuer_sig: bytes = b""
    counterparty_sig: bytes = b""

    def __post_init__(self) -> None:
        for name in ("swarm_id", "issuer", "counterparty"):
            check_str(name, getattr(self, name), MAX_ID_LEN, nonempty=True)
        set_field(self, "period_start", check_float("period_start", self.period_start, 0.0))
        set_field(self, "period_end", check_float("period_end", self.period_end, self.period_start))
        for name in _TOTALS:
            check_int(name, getattr(self, name), 0, MAX_UINT64)
        check_bytes("merkle_root", self.merkle_root, HASH_BYTES, exact=True)
        for name in ("issuer_sig", "counterparty_sig"):
            check_signature_slot(name, getattr(self, name))

    @property
    def is_countersigned(self) -> bool:
        return len(self.counterparty_sig) == SIGNATURE_BYTES

    def body_wire(self) -> dict[str, Any]:
        return {"v": PROTOCOL_VERSION, **{name: getattr(self, name) for name in _BODY_FIELDS}}

    def signed_bytes(self) -> bytes:
        return PURPOSE_STATEMENT + canonical_pack(self.body_wire())

    def countersigned_bytes(self) -> bytes:
        return PURPOSE_STATEMENT_COUNTERSIGN + canonical_pack(self.body_wire()) + self.issuer_sig

    def to_wire(self) -> dict[str, Any]:
        return {**self.body_wire(), "issuer_sig": self.issuer_sig, "counterparty_sig": self.counterparty_sig}

    def to_bytes(self) -> bytes:
        return canonical_pack(self.to_wire())

    @classmethod
    def from_wire(cls, obj: Any) -> Statement:
        return cls(**versioned_fields(obj, "statement", (*_BODY_FIELDS, "issuer_sig", "counterparty_sig")))

    @classmethod
    def from_bytes(cls, data: bytes) -> Statement:
        """Parse and validate the fields (not the signatures: see verify_statement)."""
        return parse_canonical(cls, data, "statement", MAX_STATEMENT_BYTES)


def check_unique(receipts: Iterable[Receipt]) -> None:
    """DuplicateReceipt if a receipt id, or a (server, client, seq), occurs twice."""
    ids: set[str] = set()
    seqs: set[tuple[str, str, int]] = set()
    for receipt in receipts:
        triple = (receipt.server, receipt.client, receipt.seq)
        if receipt.receipt_id in ids:
            raise DuplicateReceipt(f"receipt {receipt.receipt_id} occurs twice")
        if triple in seqs:
            raise DuplicateReceipt(f"receipt {receipt.receipt_id}: seq {receipt.seq} of this server and client is used twice")
        ids.add(receipt.receipt_id)
        seqs.add(triple)


def settleable(
    receipts: Iterable[Receipt],
    *,
    party_a: str,
    party_b: str,
    until: float | None,
    since: float | None = None,
) -> list[Receipt]:
    """The receipts a statement between ``party_a`` and ``party_b`` covers, in tree order
    (server, client, seq): those between the two (either the server), countersigned, reduced
    to the latest countersigned checkpoint of each session, which ended in [``since``,
    ``until``) (None: unbounded on that side).

    The latest checkpoint is chosen before the window applies, so a session still running at
    ``until`` is settled later, once, rather than partly in two periods; and because the window
    is half-open, statements for consecutive periods [a, b), [b, c) never count one receipt
    twice."""
    receipts = list(receipts)
    check_unique(receipts)
    pair = {party_a, party_b}
    between = [r for r in receipts if r.is_countersigned and {r.server, r.client} == pair and r.server != r.client]
    return [r for r in latest_per_session(between) if _in_period(r, since, until)]


def _in_period(receipt: Receipt, since: float | None, until: float | None) -> bool:
    return (since is None or receipt.ended_at >= since) and (until is None or receipt.ended_at < until)


def _totals(receipts: Sequence[Receipt]) -> dict[str, Any]:
    return {
        "count": len(receipts),
        "prefill_tokens": sum(r.prefill_tokens for r in receipts),
        "decode_tokens": sum(r.decode_tokens for r in receipts),
        "work_units": sum(r.work_units for r in receipts),
        "merkle_root": merkle_root([receipt_leaf(r) for r in receipts]),
    }


def build_statement(
    identity: Identity,
    counterparty: str,
    receipts: Iterable[Receipt],
    *,
    period_start: float,
    period_end: float,
    swarm_id: str = DEFAULT_SWARM_ID,
) -> Statement:
    """The statement ``identity`` issues to ``counterparty`` over the settleable receipts of
    ``swarm_id`` that ended in [``period_start``, ``period_end``), signed by ``identity``."""
    chosen = settleable(
        [r for r in receipts if r.swarm_id == swarm_id],
        party_a=identity.peer_id,
        party_b=counterparty,
        since=period_start,
        until=period_end,
    )
    statement = Statement(
        swarm_id=swarm_id,
        issuer=identity.peer_id,
        counterparty=counterparty,
        period_start=period_start,
        period_end=period_end,
        **_totals(chosen),
    )
    sig = identity.sign(PURPOSE_STATEMENT, canonical_pack(statement.body_wire()))
    return dataclasses.replace(statement, issuer_sig=sig)


def _verify_issuer(statement: Statement) -> bytes:
    if statement.issuer == statement.counterparty:
        raise InvalidMessage("a statement needs two different parties")
    if not statement.issuer_sig:
        raise InvalidSignature("statement is not signed by its issuer")
    body = canonical_pack(statement.body_wire())
    verify(public_key_from_peer_id(statement.issuer), PURPOSE_STATEMENT, body, statement.issuer_sig)
    return body


def cosign_statement(identity: Identity, statement: Statement, receipts: Iterable[Receipt]) -> Statement:
    """The counterparty's countersignature, given only if the statement is exactly what its
    own receipts give (build_statement's rules); else BadProof naming the first difference."""
    if identity.peer_id != statement.counterparty:
        raise KeyMismatch(f"statement names counterparty {statement.counterparty}, identity is {identity.peer_id}")
    body = _verify_issuer(statement)
    mine = settleable(
        [r for r in receipts if r.swarm_id == statement.swarm_id],
        party_a=statement.issuer,
        party_b=statement.counterparty,
        since=statement.period_start,
        until=statement.period_end,
    )
    for name, value in _totals(mine).items():
        claimed = getattr(statement, name)
        if claimed != value:
            shown = (claimed.hex(), value.hex()) if isinstance(value, bytes) else (claimed, value)
            raise BadProof(f"statement {name} {shown[0]} != {shown[1]} from my receipts")
    sig = identity.sign(PURPOSE_STATEMENT_COUNTERSIGN, body + statement.issuer_sig)
    return dataclasses.replace(statement, counterparty_sig=sig)


def verify_statement(
    statement: Statement, receipts: Sequence[Receipt], *, require_countersigned: bool = False
) -> None:
    """Check a statement against the receipts it covers (in any order):

    1. the issuer's signature, and the counterparty's when present or required
       (InvalidSignature);
    2. every receipt verifies with its countersignature (verify_receipt), is of the statement's
       swarm, between its two parties and ended in [period_start, period_end) (BadProof);
    3. no receipt id, (server, client, seq) or session occurs twice (DuplicateReceipt);
    4. count, token and work totals and the Merkle root are those of the receipts in (server,
       client, seq) order (BadProof).
    """
    body = _verify_issuer(statement)
    if statement.counterparty_sig or require_countersigned:
        if not statement.counterparty_sig:
            raise InvalidSignature("statement is not countersigned")
        key = public_key_from_peer_id(statement.counterparty)
        verify(key, PURPOSE_STATEMENT_COUNTERSIGN, body + statement.issuer_sig, statement.counterparty_sig)
    pair = {statement.issuer, statement.counterparty}
    for receipt in receipts:
        try:
            verify_receipt(receipt, require_countersigned=True)
        except ShizaError as exc:
            raise type(exc)(f"receipt {receipt.receipt_id}: {exc.message}", code=exc.code) from None
        if receipt.swarm_id != statement.swarm_id or {receipt.server, receipt.client} != pair:
            raise BadProof(f"receipt {receipt.receipt_id} is not of this statement's swarm and parties")
        if receipt.ended_at < statement.period_start:
            raise BadProof(f"receipt {receipt.receipt_id} ended before the statement's period")
        if receipt.ended_at >= statement.period_end:
            raise BadProof(f"receipt {receipt.receipt_id} ended after the statement's period")
    check_unique(receipts)
    ordered = latest_per_session(receipts)
    if len(ordered) != len(receipts):
        raise DuplicateReceipt("statement covers two checkpoints of one session")
    for name, value in _totals(ordered).items():
        if getattr(statement, name) != value:
            raise BadProof(f"statement {name} does not match its receipts")
