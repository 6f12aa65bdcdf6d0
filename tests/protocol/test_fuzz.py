"""Property-based fuzzing of every decoder and verifier of the protocol package.

Random bytes, mutated valid encodings and structurally mutated messages must only ever raise
ShizaError subclasses: never another exception, never hang. Budgets are bounded (max_examples,
a deadline per example) so this runs in the normal suite; raise FUZZ_EXAMPLES to dig deeper.
"""

from __future__ import annotations

import os
import struct
from typing import Any, Callable

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import (
    CapacityRecord,
    CloseSession,
    DisputeRecord,
    Closed,
    Countersign,
    Dispute,
    Error,
    FrameDecoder,
    InfoRequest,
    NodeInfo,
    OpenSession,
    Receipt,
    SamplingParams,
    ServedSpan,
    SessionOpened,
    ShizaError,
    Statement,
    Step,
    StepResult,
    Tensor,
    build_statement,
    cosign_statement,
    decode_document,
    decode_message,
    encode_document,
    encode_message,
    latest_per_session,
    message_to_wire,
    sign_dispute,
    sign_record,
    unpack,
    verify_dispute,
    verify_documents,
    verify_receipt,
    verify_record,
    verify_statement,
)

from .conftest import MODEL, NOW, make_record
from .receipt_helpers import CLIENT, OTHER, SERVER, T0, make_history, make_receipt

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, suppress_health_check=list(HealthCheck))


def _only_shiza_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except ShizaError:
        return None


# ---- seeds: one valid encoding of everything ------------------------------------------------
RECORD = sign_record(SERVER, make_record(SERVER))
RECEIPT = make_receipt()
HISTORY = latest_per_session(make_history(3))  # what a statement covers: one receipt a session
STATEMENT = cosign_statement(
    CLIENT, build_statement(SERVER, CLIENT.peer_id, HISTORY, period_start=T0, period_end=T0 + 1000), HISTORY)
_ids = Tensor("int64", (1, 3), struct.pack("<3q", 1, 2, 3))
_hidden = Tensor("float32", (1, 3, 4), bytes(48))
MESSAGES = [
    InfoRequest(),
    NodeInfo(SERVER.peer_id, ("/ip4/127.0.0.1/tcp/1",), "0.1", "online", (ServedSpan(MODEL, 0, 2, 6),),
             RECORD.to_bytes()),
    OpenSession(MODEL, 0, 6, 64, 2, SamplingParams(0.7, 0.9, 5), "sid"),
    SessionOpened("sid", 0, 6, 64),
    Step(0, _ids, _ids, _ids),
    Step(3, _hidden, _ids),
    StepResult(0, _hidden, RECEIPT.to_bytes()),
    CloseSession(),
    Closed(RECEIPT.to_bytes()),
    Countersign(RECEIPT.receipt_id, bytes(64)),
    Dispute(RECEIPT.receipt_id, "decode_tokens 1 != 2"),
    Error(25, "busy"),
]
PAYLOADS = [encode_message(m)[4:] for m in MESSAGES]
DOCUMENTS = [
    encode_document({"v": 0, "kind": "receipt", "receipt": RECEIPT}, "json"),
    encode_document({"v": 0, "kind": "receipts", "owner": SERVER.peer_id, "exported_at": NOW,
                     "receipts": HISTORY}, "msgpack"),
    encode_document({"v": 0, "kind": "statement", "statement": STATEMENT, "receipts": HISTORY}, "json"),
]


def _mutate(data: bytes, ops: list[tuple[int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for op, pos, blob in ops:
        at = pos % (len(buf) + 1)
        if op == 0 and buf:  # flip bits of one byte
            buf[at % len(buf)] ^= (blob[0] if blob else 0xFF) or 1
        elif op == 1:  # insert
            buf[at:at] = blob
        elif op == 2:  # delete a run
            del buf[at:at + 1 + len(blob)]
        elif op == 3:  # truncate
            del buf[at:]
        else:  # overwrite
            buf[at:at + len(blob)] = blob
    return bytes(buf)


def mutated(seeds: list[bytes]) -> st.SearchStrategy[bytes]:
    ops = st.lists(st.tuples(st.integers(0, 4), st.integers(0, 2**20), st.binary(max_size=9)), min_size=1, max_size=6)
    return st.one_of(
        st.binary(max_size=400),
        st.builds(_mutate, st.sampled_from(seeds), ops),
    )


# Values a hostile peer can put in a field: every msgpack type, nested a little.
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
              st.text(max_size=20), st.binary(max_size=40)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)


@st.composite
def mutated_wire_maps(draw: st.DrawFn) -> dict[str, Any]:
    """A valid message's wire map with fields replaced, removed or added."""
    wire = dict(message_to_wire(draw(st.sampled_from(MESSAGES))))
    for _ in range(draw(st.integers(1, 3))):
        keys = sorted(wire)
        action = draw(st.integers(0, 2))
        if action == 0 and keys:
            wire[draw(st.sampled_from(keys))] = draw(VALUES)
        elif action == 1 and keys:
            wire.pop(draw(st.sampled_from(keys)))
        else:
            wire[draw(st.text(max_size=8))] = draw(VALUES)
    return wire


# ---- properties ---------------------------------------------------------------------------
@FUZZ
@given(mutated(PAYLOADS))
def test_unpack_and_decode_message(data: bytes) -> None:
    _only_shiza_errors(lambda: decode_message(unpack(data)))


@FUZZ
@given(st.one_of(mutated_wire_maps(), VALUES))
def test_decode_message_of_mutated_maps(obj: Any) -> None:
    _only_shiza_errors(lambda: decode_message(obj))
    # and the same object as it arrives on the wire
    try:
        payload = msgpack.packb(obj, use_bin_type=True)
    except (ValueError, TypeError, OverflowError):
        return
    _only_shiza_errors(lambda: decode_message(unpack(payload)))


@FUZZ
@given(st.lists(mutated([encode_message(m) for m in MESSAGES]), min_size=1, max_size=4),
       st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_frame_decoder_on_chunked_streams(frames: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(frames)
    decoder = FrameDecoder(1 << 16)

    def feed_all() -> None:
        i = 0
        for n in cuts * (len(stream) // max(1, sum(cuts)) + 1):
            if i >= len(stream):
                break
            for obj in decoder.feed(stream[i:i + n]):
                _only_shiza_errors(lambda: decode_message(obj))
            i += n

    _only_shiza_errors(feed_all)


@FUZZ
@given(mutated([RECORD.to_bytes()]))
def test_capacity_record(data: bytes) -> None:
    record = _only_shiza_errors(lambda: CapacityRecord.from_bytes(data))
    if record is not None:
        _only_shiza_errors(lambda: verify_record(record, now=NOW + 1, key=f"/shiza-cap/{SERVER.peer_id}"))


@FUZZ
@given(mutated([RECEIPT.to_bytes(), HISTORY[-1].to_bytes()]))
def test_receipt(data: bytes) -> None:
    receipt = _only_shiza_errors(lambda: Receipt.from_bytes(data))
    if receipt is not None:
        _only_shiza_errors(lambda: verify_receipt(receipt, require_countersigned=True))


@FUZZ
@given(mutated([STATEMENT.to_bytes()]))
def test_statement(data: bytes) -> None:
    statement = _only_shiza_errors(lambda: Statement.from_bytes(data))
    if statement is not None:
        _only_shiza_errors(lambda: verify_statement(statement, HISTORY, require_countersigned=True))


@FUZZ
@given(mutated(DOCUMENTS))
def test_documents(data: bytes) -> None:
    doc = _only_shiza_errors(lambda: decode_document(data))
    if doc is not None:
        _only_shiza_errors(lambda: verify_documents([doc]))


def test_seeds_are_valid() -> None:
    """The mutations start from valid encodings (else the fuzzing would test nothing)."""
    for m, payload in zip(MESSAGES, PAYLOADS):
        assert decode_message(unpack(payload)) == m
    verify_record(CapacityRecord.from_bytes(RECORD.to_bytes()), now=NOW + 1)
    verify_receipt(Receipt.from_bytes(RECEIPT.to_bytes()), require_countersigned=True)
    verify_statement(Statement.from_bytes(STATEMENT.to_bytes()), HISTORY, require_countersigned=True)
    for data in DOCUMENTS:
        verify_documents([decode_document(data)])


DISPUTE = sign_dispute(CLIENT, DisputeRecord(
    swarm_id="public", model_id=MODEL, start=0, end=3, step=4, session_id="sid", accused=SERVER.peer_id,
    witnesses=(OTHER.peer_id,), reporter=CLIENT.peer_id, input_digest=bytes(32), accused_digest=b"a" * 32,
    witness_digest=b"w" * 32, max_abs_diff=0.5, tolerance=0.01, created_at=T0,
    evidence=(make_receipt(SERVER, CLIENT, session_id="sid", end=3, cosign=False).to_bytes(),
              make_receipt(OTHER, CLIENT, session_id="w", end=3).to_bytes())))


@FUZZ
@given(mutated([DISPUTE.to_bytes()]))
def test_dispute_record(data: bytes) -> None:
    record = _only_shiza_errors(lambda: DisputeRecord.from_bytes(data))
    if record is not None:
        _only_shiza_errors(lambda: verify_dispute(record))


def test_dispute_round_trip_and_tampering() -> None:
    assert verify_dispute(DisputeRecord.from_bytes(DISPUTE.to_bytes())) == DISPUTE
    for i in range(0, len(DISPUTE.to_bytes()), 7):
        data = bytearray(DISPUTE.to_bytes())
        data[i] ^= 0x01
        assert _only_shiza_errors(lambda: verify_dispute(DisputeRecord.from_bytes(bytes(data)))) is None
