from __future__ import annotations

import array
import struct

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import (
    MAX_FRAME_BYTES,
    MAX_LIST_LEN,
    MAX_MAP_LEN,
    MAX_NESTING,
    MAX_STR_LEN,
    MAX_TENSOR_DIMS,
    MAX_TENSOR_ELEMENTS,
    BadShape,
    FrameDecoder,
    FrameTooLarge,
    InvalidMessage,
    LimitExceeded,
    MalformedFrame,
    ShizaError,
    Tensor,
    canonical_pack,
    encode_frame,
    itemsize,
    pack,
    unpack,
)
from protocol.ids import MAX_DECODED_OBJECTS

scalars = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=20)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=30,
)


def nested(depth: int) -> object:
    obj: object = 1
    for _ in range(depth):
        obj = [obj]
    return obj


@given(values)
@settings(max_examples=200, deadline=None)
def test_pack_unpack_round_trip(obj: object) -> None:
    assert unpack(pack(obj)) == obj


@given(st.dictionaries(st.text(max_size=8), values, max_size=8))
@settings(max_examples=100, deadline=None)
def test_canonical_pack_ignores_insertion_order(obj: dict) -> None:
    reordered = dict(reversed(list(obj.items())))
    assert canonical_pack(obj) == canonical_pack(reordered)
    assert unpack(canonical_pack(obj)) == obj


def test_canonical_pack_sorts_nested_keys() -> None:
    assert canonical_pack({"b": {"y": 1, "x": 2}, "a": (1, 2)}) == msgpack.packb(
        {"a": [1, 2], "b": {"x": 2, "y": 1}}, use_bin_type=True
    )


@given(st.lists(st.dictionaries(st.text(max_size=5), scalars, max_size=4), max_size=6), st.data())
@settings(max_examples=100, deadline=None)
def test_frame_decoder_any_chunking(objs: list, data: st.DataObject) -> None:
    stream = b"".join(encode_frame(o) for o in objs)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    decoder = FrameDecoder()
    got = []
    prev = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[prev:cut])
        prev = cut
    assert got == objs
    assert decoder.buffered == 0


def test_frame_header_is_big_endian_length() -> None:
    frame = encode_frame({"a": 1})
    assert struct.unpack(">I", frame[:4])[0] == len(frame) - 4


def test_oversize_frame_header_rejected_before_payload() -> None:
    decoder = FrameDecoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(struct.pack(">I", MAX_FRAME_BYTES + 1))
    with pytest.raises(MalformedFrame):  # a failed decoder stays failed
        decoder.feed(encode_frame({"a": 1}))


def test_custom_frame_limit_and_empty_frame() -> None:
    with pytest.raises(FrameTooLarge):
        FrameDecoder(max_frame_bytes=10).feed(encode_frame({"a": "x" * 20}))
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_frame_with_trailing_or_truncated_payload() -> None:
    payload = msgpack.packb({"a": 1}) + b"\x01"
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)
    payload = msgpack.packb({"a": "hello"})[:-2]
    with pytest.raises(MalformedFrame):
        FrameDecoder().feed(struct.pack(">I", len(payload)) + payload)


@pytest.mark.parametrize(
    "data",
    [b"\xc1", b"\xd9\x02\xff\xfe", msgpack.packb(msgpack.ExtType(5, b"")), msgpack.packb(msgpack.ExtType(5, b"ab")),
     msgpack.packb(msgpack.Timestamp(1, 0)), msgpack.packb({1: 2}), b""],
)
def test_malformed_payloads(data: bytes) -> None:
    with pytest.raises(ShizaError) as info:
        unpack(data)
    assert isinstance(info.value, (MalformedFrame, LimitExceeded))


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_unpack_never_leaks_foreign_exceptions(data: bytes) -> None:
    try:
        unpack(data)
    except ShizaError:
        pass


def test_nesting_limit() -> None:
    assert unpack(pack(nested(MAX_NESTING))) == nested(MAX_NESTING)
    raw = msgpack.packb(nested(MAX_NESTING + 1))
    with pytest.raises(LimitExceeded, match="nesting"):
        unpack(raw)
    with pytest.raises(LimitExceeded, match="nesting"):
        unpack(b"\x91" * 5000 + b"\x01")
    with pytest.raises(LimitExceeded):
        pack(nested(MAX_NESTING + 1))


def test_string_list_map_limits() -> None:
    assert unpack(pack("x" * MAX_STR_LEN)) == "x" * MAX_STR_LEN
    for obj, what in [
        ("x" * (MAX_STR_LEN + 1), "str"),
        ("é" * (MAX_STR_LEN // 2 + 1), "str"),
        ([0] * (MAX_LIST_LEN + 1), "array"),
        ({str(i): i for i in range(MAX_MAP_LEN + 1)}, "map"),
    ]:
        with pytest.raises(LimitExceeded, match=what):
            unpack(msgpack.packb(obj))
        with pytest.raises(LimitExceeded):
            pack(obj)


def _nested_empty_arrays(n_bytes: int) -> bytes:
    """The attack frame: arrays of 65535 empty arrays (one byte each, one list object each),
    within every size, length and nesting limit."""
    inner = b"\xdc\xff\xff" + b"\x90" * 65535
    k = n_bytes // len(inner)
    return b"\xdc" + k.to_bytes(2, "big") + inner * k


def test_decoded_objects_are_bounded_per_frame() -> None:
    import tracemalloc

    attack = _nested_empty_arrays(2 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(LimitExceeded, match="MAX_DECODED_OBJECTS"):
            unpack(attack)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Unbounded, these 2 MiB became ~2M list objects (over 120 MiB); the cap stops decoding
    # after MAX_DECODED_OBJECTS objects (plus at most one array's elements).
    assert peak < 32 * 2**20, peak
    # The same bound on the sending side, and everything under it still decodes.
    with pytest.raises(LimitExceeded, match="MAX_DECODED_OBJECTS"):
        pack([[[] for _ in range(1024)] for _ in range(MAX_DECODED_OBJECTS // 1024)])
    assert unpack(pack([0] * MAX_LIST_LEN)) == [0] * MAX_LIST_LEN
    assert len(unpack(pack({"a": [[0] * 1000 for _ in range(100)]}))["a"]) == 100


def test_huge_announced_array_rejected_without_allocating() -> None:
    with pytest.raises(LimitExceeded):
        unpack(b"\xdd\xff\xff\xff\xff")


def test_pack_rejects_unencodable_types_and_big_ints() -> None:
    with pytest.raises(InvalidMessage):
        pack({"a": object()})
    with pytest.raises(InvalidMessage):
        pack({1: 2})
    with pytest.raises(LimitExceeded):
        pack(2**64)


# Tensors -------------------------------------------------------------------------------


def test_tensor_round_trip_without_copy() -> None:
    data = array.array("f", range(12)).tobytes()
    t = Tensor("float32", (2, 3, 2), data)
    wire = unpack(pack(t.to_wire()))
    back = Tensor.from_wire(wire)
    assert back == t
    assert back.data is wire["data"]  # the bytes msgpack made, not a copy
    assert back.numel == 12 and back.nbytes == 48


def test_tensor_from_memoryview_packs_raw_bytes() -> None:
    arr = array.array("f", [1.0, 2.0, 3.0, 4.0])
    t = Tensor("float32", (1, 4), memoryview(arr))
    assert Tensor.from_wire(unpack(pack(t.to_wire()))).data == arr.tobytes()


def test_itemsizes() -> None:
    assert [itemsize(d) for d in ("float32", "float16", "bfloat16", "int64", "int32")] == [4, 2, 2, 8, 4]
    with pytest.raises(InvalidMessage):
        itemsize("float64")


def test_tensor_rejections() -> None:
    with pytest.raises(BadShape):
        Tensor("int64", (2, 3), bytes(47))
    with pytest.raises(InvalidMessage):
        Tensor("float64", (1,), bytes(8))
    with pytest.raises(LimitExceeded, match="dims"):
        Tensor("int32", (1,) * (MAX_TENSOR_DIMS + 1), bytes(4))
    with pytest.raises(LimitExceeded, match="ELEMENTS"):
        Tensor("int32", (MAX_TENSOR_ELEMENTS + 1,), b"")
    with pytest.raises(LimitExceeded, match="ELEMENTS"):  # no overflow trick via huge dims
        Tensor("int32", (2**40, 2**40, 0), b"")
    with pytest.raises(InvalidMessage):
        Tensor("int32", (-1,), b"")
    with pytest.raises(InvalidMessage):
        Tensor("int32", (True,), bytes(4))
    with pytest.raises(BadShape):
        Tensor("int32", (2,), memoryview(bytes(16))[::2])


@pytest.mark.parametrize(
    "wire",
    [
        {"dtype": "int64", "shape": [2], "data": bytes(15)},
        {"dtype": "int64", "shape": [2], "data": "x" * 16},
        {"dtype": "int64", "shape": 2, "data": bytes(16)},
        {"dtype": 1, "shape": [2], "data": bytes(16)},
        {"dtype": "int64", "shape": [2]},
        {"dtype": "int64", "shape": [2], "data": bytes(16), "extra": 1},
        [1, 2],
    ],
)
def test_tensor_from_wire_rejections(wire: object) -> None:
    with pytest.raises((InvalidMessage, BadShape)):
        Tensor.from_wire(wire)
