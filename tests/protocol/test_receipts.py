from __future__ import annotations

import array
import dataclasses
import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import VerifyKey

from protocol import (
    PURPOSE_CAPACITY_RECORD,
    PURPOSE_IO_DIGEST,
    PURPOSE_RECEIPT,
    PURPOSE_RECEIPT_COUNTERSIGN,
    PURPOSE_STATEMENT,
    Closed,
    Countersign,
    Dispute,
    DuplicateReceipt,
    FrameDecoder,
    InvalidMessage,
    InvalidSignature,
    IoDigest,
    KeyMismatch,
    MalformedFrame,
    Receipt,
    ReceiptMismatch,
    ShizaError,
    Step,
    StepResult,
    Tensor,
    UnsupportedVersion,
    canonical_pack,
    check_receipt,
    count_step_tokens,
    countersign_receipt,
    decode_message,
    encode_message,
    latest_per_session,
    receipt_id_for,
    sign_receipt,
    verify,
    verify_receipt,
)

from .receipt_helpers import CLIENT, MODEL, OTHER, SERVER, make_receipt


def ints(*values: int, shape: tuple[int, ...] | None = None) -> Tensor:
    return Tensor("int64", shape or (1, len(values)), array.array("q", values).tobytes())


def test_round_trip_and_verify() -> None:
    receipt = make_receipt()
    assert receipt.is_countersigned and receipt.tokens == 15 and receipt.work_units == 150
    data = receipt.to_bytes()
    assert Receipt.from_bytes(data) == receipt
    assert Receipt.from_wire(msgpack.unpackb(data)) == receipt
    assert verify_receipt(Receipt.from_bytes(data), require_countersigned=True) == receipt
    server_only = make_receipt(cosign=False)
    assert not server_only.is_countersigned and server_only.client_sig == b""
    assert verify_receipt(Receipt.from_bytes(server_only.to_bytes())) == server_only
    with pytest.raises(InvalidSignature):
        verify_receipt(server_only, require_countersigned=True)
    assert server_only.with_client_sig(receipt.client_sig) == receipt


def test_receipt_id_derivation() -> None:
    rid = receipt_id_for("public", SERVER.peer_id, CLIENT.peer_id, 7)
    expected = hashlib.sha256(b"shiza/receipt-id/v0\x00" + canonical_pack(["public", SERVER.peer_id, CLIENT.peer_id, 7]))
    assert rid == expected.hexdigest()[:32] and len(rid) == 32
    assert rid != receipt_id_for("other", SERVER.peer_id, CLIENT.peer_id, 7)
    assert rid != receipt_id_for("public", SERVER.peer_id, CLIENT.peer_id, 8)


def test_signed_bytes_are_exactly_purpose_plus_canonical_body() -> None:
    receipt = make_receipt()
    body = {k: v for k, v in msgpack.unpackb(receipt.to_bytes()).items() if k not in ("server_sig", "client_sig")}
    assert receipt.signed_bytes() == b"shiza/receipt/v0\x00" + canonical_pack(body)
    assert receipt.countersigned_bytes() == b"shiza/receipt-countersign/v0\x00" + canonical_pack(body) + receipt.server_sig
    VerifyKey(SERVER.public_key).verify(receipt.signed_bytes(), receipt.server_sig)
    VerifyKey(CLIENT.public_key).verify(receipt.countersigned_bytes(), receipt.client_sig)


def test_every_byte_flip_is_rejected() -> None:
    data = make_receipt().to_bytes()
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= mask
            with pytest.raises(ShizaError):
                verify_receipt(Receipt.from_bytes(bytes(tampered)), require_countersigned=True)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(decode_tokens=6), ReceiptMismatch),  # tokens inflated, work_units not
        (dict(decode_tokens=6, work_units=160), InvalidSignature),  # inflated consistently
        (dict(start=1), ReceiptMismatch),
        (dict(start=1, end=11), InvalidSignature),  # span moved, same width
        (dict(end=9, start=9), ReceiptMismatch),
        (dict(seq=2), ReceiptMismatch),  # receipt_id no longer derived
        (dict(seq=2, receipt_id=receipt_id_for("public", SERVER.peer_id, CLIENT.peer_id, 2)), InvalidSignature),
        (dict(io_digest=bytes(32)), InvalidSignature),
        (dict(checkpoint=5), InvalidSignature),
        (dict(final=True), InvalidSignature),
        (dict(session_id="other"), InvalidSignature),
        (dict(unit_price=0.25), InvalidSignature),
        (dict(ended_at=1.0), ReceiptMismatch),
        (dict(ended_at=1_700_000_011.0), InvalidSignature),
        (dict(server_sig=bytes(64)), InvalidSignature),
    ],
)
def test_tampered_fields_are_rejected(change: dict[str, object], error: type[ShizaError]) -> None:
    tampered = dataclasses.replace(make_receipt(), **change)  # type: ignore[arg-type]
    with pytest.raises(error):
        verify_receipt(tampered)


def test_swapped_parties_are_rejected() -> None:
    receipt = make_receipt()
    swapped = dataclasses.replace(
        receipt, server=receipt.client, client=receipt.server,
        receipt_id=receipt_id_for("public", receipt.client, receipt.server, receipt.seq),
    )
    with pytest.raises(InvalidSignature):
        verify_receipt(swapped)


def test_signatures_do_not_cross_purposes() -> None:
    receipt = make_receipt()
    body = canonical_pack(receipt.body_wire())
    for purpose in (PURPOSE_CAPACITY_RECORD, PURPOSE_STATEMENT, PURPOSE_RECEIPT_COUNTERSIGN):
        with pytest.raises(InvalidSignature):
            verify(SERVER.public_key, purpose, body, receipt.server_sig)
    with pytest.raises(InvalidSignature):  # the countersignature is not a server signature
        verify(CLIENT.public_key, PURPOSE_RECEIPT, body, receipt.client_sig)
    # A server signature made for another purpose over the same body is refused.
    for purpose in (PURPOSE_CAPACITY_RECORD, PURPOSE_STATEMENT, PURPOSE_RECEIPT_COUNTERSIGN):
        forged = dataclasses.replace(receipt, server_sig=SERVER.sign(purpose, body), client_sig=b"")
        with pytest.raises(InvalidSignature):
            verify_receipt(forged)
    # A countersignature made with the server purpose is refused.
    wrong = receipt.with_client_sig(CLIENT.sign(PURPOSE_RECEIPT, body + receipt.server_sig))
    with pytest.raises(InvalidSignature):
        verify_receipt(wrong)


def test_only_the_named_peers_sign() -> None:
    receipt = make_receipt(sign=False)
    with pytest.raises(KeyMismatch):
        sign_receipt(CLIENT, receipt)
    signed = sign_receipt(SERVER, receipt)
    with pytest.raises(KeyMismatch):
        countersign_receipt(OTHER, signed)
    forged = signed.with_client_sig(OTHER.sign(PURPOSE_RECEIPT_COUNTERSIGN, signed.countersigned_bytes()[len(PURPOSE_RECEIPT_COUNTERSIGN):]))
    with pytest.raises(InvalidSignature):
        verify_receipt(forged)
    with pytest.raises(InvalidSignature):  # the client refuses a receipt the server did not sign
        countersign_receipt(CLIENT, dataclasses.replace(signed, server_sig=OTHER.sign(PURPOSE_RECEIPT, b"x")))
    with pytest.raises(InvalidSignature):
        verify_receipt(receipt)  # unsigned


def test_check_receipt_names_the_difference() -> None:
    receipt = make_receipt(cosign=False, prefill=10, decode=12)
    observed = dict(
        server=SERVER.peer_id, client=CLIENT.peer_id, model_id=MODEL, start=0, end=10, session_id="sess-1",
        prefill_tokens=10, decode_tokens=12, io_digest=receipt.io_digest,
    )
    check_receipt(receipt, **observed)  # type: ignore[arg-type]
    with pytest.raises(ReceiptMismatch, match="decode_tokens 12 != observed 11"):
        check_receipt(receipt, **{**observed, "decode_tokens": 11})  # type: ignore[arg-type]
    with pytest.raises(ReceiptMismatch, match="^end 10 != observed 11"):
        check_receipt(receipt, **{**observed, "end": 11})  # type: ignore[arg-type]
    with pytest.raises(ReceiptMismatch, match="io_digest"):
        check_receipt(receipt, **{**observed, "io_digest": bytes(32)})  # type: ignore[arg-type]
    with pytest.raises(ReceiptMismatch, match="client"):
        check_receipt(receipt, **{**observed, "client": OTHER.peer_id})  # type: ignore[arg-type]


def test_strict_parsing() -> None:
    receipt = make_receipt()
    wire = receipt.to_wire()
    with pytest.raises(MalformedFrame):  # same values, keys out of canonical order
        Receipt.from_bytes(msgpack.packb(dict(reversed(list(wire.items()))), use_bin_type=True))
    with pytest.raises(InvalidMessage, match="unknown"):
        Receipt.from_wire({**wire, "extra": 1})
    with pytest.raises(InvalidMessage, match="missing"):
        Receipt.from_wire({k: v for k, v in wire.items() if k != "client_sig"})
    with pytest.raises(UnsupportedVersion):
        Receipt.from_wire({**wire, "v": 1})
    for field, bad in [("final", 1), ("seq", True), ("seq", -1), ("io_digest", bytes(31)), ("server_sig", bytes(10)),
                       ("receipt_id", "A" * 32), ("receipt_id", "ab"), ("model_id", ""), ("started_at", float("nan"))]:
        with pytest.raises(ShizaError):
            Receipt.from_wire({**wire, field: bad})
    with pytest.raises(InvalidMessage):
        Receipt.from_bytes(bytes(5000))


def step(n: int, input: Tensor, mask: Tensor | None = None) -> Step:
    batch, length = input.shape[0], input.shape[1]
    positions = ints(*[n + t for _ in range(batch) for t in range(length)], shape=(batch, length))
    return Step(n, input, positions, mask)


def test_count_step_tokens() -> None:
    prompt = ints(1, 2, 3, 4, 5, 6, shape=(2, 3))
    assert count_step_tokens(step(0, prompt)) == (6, 0)
    assert count_step_tokens(step(0, prompt, ints(0, 1, 1, 1, 1, 1, shape=(2, 3)))) == (5, 0)
    assert count_step_tokens(step(0, ints(7, shape=(1, 1)))) == (1, 0)  # a 1-token prompt is prefill
    assert count_step_tokens(step(4, ints(7, 8, shape=(2, 1)))) == (0, 2)
    assert count_step_tokens(step(4, ints(7, 8, shape=(2, 1)), ints(1, 0, shape=(2, 1)))) == (0, 1)
    assert count_step_tokens(step(2, prompt)) == (6, 0)  # a continued prefill
    hidden = Tensor("float32", (2, 1, 4), bytes(32))
    assert count_step_tokens(step(9, hidden)) == (0, 2)


def test_io_digest_is_the_same_on_both_ends() -> None:
    sent = [step(0, ints(1, 2, 3)), step(1, ints(9)), step(2, ints(4), ints(1))]
    outputs = [ints(9, shape=(1,)), ints(4, shape=(1,)), ints(2, shape=(1,))]
    client, server = IoDigest("sess"), IoDigest("sess")
    assert client.digest == hashlib.sha256(PURPOSE_IO_DIGEST + b"sess").digest()
    for msg, out in zip(sent, outputs):
        client.update(msg.to_wire(), out.to_wire())
        (obj,) = FrameDecoder().feed(encode_message(msg))
        received = decode_message(obj)
        (res,) = FrameDecoder().feed(encode_message(StepResult(msg.step, out)))
        server.update(received.to_wire(), decode_message(res).output.to_wire())  # type: ignore[union-attr]
    assert client.digest == server.digest and client.steps == 3
    snapshot = client.copy()
    client.update(sent[0].to_wire(), outputs[1].to_wire())
    assert snapshot.digest == server.digest and snapshot.steps == 3 and client.digest != server.digest
    other = IoDigest("sess")
    for msg, out in zip(sent, reversed(outputs)):
        other.update(msg.to_wire(), out.to_wire())
    assert other.digest != server.digest
    assert IoDigest("a").digest != IoDigest("b").digest


def test_latest_per_session() -> None:
    a0 = make_receipt(seq=1, checkpoint=0)
    a1 = make_receipt(seq=3, checkpoint=1)
    b0 = make_receipt(seq=2, checkpoint=0, session_id="sess-2")
    assert latest_per_session([a1, b0, a0]) == [b0, a1]
    with pytest.raises(DuplicateReceipt):
        latest_per_session([a0, a1, make_receipt(seq=4, checkpoint=0)])
    with pytest.raises(DuplicateReceipt):
        latest_per_session([a0, a0])


def test_receipt_messages_round_trip() -> None:
    receipt = make_receipt(cosign=False).to_bytes()
    for msg in (
        StepResult(3, ints(1, shape=(1,)), receipt),
        StepResult(3, ints(1, shape=(1,))),
        Closed(receipt),
        Closed(),
        Countersign(make_receipt().receipt_id, make_receipt().client_sig),
        Dispute(make_receipt().receipt_id, "decode_tokens 12 != observed 11"),
    ):
        (obj,) = FrameDecoder().feed(encode_message(msg))  # type: ignore[arg-type]
        assert decode_message(obj) == msg
    assert decode_message({"v": 0, "t": "closed"}) == Closed()
    for bad in (
        {"v": 0, "t": "cosign", "receipt_id": "x" * 32, "client_sig": bytes(64)},
        {"v": 0, "t": "cosign", "receipt_id": "0" * 32, "client_sig": bytes(63)},
        {"v": 0, "t": "dispute", "receipt_id": "0" * 32},
        {"v": 0, "t": "dispute", "receipt_id": "0" * 32, "reason": "r" * 5000},
        {"v": 0, "t": "closed", "receipt": "text"},
        {"v": 0, "t": "closed", "receipt": bytes(5000)},
    ):
        with pytest.raises(ShizaError):
            decode_message(bad)


@settings(max_examples=40, deadline=None)
@given(
    prefill=st.integers(0, 2**40),
    decode=st.integers(0, 2**40),
    start=st.integers(0, 100),
    width=st.integers(1, 100),
    seq=st.integers(0, 2**64 - 1),
    checkpoint=st.integers(0, 2**32),
    session_id=st.text(min_size=1, max_size=40),
    price=st.one_of(st.none(), st.floats(0, 1e6)),
)
def test_any_valid_receipt_round_trips(
    prefill: int, decode: int, start: int, width: int, seq: int, checkpoint: int, session_id: str, price: float | None
) -> None:
    receipt = dataclasses.replace(
        make_receipt(sign=False, seq=seq, session_id=session_id, checkpoint=checkpoint, prefill=prefill, decode=decode,
                     start=start, end=start + width),
        unit_price=price,
    )
    signed = countersign_receipt(CLIENT, sign_receipt(SERVER, receipt))
    assert verify_receipt(Receipt.from_bytes(signed.to_bytes()), require_countersigned=True) == signed
