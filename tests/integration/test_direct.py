"""Sessions over the direct activation channel of real node processes (SPEC.md 9.5)."""

from __future__ import annotations

import trio

from node.client.swarm import SwarmClient
from node.net.direct import connect
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.net.host import StreamBroken
from node.net.wire import int64_tensor, recv_message, send_message
from protocol import direct as wire
from protocol.ids import INFERENCE_PROTOCOL
from protocol.messages import OpenSession, SessionOpened, Step, StepResult

PROMPT = [1, 504, 3458, 282, 4649, 314]


async def test_direct_and_libp2p_paths_give_the_reference_tokens(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, 10)
    for direct in (True, False):
        async with SwarmClient.open([tiny_swarm[0].addr], direct=direct) as client:
            route = await client.wait_for_route(source.model_id, 60)
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=10, route=route)
            assert result.token_ids[0] == expected, f"direct={direct}"
            assert client.direct_sessions == (3 if direct else 0)
            assert len(result.receipts) >= 3  # receipts are issued and countersigned either way


async def _open_direct(client: SwarmClient, node, model_id: str):
    """A raw session on the first span that asks for a direct channel; returns (stream, reply, keys)."""
    await client.host.connect(node.addr)
    stream = await client.host.open_stream(node.peer_id, INFERENCE_PROTOCOL)
    pk, sk = wire.keypair()
    await send_message(stream, OpenSession(model_id, node.info["start"], node.info["end"], 32,
                                           direct_key=pk))
    reply = await recv_message(stream, 30)
    assert isinstance(reply, SessionOpened) and reply.direct_port is not None
    return stream, reply, (pk, sk)


async def test_a_tampered_direct_frame_ends_that_session_only(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    node = tiny_swarm[0]
    async with SwarmClient.open([node.addr]) as client:
        stream, opened, (pk, sk) = await _open_direct(client, node, source.model_id)
        channel = await connect("127.0.0.1", opened.direct_port, opened.direct_key, node.peer_id, pk, sk, 30)
        ids = int64_tensor([PROMPT])
        await send_message(channel, Step(0, ids, int64_tensor([list(range(len(PROMPT)))])))
        first = await recv_message(channel, 30)
        assert isinstance(first, StepResult) and first.output.shape == (1, len(PROMPT), 64)
        # Flip one byte of the next sealed frame on the socket: the node must drop the channel.
        sealed = bytearray(channel._sealer.seal(b"\x00" * 64))
        sealed[-1] ^= 1
        await channel._sock.send_all(bytes(sealed))
        with trio.fail_after(30):
            try:
                assert await channel.read_frame(1 << 20) is None
            except StreamBroken:
                pass
        await stream.reset()
        # ... and go on serving everyone else, over either path.
        route = await client.wait_for_route(source.model_id, 60)
        result = await client.generate(source.model_id, [PROMPT], max_new_tokens=4, route=route)
        assert result.token_ids[0] == reference_greedy(source, PROMPT, 4)


async def test_the_direct_port_refuses_strangers(tiny_swarm, tiny_model):
    source = resolve_model(str(tiny_model))
    node = tiny_swarm[1]
    async with SwarmClient.open([node.addr]) as client:
        stream, opened, _ = await _open_direct(client, node, source.model_id)
        await stream.reset()
        thief_pk, thief_sk = wire.keypair()  # no session of theirs waits on this port
        try:
            await connect("127.0.0.1", opened.direct_port, opened.direct_key, node.peer_id,
                          thief_pk, thief_sk, 30)
            raise AssertionError("a stranger's hello was accepted")
        except StreamBroken:
            pass
