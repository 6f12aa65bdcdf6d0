"""A peer sending bad input gets an error code on its stream; the node keeps serving others."""

from __future__ import annotations

import struct

import msgpack
import pytest
import trio

from node.client.swarm import SwarmClient
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.net.wire import int64_tensor, recv_message, send_message
from protocol.codec import Tensor
from protocol.errors import (BadShape, FrameTooLarge, InvalidMessage, MalformedFrame, RateLimited, SpanNotServed,
                             UnknownModel)
from protocol.ids import INFERENCE_PROTOCOL, INFO_PROTOCOL, MAX_FRAME_BYTES
from protocol.messages import Error, InfoRequest, NodeInfo, OpenSession, SessionOpened, Step

PROMPT = [1, 504, 3458, 282, 4649]


async def _stream(client: SwarmClient, node):
    await client.host.connect(node.addr)
    return await client.host.open_stream(node.peer_id, INFERENCE_PROTOCOL)


async def _error_of(stream) -> Error:
    with trio.fail_after(30):
        reply = await recv_message(stream, 30)
    assert isinstance(reply, Error), reply
    # After the error the server closes the stream.
    with trio.fail_after(30):
        assert await stream.read_frame(1024) is None
    return reply


@pytest.fixture
def model_id(tiny_model):
    return resolve_model(str(tiny_model)).model_id


async def test_malformed_frame(tiny_swarm):
    async with SwarmClient.open([tiny_swarm[0].addr]) as client:
        stream = await _stream(client, tiny_swarm[0])
        garbage = b"\xc1\xc1\xc1 not msgpack"
        await stream.send(struct.pack(">I", len(garbage)) + garbage)
        assert (await _error_of(stream)).code == MalformedFrame.code


async def test_oversized_frame(tiny_swarm):
    async with SwarmClient.open([tiny_swarm[0].addr]) as client:
        stream = await _stream(client, tiny_swarm[0])
        await stream.send(struct.pack(">I", MAX_FRAME_BYTES + 1))
        assert (await _error_of(stream)).code == FrameTooLarge.code


async def test_message_of_unknown_type(tiny_swarm):
    async with SwarmClient.open([tiny_swarm[0].addr]) as client:
        stream = await _stream(client, tiny_swarm[0])
        payload = msgpack.packb({"v": 0, "t": "launch_missiles"})
        await stream.send(struct.pack(">I", len(payload)) + payload)
        assert (await _error_of(stream)).code in (InvalidMessage.code, 4)


async def test_unknown_model(tiny_swarm):
    node = tiny_swarm[0]
    async with SwarmClient.open([node.addr]) as client:
        stream = await _stream(client, node)
        await send_message(stream, OpenSession("nonexistent@0123456789abcdef", 0, 2, 64))
        assert (await _error_of(stream)).code == UnknownModel.code


async def test_span_not_served(tiny_swarm, model_id):
    node = tiny_swarm[0]
    async with SwarmClient.open([node.addr]) as client:
        stream = await _stream(client, node)
        await send_message(stream, OpenSession(model_id, 0, 4, 64))
        assert (await _error_of(stream)).code == SpanNotServed.code


async def test_hidden_states_of_wrong_shape(tiny_swarm, model_id):
    node = tiny_swarm[1]  # a middle span: takes hidden states [B, T, 64]
    async with SwarmClient.open([node.addr]) as client:
        stream = await _stream(client, node)
        await send_message(stream, OpenSession(model_id, 2, 4, 64))
        assert isinstance(await recv_message(stream, 30), SessionOpened)
        wrong = Tensor("float32", (1, 3, 65), bytes(4 * 3 * 65))
        await send_message(stream, Step(0, wrong, int64_tensor([[0, 1, 2]])))
        assert (await _error_of(stream)).code == BadShape.code


def _nested_empty_arrays(n_bytes: int) -> bytes:
    """A frame of arrays of 65535 empty arrays, within every size, length and nesting limit:
    decoded, each byte is a Python list (16 MiB grew a node by ~1 GiB and froze it)."""
    inner = b"\xdc\xff\xff" + b"\x90" * 65535
    k = n_bytes // len(inner)
    payload = b"\xdc" + k.to_bytes(2, "big") + inner * k
    return struct.pack(">I", len(payload)) + payload


async def test_nested_array_frames_to_the_info_protocol_are_refused_and_earn_a_ban(tiny_swarm, tiny_model):
    node = tiny_swarm[1]
    # The attack frame's header and its first 256 KiB: the node must refuse on the header
    # (before, it read all 16 MiB and then decoded ~16 million lists on its event loop).
    attack = _nested_empty_arrays(16 * 2**20)[:256 * 2**10]
    async with SwarmClient.open([node.addr]) as attacker:
        await attacker.host.connect(node.addr)
        for _ in range(3):  # the default PeerLimits: three strikes, then a ban
            stream = await attacker.host.open_stream(node.peer_id, INFO_PROTOCOL)
            await stream.send(attack)
            assert (await _error_of(stream)).code == FrameTooLarge.code
        banned = await attacker.host.open_stream(node.peer_id, INFO_PROTOCOL)
        assert (await _error_of(banned)).code == RateLimited.code
    async with SwarmClient.open([node.addr]) as honest:  # everyone else is still served
        await honest.host.connect(node.addr)
        stream = await honest.host.open_stream(node.peer_id, INFO_PROTOCOL)
        await send_message(stream, InfoRequest())
        with trio.fail_after(30):
            assert isinstance(await recv_message(stream, 30), NodeInfo)
    assert node.proc.poll() is None, node.log_tail()


async def test_node_keeps_serving_after_bad_input(tiny_swarm, tiny_model):
    """Every node got bad input above (same module swarm); a clean generation still matches."""
    source = resolve_model(str(tiny_model))
    async with SwarmClient.open([tiny_swarm[0].addr]) as client:
        bad = await _stream(client, tiny_swarm[0])
        await bad.send(b"\x00\x00\x00\x03abc")
        result = await client.generate(source.model_id, [PROMPT], max_new_tokens=5)
    assert result.token_ids[0] == reference_greedy(source, PROMPT, 5)
    for node in tiny_swarm:
        assert node.proc.poll() is None, node.log_tail()
