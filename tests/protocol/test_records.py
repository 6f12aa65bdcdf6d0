from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_ADDRS,
    PURPOSE_RECEIPT,
    RECORD_MAX_TTL_S,
    CapacityRecord,
    Hardware,
    Identity,
    InvalidMessage,
    InvalidSignature,
    KeyMismatch,
    LimitExceeded,
    MalformedFrame,
    RecordExpired,
    SequenceTracker,
    ShizaError,
    StaleSequence,
    UnsupportedVersion,
    canonical_pack,
    capacity_key,
    sign_record,
    verify_record,
)

from .conftest import NOW, make_record


def test_round_trip_and_verify(identity: Identity, signed: CapacityRecord) -> None:
    data = signed.to_bytes()
    assert CapacityRecord.from_bytes(data) == signed
    assert verify_record(data, now=NOW + 1, key=capacity_key(identity.peer_id), min_seq=7) == signed
    assert verify_record(signed, now=NOW) == signed
    assert len(signed.signature) == 64


def test_signed_bytes_are_exactly_purpose_plus_canonical_map(identity: Identity, signed: CapacityRecord) -> None:
    unsigned = {k: v for k, v in msgpack.unpackb(signed.to_bytes()).items() if k != "signature"}
    expected = b"shiza/capacity-record/v0\x00" + canonical_pack(unsigned)
    assert signed.signed_bytes() == expected
    from nacl.signing import VerifyKey

    VerifyKey(identity.public_key).verify(expected, signed.signature)


def test_every_byte_flip_is_rejected(signed: CapacityRecord) -> None:
    data = signed.to_bytes()
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            tampered = bytearray(data)
            tampered[i] ^= mask
            with pytest.raises(ShizaError):
                verify_record(bytes(tampered), now=NOW)


def test_field_tampering_is_rejected(signed: CapacityRecord) -> None:
    for change in ({"seq": 8}, {"throughput": 1e9}, {"expires_at": NOW + 3000}, {"state": "draining"}, {"addrs": ()}):
        with pytest.raises(InvalidSignature):
            verify_record(dataclasses.replace(signed, **change), now=NOW)


def test_unsigned_and_wrong_purpose(identity: Identity) -> None:
    record = make_record(identity)
    with pytest.raises(InvalidSignature):
        verify_record(record, now=NOW)
    other_purpose = identity.sign(PURPOSE_RECEIPT, canonical_pack(record.unsigned_wire()))
    with pytest.raises(InvalidSignature):
        verify_record(dataclasses.replace(record, signature=other_purpose), now=NOW)


def test_signed_by_another_key(identity: Identity) -> None:
    mallory = Identity.generate()
    forged = dataclasses.replace(sign_record(mallory, make_record(mallory)), peer_id=identity.peer_id)
    with pytest.raises(InvalidSignature):
        verify_record(forged.to_bytes(), now=NOW)
    with pytest.raises(KeyMismatch):
        sign_record(mallory, make_record(identity))


def test_key_mismatch(identity: Identity, signed: CapacityRecord) -> None:
    with pytest.raises(KeyMismatch):
        verify_record(signed, now=NOW, key=capacity_key(Identity.generate().peer_id))
    with pytest.raises(KeyMismatch):
        verify_record(signed, now=NOW, key=identity.peer_id)


def test_peer_id_without_inlined_key(identity: Identity) -> None:
    record = make_record(identity, peer_id="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", signature=bytes(64))
    with pytest.raises(InvalidMessage):
        verify_record(record, now=NOW)


def test_expiry_and_times(identity: Identity, signed: CapacityRecord) -> None:
    with pytest.raises(RecordExpired):
        verify_record(signed, now=signed.expires_at)
    verify_record(signed, now=signed.expires_at - 0.001)
    future = sign_record(identity, make_record(identity, issued_at=NOW + 301, expires_at=NOW + 600))
    with pytest.raises(InvalidMessage, match="future"):
        verify_record(future, now=NOW)
    verify_record(future, now=NOW + 1)
    too_long = sign_record(identity, make_record(identity, expires_at=NOW + RECORD_MAX_TTL_S + 1))
    with pytest.raises(InvalidMessage, match="TTL"):
        verify_record(too_long, now=NOW)
    backwards = sign_record(identity, make_record(identity, expires_at=NOW - 1))
    with pytest.raises(InvalidMessage):
        verify_record(backwards, now=NOW - 100)


def test_min_seq_and_tracker(identity: Identity) -> None:
    old = sign_record(identity, make_record(identity, seq=3))
    new = sign_record(identity, make_record(identity, seq=4))
    with pytest.raises(StaleSequence):
        verify_record(old, now=NOW, min_seq=4)
    tracker = SequenceTracker(max_peers=2)
    tracker.check_and_update(new)
    tracker.check_and_update(new)  # the same record read again is fine
    with pytest.raises(StaleSequence):
        tracker.check_and_update(old)
    assert tracker.highest(identity.peer_id) == 4
    for _ in range(2):
        other = Identity.generate()
        tracker.check_and_update(make_record(other, seq=1))
    assert len(tracker) == 2 and tracker.highest(identity.peer_id) is None


def test_strict_parsing(signed: CapacityRecord) -> None:
    wire = signed.to_wire()
    with pytest.raises(MalformedFrame):  # same values, not canonical (keys unsorted)
        CapacityRecord.from_bytes(msgpack.packb(dict(reversed(list(wire.items()))), use_bin_type=True))
    for key in wire:
        broken = {k: v for k, v in wire.items() if k != key}
        with pytest.raises(InvalidMessage):
            CapacityRecord.from_bytes(canonical_pack(broken))
    with pytest.raises(InvalidMessage):
        CapacityRecord.from_bytes(canonical_pack({**wire, "extra": 1}))
    with pytest.raises(UnsupportedVersion):
        CapacityRecord.from_bytes(canonical_pack({**wire, "v": 1}))
    for field, value in [("state", "asleep"), ("seq", -1), ("throughput", -1.0), ("addrs", "x"),
                         ("hardware", {**wire["hardware"], "device_kind": "tpu"}), ("signature", bytes(65))]:
        with pytest.raises((InvalidMessage, LimitExceeded)):
            CapacityRecord.from_bytes(canonical_pack({**wire, field: value}))
    with pytest.raises(LimitExceeded):
        CapacityRecord.from_bytes(canonical_pack({**wire, "addrs": ["/ip4/1.1.1.1"] * (MAX_ADDRS + 1)}))
    with pytest.raises(InvalidMessage):
        CapacityRecord.from_bytes(bytes(70_000))


@given(
    addrs=st.lists(st.text(min_size=1, max_size=40), max_size=MAX_ADDRS),
    throughput=st.floats(0, 1e9),
    cache=st.integers(0, 2**64 - 1),
    state=st.sampled_from(["joining", "online", "draining"]),
    seq=st.integers(0, 2**64 - 1),
    ttl=st.floats(1, RECORD_MAX_TTL_S),
    device=st.sampled_from(["cpu", "cuda"]),
)
@settings(max_examples=50, deadline=None)
def test_record_round_trip_property(addrs: list, throughput: float, cache: int, state: str, seq: int, ttl: float, device: str) -> None:
    ident = Identity.from_seed(b"\x07" * 32)
    record = make_record(
        ident, addrs=tuple(addrs), throughput=throughput, cache_tokens_left=cache, state=state, seq=seq,
        expires_at=NOW + ttl, hardware=Hardware(device, "dev", 10, 5),
    )
    signed = sign_record(ident, record)
    assert verify_record(signed.to_bytes(), now=NOW, key=capacity_key(ident.peer_id)) == signed


def test_gpus_travel_in_the_record_and_a_cpu_record_keeps_its_old_form():
    from protocol.records import Gpu, Hardware

    cpu = Hardware("cpu", "x86 x8", 1 << 34, 1 << 33)
    assert "gpus" not in cpu.to_wire()  # readable by nodes older than the field
    assert Hardware.from_wire(cpu.to_wire()) == cpu
    gpus = (Gpu("NVIDIA A100-SXM4-80GB", 80 << 30, 70 << 30, "8.0", True), Gpu("Tesla V100", 16 << 30, 1 << 30, "7.0", False))
    hw = Hardware("cuda", "NVIDIA A100-SXM4-80GB (1 of 2 GPUs)", 80 << 30, 70 << 30, gpus)
    assert Hardware.from_wire(hw.to_wire()) == hw and len(hw.to_wire()["gpus"]) == 2
    for bad in ({**hw.to_wire(), "gpus": "many"}, {**hw.to_wire(), "gpus": [{"name": "x"}]},
                {**hw.to_wire(), "gpus": [{**hw.to_wire()["gpus"][0], "bf16": 1}]}):
        with pytest.raises(ShizaError):
            Hardware.from_wire(bad)
