"""Signed dispute records: a client's statement that a node's output disagreed with witnesses.

A client spot-checks a step by running the same inputs for the same layers on independent
witness nodes (SPEC.md, section 19). When the node's output differs from the witnesses'
beyond the tolerance, the client signs a ``DisputeRecord`` naming the accused node, the
witnesses, the step and the digests of the outputs, with its *evidence*: receipts signed by the
accused for that session and by each witness for the replay, naming the reporter as their client
(so a reporter cannot accuse a node it never used, nor name witnesses that never served it). One
record is one reporter's word: readers weigh disputes by the number of *distinct* reporters,
never by the number of records.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from ._fields import check_bytes, check_float, check_int, check_seq, check_str, set_field
from ._signed import parse_canonical, versioned_fields
from .codec import Tensor, canonical_pack
from .errors import InvalidMessage, InvalidSignature
from .identity import SIGNATURE_BYTES, Identity, public_key_from_peer_id, verify
from .ids import MAX_ID_LEN, MAX_LAYERS, MAX_RECEIPT_BYTES, MAX_UINT64, PROTOCOL_VERSION, dispute_key
from .receipts import Receipt, verify_receipt

__all__ = [
    "PURPOSE_DISPUTE",
    "DisputeRecord",
    "check_evidence",
    "output_digest",
    "sign_dispute",
    "verify_dispute",
]

PURPOSE_DISPUTE = b"shiza/dispute/v0\x00"
MAX_WITNESSES = 8
MAX_EVIDENCE = 1 + MAX_WITNESSES  # receipts: the accused's, then one per witness
MAX_DISPUTE_BYTES = 32 * 1024
MAX_DISPUTE_AGE_S = 24 * 3600.0  # a dispute older than this is no longer stored, served or counted
MAX_DISPUTE_SKEW_S = 300.0  # how far in the future created_at may be (clock skew)
_DIGEST = 32
_FIELDS = (
    "swarm_id", "model_id", "start", "end", "step", "session_id", "accused", "witnesses", "reporter",
    "input_digest", "accused_digest", "witness_digest", "max_abs_diff", "tolerance", "created_at",
    "evidence",
)


def output_digest(t: Tensor) -> bytes:
    """sha256 of the canonical tensor map (dtype, shape, data), as in the IoDigest."""
    return hashlib.sha256(canonical_pack(t.to_wire())).digest()


@dataclass(frozen=True)
class DisputeRecord:
    swarm_id: str
    model_id: str
    start: int
    end: int
    step: int  # the step number within the accused's session
    session_id: str  # the accused's session
    accused: str  # peer id of the node whose output disagreed
    witnesses: tuple[str, ...]  # peer ids of the nodes whose outputs agreed with each other
    reporter: str  # peer id of the client that signs
    input_digest: bytes  # sha256 of the canonical Step map sent
    accused_digest: bytes  # output_digest of the accused's output
    witness_digest: bytes  # output_digest of the witnesses' (first witness's) output
    max_abs_diff: float
    tolerance: float
    created_at: float
    evidence: tuple[bytes, ...] = ()  # receipts (canonical bytes): see check_evidence
    signature: bytes = b""

    def __post_init__(self) -> None:
        check_str("swarm_id", self.swarm_id, MAX_ID_LEN, nonempty=True)
        check_str("model_id", self.model_id, MAX_ID_LEN, nonempty=True)
        check_int("start", self.start, 0, MAX_LAYERS - 1)
        check_int("end", self.end, self.start + 1, MAX_LAYERS)
        check_int("step", self.step, 0, MAX_UINT64)
        check_str("session_id", self.session_id, MAX_ID_LEN, nonempty=True)
        for name in ("accused", "reporter"):
            public_key_from_peer_id(check_str(name, getattr(self, name), MAX_ID_LEN, nonempty=True))
        witnesses = check_seq("witnesses", self.witnesses, MAX_WITNESSES)
        for w in witnesses:
            public_key_from_peer_id(check_str("witness", w, MAX_ID_LEN, nonempty=True))
        if not witnesses or self.accused in witnesses or self.reporter == self.accused:
            raise InvalidMessage("a dispute needs witnesses other than the accused, and a reporter other than it")
        set_field(self, "witnesses", witnesses)
        for name in ("input_digest", "accused_digest", "witness_digest"):
            check_bytes(name, getattr(self, name), _DIGEST, exact=True)
        check_float("max_abs_diff", self.max_abs_diff, 0.0)
        check_float("tolerance", self.tolerance, 0.0)
        check_float("created_at", self.created_at, 0.0)
        evidence = check_seq("evidence", self.evidence, MAX_EVIDENCE)
        for item in evidence:
            check_bytes("evidence item", item, MAX_RECEIPT_BYTES)
        set_field(self, "evidence", tuple(bytes(e) for e in evidence))
        if self.signature:
            check_bytes("signature", self.signature, SIGNATURE_BYTES, exact=True)

    def body_wire(self) -> dict[str, Any]:
        body = {name: getattr(self, name) for name in _FIELDS}
        body["witnesses"] = list(self.witnesses)
        body["evidence"] = list(self.evidence)
        return {"v": PROTOCOL_VERSION, **body}

    def to_bytes(self) -> bytes:
        return canonical_pack({**self.body_wire(), "signature": self.signature})

    @classmethod
    def from_bytes(cls, data: bytes) -> DisputeRecord:
        """Parse and validate the fields (not the signature: see verify_dispute)."""
        return parse_canonical(cls, data, "dispute", MAX_DISPUTE_BYTES)

    @classmethod
    def from_wire(cls, obj: Any) -> DisputeRecord:
        return cls(**versioned_fields(obj, "dispute", (*_FIELDS, "signature")))


def sign_dispute(identity: Identity, record: DisputeRecord) -> DisputeRecord:
    if record.reporter != identity.peer_id:
        raise InvalidMessage("the reporter of a dispute signs it")
    body = canonical_pack(record.body_wire())
    return DisputeRecord(**{**{n: getattr(record, n) for n in _FIELDS}, "signature": identity.sign(PURPOSE_DISPUTE, body)})


def verify_dispute(record: DisputeRecord) -> DisputeRecord:
    """The record if its reporter's signature verifies; InvalidSignature otherwise."""
    if not record.signature:
        raise InvalidSignature("dispute is not signed")
    verify(public_key_from_peer_id(record.reporter), PURPOSE_DISPUTE, canonical_pack(record.body_wire()),
           record.signature)
    return record


def check_dispute(key: str, value: bytes, *, now: float) -> DisputeRecord:
    """The record in ``value`` if it is valid for the DHT key ``key`` at ``now``: signed by its
    reporter, stored under its own (accused, reporter) slot, made no more than
    ``MAX_DISPUTE_SKEW_S`` ahead of ``now`` and no longer than ``MAX_DISPUTE_AGE_S`` ago, with
    evidence that passes ``check_evidence``. ShizaError otherwise."""
    record = verify_dispute(DisputeRecord.from_bytes(value))
    if key != dispute_key(record.accused, record.reporter):
        raise InvalidMessage(f"dispute of {record.reporter} against {record.accused} is not for key {key!r}")
    if record.created_at > now + MAX_DISPUTE_SKEW_S:
        raise InvalidMessage("dispute created in the future")
    if record.created_at < now - MAX_DISPUTE_AGE_S:
        raise InvalidMessage("dispute older than 24 h")
    check_evidence(record)
    return record


def check_evidence(record: DisputeRecord) -> None:
    """InvalidMessage (or the receipt's own error) unless ``record.evidence`` holds, in order:

    1. a receipt signed by the accused (server signature verified; the client's may be absent:
       the reporter disputes it) whose client is the reporter, for the record's swarm, model,
       layers and session, started before the record was made;
    2. for each witness, in the record's order, a receipt signed by that witness *and
       countersigned* by the reporter (both signatures verified), for the same swarm, model and
       layers, started before the record was made: the reporter paid that witness for its replay.
    """
    if len(record.evidence) != 1 + len(record.witnesses):
        raise InvalidMessage(f"a dispute needs {1 + len(record.witnesses)} receipts as evidence "
                             f"(the accused's and one per witness), got {len(record.evidence)}")
    for n, (party, data) in enumerate(zip((record.accused, *record.witnesses), record.evidence)):
        receipt = verify_receipt(Receipt.from_bytes(data), require_countersigned=n > 0)
        what = "the accused's" if n == 0 else f"witness {party}'s"
        if receipt.server != party or receipt.client != record.reporter:
            raise InvalidMessage(f"evidence {n}: not a receipt of {what} session with the reporter")
        if (receipt.swarm_id, receipt.model_id, receipt.start, receipt.end) != (
                record.swarm_id, record.model_id, record.start, record.end):
            raise InvalidMessage(f"evidence {n}: {what} receipt is for other work than the one disputed")
        if n == 0 and receipt.session_id != record.session_id:
            raise InvalidMessage("evidence 0: the accused's receipt is for another session")
        if receipt.started_at > record.created_at + MAX_DISPUTE_SKEW_S:
            raise InvalidMessage(f"evidence {n}: {what} session started after the dispute was made")
