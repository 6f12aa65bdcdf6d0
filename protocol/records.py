"""Signed capacity records: what a node publishes in the DHT under ``capacity_key(peer_id)``.

Signed bytes: ``PURPOSE_CAPACITY_RECORD + canonical_pack(map without "signature")``. A record on
the wire is the canonical msgpack map including "signature"; any other encoding of the same
values is rejected, so one record has exactly one byte form.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ._fields import check_bytes, check_choice, check_float, check_int, check_seq, check_str, fields_of, set_field
from ._signed import parse_canonical, versioned_fields
from .codec import canonical_pack
from .errors import (
    InvalidMessage,
    KeyMismatch,
    RecordExpired,
    StaleSequence,
)
from .identity import SIGNATURE_BYTES, Identity, public_key_from_peer_id, verify
from .ids import (
    MAX_ADDR_LEN,
    MAX_ADDRS,
    MAX_CLOCK_SKEW_S,
    MAX_ID_LEN,
    MAX_RECORD_BYTES,
    MAX_SPANS,
    MAX_UINT64,
    PROTOCOL_VERSION,
    PURPOSE_CAPACITY_RECORD,
    RECORD_MAX_TTL_S,
    capacity_key,
)
from .messages import NODE_STATES, ServedSpan

DEVICE_KINDS = ("cpu", "cuda")
_MAX_BYTES_COUNT = 2**62  # memory sizes


MAX_GPUS = 64
_GPU_FIELDS = ("name", "memory_total", "memory_free", "compute_capability", "bf16")


@dataclass(frozen=True)
class Gpu:
    """One GPU the node's process sees."""

    name: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    compute_capability: str  # "8.0"
    bf16: bool

    def __post_init__(self) -> None:
        check_str("gpu name", self.name, MAX_ID_LEN)
        check_int("gpu memory_total", self.memory_total, 0, _MAX_BYTES_COUNT)
        check_int("gpu memory_free", self.memory_free, 0, _MAX_BYTES_COUNT)
        check_str("compute_capability", self.compute_capability, 16)
        if type(self.bf16) is not bool:
            raise InvalidMessage("gpu bf16 must be a boolean")

    @classmethod
    def from_wire(cls, obj: Any) -> Gpu:
        return cls(**fields_of(obj, "gpu", _GPU_FIELDS))


@dataclass(frozen=True)
class Hardware:
    device_kind: str  # "cpu" | "cuda"
    device_name: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    gpus: tuple[Gpu, ...] = ()  # every GPU, the one the node computes on first; omitted when none

    def __post_init__(self) -> None:
        check_choice("device_kind", self.device_kind, DEVICE_KINDS)
        check_str("device_name", self.device_name, MAX_ID_LEN)
        check_int("memory_total", self.memory_total, 0, _MAX_BYTES_COUNT)
        check_int("memory_free", self.memory_free, 0, _MAX_BYTES_COUNT)
        gpus = check_seq("gpus", self.gpus, MAX_GPUS)
        if not all(isinstance(g, Gpu) for g in gpus):
            raise InvalidMessage("gpus must be Gpu entries")
        set_field(self, "gpus", tuple(gpus))

    def to_wire(self) -> dict[str, Any]:
        wire = dataclasses.asdict(self)
        if self.gpus:  # a map without gpus stays readable by nodes older than the field
            wire["gpus"] = [dataclasses.asdict(g) for g in self.gpus]
        else:
            del wire["gpus"]
        return wire

    @classmethod
    def from_wire(cls, obj: Any) -> Hardware:
        got = fields_of(obj, "hardware", ("device_kind", "device_name", "memory_total", "memory_free"),
                        {"gpus": []})
        raw = got.pop("gpus")
        if not isinstance(raw, list):
            raise InvalidMessage("hardware gpus must be an array")
        return cls(**got, gpus=tuple(Gpu.from_wire(g) for g in check_seq("gpus", raw, MAX_GPUS)))


_RECORD_FIELDS = (
    "peer_id",
    "addrs",
    "spans",
    "hardware",
    "throughput",
    "cache_tokens_left",
    "state",
    "seq",
    "issued_at",
    "expires_at",
)


@dataclass(frozen=True)
class CapacityRecord:
    """A node's advertisement. Times are Unix seconds; throughput is tokens/s of its spans."""

    peer_id: str
    addrs: tuple[str, ...]
    spans: tuple[ServedSpan, ...]
    hardware: Hardware
    throughput: float
    cache_tokens_left: int
    state: str  # "joining" | "online" | "draining"
    seq: int
    issued_at: float
    expires_at: float
    signature: bytes = b""

    def __post_init__(self) -> None:
        check_str("peer_id", self.peer_id, MAX_ID_LEN, nonempty=True)
        addrs = check_seq("addrs", self.addrs, MAX_ADDRS)
        for addr in addrs:
            check_str("addrs[]", addr, MAX_ADDR_LEN, nonempty=True)
        set_field(self, "addrs", addrs)
        spans = check_seq("spans", self.spans, MAX_SPANS)
        if not all(isinstance(span, ServedSpan) for span in spans):
            raise InvalidMessage("spans[] must be ServedSpan values")
        set_field(self, "spans", spans)
        if not isinstance(self.hardware, Hardware):
            raise InvalidMessage("hardware must be a Hardware value")
        set_field(self, "throughput", check_float("throughput", self.throughput, 0.0))
        check_int("cache_tokens_left", self.cache_tokens_left, 0, MAX_UINT64)
        check_choice("state", self.state, NODE_STATES)
        check_int("seq", self.seq, 0, MAX_UINT64)
        set_field(self, "issued_at", check_float("issued_at", self.issued_at, 0.0))
        set_field(self, "expires_at", check_float("expires_at", self.expires_at, 0.0))
        check_bytes("signature", self.signature, SIGNATURE_BYTES)

    def unsigned_wire(self) -> dict[str, Any]:
        """The map that is signed: every field but the signature, with "v"."""
        return {
            "v": PROTOCOL_VERSION,
            "peer_id": self.peer_id,
            "addrs": list(self.addrs),
            "spans": [span.to_wire() for span in self.spans],
            "hardware": self.hardware.to_wire(),
            "throughput": self.throughput,
            "cache_tokens_left": self.cache_tokens_left,
            "state": self.state,
            "seq": self.seq,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
        }

    def signed_bytes(self) -> bytes:
        """Exactly the bytes the signature covers (purpose prefix included)."""
        return PURPOSE_CAPACITY_RECORD + canonical_pack(self.unsigned_wire())

    def to_wire(self) -> dict[str, Any]:
        return {**self.unsigned_wire(), "signature": self.signature}

    def to_bytes(self) -> bytes:
        """The canonical msgpack form stored in the DHT."""
        return canonical_pack(self.to_wire())

    @classmethod
    def from_wire(cls, obj: Any) -> CapacityRecord:
        got = versioned_fields(obj, "capacity record", (*_RECORD_FIELDS, "signature"))
        got["spans"] = tuple(ServedSpan.from_wire(s) for s in check_seq("spans", got["spans"], MAX_SPANS))
        got["hardware"] = Hardware.from_wire(got["hardware"])
        return cls(**got)

    @classmethod
    def from_bytes(cls, data: bytes) -> CapacityRecord:
        """Parse and validate the fields (not the signature: see verify_record)."""
        return parse_canonical(cls, data, "capacity record", MAX_RECORD_BYTES)


def sign_record(identity: Identity, record: CapacityRecord) -> CapacityRecord:
    """A copy of ``record`` signed by ``identity``, which must be the key its peer id names."""
    if identity.peer_id != record.peer_id:
        raise KeyMismatch(f"record names peer {record.peer_id}, identity is {identity.peer_id}")
    unsigned = dataclasses.replace(record, signature=b"")
    return dataclasses.replace(unsigned, signature=identity.sign(PURPOSE_CAPACITY_RECORD, canonical_pack(unsigned.unsigned_wire())))


def verify_record(
    record_or_bytes: CapacityRecord | bytes,
    *,
    now: float,
    key: str | None = None,
    min_seq: int | None = None,
) -> CapacityRecord:
    """Return the record if every check passes, in this order:

    1. bytes parse as a canonical record (MalformedFrame, InvalidMessage, LimitExceeded, ...);
    2. ``key``, when given, is ``capacity_key(record.peer_id)`` (KeyMismatch);
    3. the peer id inlines an Ed25519 key (InvalidMessage) and the signature verifies with it
       (InvalidSignature);
    4. expires_at > issued_at, expires_at - issued_at <= RECORD_MAX_TTL_S and
       issued_at <= now + MAX_CLOCK_SKEW_S (InvalidMessage);
    5. now < expires_at (RecordExpired);
    6. seq >= min_seq when given (StaleSequence).
    """
    if isinstance(record_or_bytes, CapacityRecord):
        record = record_or_bytes
    elif isinstance(record_or_bytes, (bytes, bytearray, memoryview)):
        record = CapacityRecord.from_bytes(bytes(record_or_bytes))
    else:
        raise TypeError("verify_record takes a CapacityRecord or its bytes")
    if key is not None and key != capacity_key(record.peer_id):
        raise KeyMismatch(f"record of {record.peer_id} stored under another key ({key[:100]!r})")
    public_key = public_key_from_peer_id(record.peer_id)
    verify(public_key, PURPOSE_CAPACITY_RECORD, canonical_pack(record.unsigned_wire()), record.signature)
    if record.expires_at <= record.issued_at:
        raise InvalidMessage("record expires_at must be later than issued_at")
    if record.expires_at - record.issued_at > RECORD_MAX_TTL_S:
        raise InvalidMessage(f"record lifetime exceeds RECORD_MAX_TTL_S ({RECORD_MAX_TTL_S} s)")
    if record.issued_at > now + MAX_CLOCK_SKEW_S:
        raise InvalidMessage(f"record issued {record.issued_at - now:.0f} s in the future")
    if now >= record.expires_at:
        raise RecordExpired(f"record of {record.peer_id} expired {now - record.expires_at:.0f} s ago")
    if min_seq is not None and record.seq < min_seq:
        raise StaleSequence(f"record seq {record.seq} is older than {min_seq}")
    return record


class SequenceTracker:
    """The highest record seq seen per peer id, so a replayed older record is refused.

    Holds at most ``max_peers`` entries, forgetting the least recently updated peer first.
    Call it only with records that verify_record accepted.
    """

    def __init__(self, max_peers: int = 100_000) -> None:
        self._max = max_peers
        self._seen: OrderedDict[str, int] = OrderedDict()

    def highest(self, peer_id: str) -> int | None:
        return self._seen.get(peer_id)

    def check_and_update(self, record: CapacityRecord) -> None:
        """Raise StaleSequence if a higher seq was seen for this peer; else remember this one.
        An equal seq is accepted (the same record read again)."""
        last = self._seen.get(record.peer_id)
        if last is not None and record.seq < last:
            raise StaleSequence(f"record seq {record.seq} of {record.peer_id} is older than {last}")
        self._seen[record.peer_id] = record.seq
        self._seen.move_to_end(record.peer_id)
        while len(self._seen) > self._max:
            self._seen.popitem(last=False)

    def __len__(self) -> int:
        return len(self._seen)
