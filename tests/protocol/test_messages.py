from __future__ import annotations

import array

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    BadShape,
    Closed,
    CloseSession,
    Error,
    FrameDecoder,
    InfoRequest,
    InvalidMessage,
    LimitExceeded,
    MAX_ADDRS,
    MAX_SPANS,
    NodeInfo,
    OpenSession,
    SamplingParams,
    ServedSpan,
    SessionOpened,
    Step,
    StepResult,
    Tensor,
    UnknownMessageType,
    UnsupportedVersion,
    decode_message,
    encode_message,
    message_to_wire,
    unpack,
)

MODEL = "SmolLM2-135M-Instruct@0123456789abcdef"


def ids(*shape: int) -> Tensor:
    n = 1
    for d in shape:
        n *= d
    return Tensor("int64", shape, array.array("q", range(n)).tobytes())


def hidden(b: int, t: int, h: int, dtype: str = "float32") -> Tensor:
    size = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    return Tensor(dtype, (b, t, h), bytes(b * t * h * size))


EXAMPLES = [
    InfoRequest(),
    NodeInfo("12D3KooWpeer", ("/ip4/127.0.0.1/tcp/1",), "0.1.0", "online", (ServedSpan(MODEL, 0, 10, 30),), b"rec"),
    NodeInfo("12D3KooWpeer", (), "0.1.0", "joining", (), None),
    OpenSession(MODEL, 0, 10, 2048),
    OpenSession(MODEL, 10, 30, 512, batch_size=4, sampling=SamplingParams(0.7, 0.9, 42), session_id="abc"),
    SessionOpened("abc", 0, 10, 576),
    OpenSession(MODEL, 0, 10, 64, direct_key=b"k" * 32),
    SessionOpened("abc", 0, 10, 576, direct_port=40123, direct_key=b"n" * 32),
    Step(0, ids(2, 5), ids(2, 5)),
    Step(3, hidden(2, 1, 8), ids(2, 1), ids(2, 1)),
    Step(4, hidden(1, 2, 4, "bfloat16"), ids(1, 2)),
    StepResult(0, hidden(2, 5, 8)),
    StepResult(1, ids(2)),
    CloseSession(),
    Closed(),
    Error(25, "busy: KV cache full"),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip_through_frames(msg: object) -> None:
    frame = encode_message(msg)  # type: ignore[arg-type]
    (obj,) = FrameDecoder().feed(frame)
    assert obj["v"] == 0 and obj["t"] == type(msg).TYPE
    assert decode_message(obj) == msg


def test_optional_fields_may_be_absent() -> None:
    wire = {"v": 0, "t": "open", "model_id": MODEL, "start": 0, "end": 2, "max_length": 8}
    msg = decode_message(wire)
    assert msg == OpenSession(MODEL, 0, 2, 8)
    wire = {"v": 0, "t": "open", "model_id": MODEL, "start": 0, "end": 2, "max_length": 8, "sampling": {"temperature": 1}}
    assert decode_message(wire).sampling == SamplingParams(1.0)  # type: ignore[union-attr]
    wire = message_to_wire(Step(0, ids(1, 1), ids(1, 1)))
    del wire["mask"]
    assert decode_message(wire) == Step(0, ids(1, 1), ids(1, 1))


@given(
    st.floats(0, 10),
    st.floats(0, 1, exclude_min=True),
    st.none() | st.integers(0, 2**64 - 1),
    st.integers(0, 100),
    st.integers(1, 100),
    st.integers(1, 1024),
)
@settings(max_examples=100, deadline=None)
def test_open_session_round_trip(temp: float, top_p: float, seed: int | None, start: int, n: int, batch: int) -> None:
    msg = OpenSession(MODEL, start, start + n, 4096, batch, SamplingParams(temp, top_p, seed), "sid")
    assert decode_message(unpack(encode_message(msg)[4:])) == msg


def test_unknown_version_and_type() -> None:
    with pytest.raises(UnsupportedVersion):
        decode_message({"v": 1, "t": "info_req"})
    with pytest.raises(InvalidMessage):
        decode_message({"t": "info_req"})
    with pytest.raises(InvalidMessage):
        decode_message({"v": "0", "t": "info_req"})
    with pytest.raises(UnknownMessageType):
        decode_message({"v": 0, "t": "launch_missiles"})
    with pytest.raises(InvalidMessage):
        decode_message({"v": 0})
    with pytest.raises(InvalidMessage):
        decode_message([0, "info_req"])


GOOD_OPEN = {"v": 0, "t": "open", "model_id": MODEL, "start": 0, "end": 2, "max_length": 8}


@pytest.mark.parametrize(
    "change",
    [
        {"model_id": None},
        {"model_id": ""},
        {"model_id": 5},
        {"start": -1},
        {"start": 2},
        {"start": True},
        {"end": 1.5},
        {"max_length": 0},
        {"batch_size": 0},
        {"batch_size": 10**6},
        {"sampling": {"temperature": -1}},
        {"sampling": {"temperature": 11}},
        {"sampling": {"temperature": float("nan")}},
        {"sampling": {"top_p": 0}},
        {"sampling": {"top_p": 1.5}},
        {"sampling": {"seed": -1}},
        {"sampling": {"seed": 1.0}},
        {"sampling": {"nucleus": 1}},
        {"sampling": [1]},
        {"session_id": 3},
        {"unknown_field": 1},
        {"direct_key": b"short"},
        {"direct_key": "k" * 32},
    ],
)
def test_open_session_field_rejections(change: dict) -> None:
    wire = {**GOOD_OPEN}
    for key, value in change.items():
        if value is None:
            del wire[key]
        else:
            wire[key] = value
    with pytest.raises(InvalidMessage):
        decode_message(wire)


def test_every_message_rejects_missing_and_mistyped_fields() -> None:
    for msg in EXAMPLES:
        wire = message_to_wire(msg)  # type: ignore[arg-type]
        for key in wire:
            if key in ("v", "t"):
                continue
            broken = {k: v for k, v in wire.items() if k != key}
            if type(msg)._OPTIONAL.get(key, "absent") == "absent":  # type: ignore[attr-defined]
                with pytest.raises(InvalidMessage):
                    decode_message(broken)
            broken[key] = {"wrong": "type"}
            with pytest.raises((InvalidMessage, BadShape)):
                decode_message(broken)


def test_node_info_limits() -> None:
    wire = message_to_wire(EXAMPLES[1])
    wire["addrs"] = ["/ip4/1.1.1.1/tcp/1"] * (MAX_ADDRS + 1)
    with pytest.raises(LimitExceeded):
        decode_message(wire)
    wire = message_to_wire(EXAMPLES[1])
    wire["spans"] = [ServedSpan(MODEL, 0, 1, 1).to_wire()] * (MAX_SPANS + 1)
    with pytest.raises(LimitExceeded):
        decode_message(wire)
    wire = message_to_wire(EXAMPLES[1])
    wire["state"] = "sleeping"
    with pytest.raises(InvalidMessage):
        decode_message(wire)
    wire["state"] = "online"
    wire["spans"] = [{"model_id": MODEL, "start": 0, "end": 10, "num_layers": 5}]
    with pytest.raises(InvalidMessage):
        decode_message(wire)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Step(0, ids(2, 5), ids(2, 4)),  # positions do not match input
        lambda: Step(0, ids(2, 5), ids(2, 5), ids(1, 5)),  # mask does not match
        lambda: Step(0, ids(10), ids(10)),  # token ids must be [B, T]
        lambda: Step(0, Tensor("float32", (2, 3), bytes(24)), ids(2, 3)),  # hidden states are [B, T, H]
        lambda: StepResult(0, ids(2, 3, 1)),  # sampled ids are [B] or [B, T]
        lambda: StepResult(0, Tensor("float32", (2, 3), bytes(24))),
    ],
)
def test_step_shape_rejections(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadShape):
        build()


def test_step_dtype_rejections() -> None:
    with pytest.raises(InvalidMessage):
        Step(0, Tensor("int32", (1, 2), bytes(8)), ids(1, 2))
    with pytest.raises(InvalidMessage):
        Step(0, ids(1, 2), Tensor("int32", (1, 2), bytes(8)))
    with pytest.raises(InvalidMessage):
        Step(-1, ids(1, 2), ids(1, 2))
    with pytest.raises(InvalidMessage):
        StepResult(0, Tensor("int32", (2,), bytes(8)))


def test_tensor_byte_length_mismatch_on_the_wire() -> None:
    wire = message_to_wire(Step(0, ids(1, 2), ids(1, 2)))
    wire["input"] = {**wire["input"], "data": bytes(15)}
    with pytest.raises(BadShape):
        decode_message(unpack(msgpack.packb(wire)))


def test_error_helpers() -> None:
    err = Error.from_exception(BadShape("x" * 10_000))
    assert err.code == 22 and len(err.message) == 4096
    exc = err.to_exception()
    assert isinstance(exc, BadShape)
    internal = Error.from_exception(RuntimeError("secret path /home/me"))
    assert internal.code == 99 and "secret" not in internal.message
    unknown = Error(777, "future").to_exception()
    assert unknown.code == 777 and str(unknown) == "future"
    with pytest.raises(InvalidMessage):
        Error(-1, "x")


def test_error_retry_hint_round_trips_and_is_absent_without_one() -> None:
    from protocol.errors import Busy

    plain = Error(25, "busy")
    assert "retry_after_s" not in message_to_wire(plain)  # the frame an old peer sent and reads
    assert decode_message(unpack(msgpack.packb({"v": 0, "t": "error", "code": 25, "message": "busy"}))) == plain
    hinted = Error.from_exception(Busy("share full", retry_after_s=2.5))
    back = decode_message(unpack(encode_message(hinted)[4:]))
    assert back == hinted and back.retry_after_s == 2.5
    exc = back.to_exception()
    assert isinstance(exc, Busy) and exc.retry_after_s == 2.5
    for bad in (-1.0, float("inf"), 3601.0, "2", True):
        with pytest.raises(InvalidMessage):
            decode_message(unpack(msgpack.packb({"v": 0, "t": "error", "code": 25, "message": "m",
                                                 "retry_after_s": bad})))


def test_local_construction_normalises() -> None:
    info = NodeInfo("p", ["/ip4/1.1.1.1/tcp/1"], "v", "online", [])  # type: ignore[arg-type]
    assert info.addrs == ("/ip4/1.1.1.1/tcp/1",) and info.spans == ()
    assert SamplingParams(1, 1).temperature == 1.0
    assert isinstance(SamplingParams(1, 1).temperature, float)
    with pytest.raises(TypeError):
        message_to_wire("not a message")  # type: ignore[arg-type]


@pytest.mark.parametrize("fields", [
    {"direct_port": 1234},  # a port without a key
    {"direct_key": b"n" * 32},  # a key without a port
    {"direct_port": 0, "direct_key": b"n" * 32},
    {"direct_port": 70000, "direct_key": b"n" * 32},
    {"direct_port": 1234, "direct_key": b"n" * 31},
])
def test_direct_offer_rejections(fields: dict) -> None:
    wire = {**message_to_wire(SessionOpened("abc", 0, 10, 576)), **fields}
    with pytest.raises(InvalidMessage):
        decode_message(wire)

