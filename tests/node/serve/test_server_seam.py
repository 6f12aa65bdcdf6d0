"""SpanServer's session handlers through in-memory streams (node/net/memory.py): a real engine,
real receipts, no node process and no libp2p. The peer side is written by hand here, frame by
frame, so each test states exactly what a client sends and what the server must answer."""

from __future__ import annotations

import struct
from contextlib import asynccontextmanager
from typing import AsyncIterator

import pytest
import trio

from protocol.codec import Tensor
from protocol.errors import (BadShape, Busy, FrameTooLarge, InvalidMessage, MalformedFrame, SessionClosed, SpanNotServed,
                             Timeout, UnknownModel)
from protocol.ids import INFERENCE_PROTOCOL, MAX_FRAME_BYTES
from protocol.messages import (CloseSession, Closed, Countersign, Error, OpenSession, SessionOpened, Step,
                               StepResult)
from protocol.receipts import Receipt, countersign_receipt, verify_receipt

from node.ledger.store import Ledger
from node.net.memory import open_memory_network
from node.net.streams import FramedStream, StreamBroken
from node.net.wire import int64_tensor, int64_values, recv_message, send_message
from node.serve.limits import NodeShares
from node.serve.server import ServerLimits, SpanServer

from tests.node.client.inproc import engine, identity, make_server, reference

PROMPT = [1, 504, 3458, 282, 4649]
CLIENT = identity("hand-written client")


@asynccontextmanager
async def serving(source, span=(0, 6), ledger: Ledger | None = None, **kwargs) -> AsyncIterator[tuple]:
    """A SpanServer for ``span`` of ``source`` on a memory network: (server, open_stream)."""
    server = make_server(engine(source, *span), identity("server"), source.num_layers, ledger=ledger, **kwargs)
    async with open_memory_network() as net:
        net.set_handler(server.accounting.identity.peer_id, INFERENCE_PROTOCOL, server.handle_inference)
        connector = net.connector(CLIENT.peer_id)

        async def open_stream() -> FramedStream:
            return await connector.open_stream(server.accounting.identity.peer_id, INFERENCE_PROTOCOL)

        yield server, open_stream


async def _open(open_stream, model_id: str, start: int = 0, end: int = 6, max_length: int = 32) -> tuple:
    stream = await open_stream()
    await send_message(stream, OpenSession(model_id, start, end, max_length))
    opened = await recv_message(stream, 10)
    assert isinstance(opened, SessionOpened), opened
    return stream, opened


def _step(n: int, ids: list[int], pos0: int) -> Step:
    return Step(n, int64_tensor([ids]), int64_tensor([list(range(pos0, pos0 + len(ids)))]))


async def _error_then_end(stream: FramedStream) -> Error:
    """The server's Error frame, after which it ends the stream cleanly."""
    reply = await recv_message(stream, 10)
    assert isinstance(reply, Error), reply
    assert await recv_message(stream, 10) is None
    return reply


async def _idle(server: SpanServer) -> None:
    assert await server.drain(10)  # every session ended and settled


async def test_open_steps_close_and_a_countersigned_final_receipt(tiny_llama, tmp_path):
    with Ledger.open(tmp_path / "server.sqlite", identity("server")) as ledger:
        async with serving(tiny_llama, ledger=ledger) as (server, open_stream):
            stream, opened = await _open(open_stream, tiny_llama.model_id)
            assert (opened.start, opened.end, opened.hidden_size, opened.direct_port) == (0, 6, 64, None)
            expected = reference(tiny_llama, PROMPT, 2)
            first = await _send(stream, _step(0, PROMPT, 0))
            second = await _send(stream, _step(1, [first], len(PROMPT)))
            assert [first, second] == expected  # the whole model on one node: sampled tokens
            await send_message(stream, CloseSession())
            closed = await recv_message(stream, 10)
            assert isinstance(closed, Closed) and closed.receipt is not None
            receipt = verify_receipt(Receipt.from_bytes(closed.receipt))
            assert (receipt.server, receipt.client, receipt.session_id) == (
                server.accounting.identity.peer_id, CLIENT.peer_id, opened.session_id)
            assert (receipt.prefill_tokens, receipt.decode_tokens, receipt.final) == (len(PROMPT), 1, True)
            assert receipt.work_units == (len(PROMPT) + 1) * 6
            signed = countersign_receipt(CLIENT, receipt)
            await send_message(stream, Countersign(receipt.receipt_id, signed.client_sig))
            assert await recv_message(stream, 10) is None  # the server closes after the verdict
            await _idle(server)
        [entry] = list(ledger.entries())
    assert (entry.receipt_id, entry.status) == (receipt.receipt_id, "countersigned")
    verify_receipt(Receipt.from_bytes(entry.receipt), require_countersigned=True)
    assert server.stats.sessions_total == 1 and server.stats.steps_total == 2
    assert (server.stats.tokens_prefill, server.stats.tokens_decode) == (len(PROMPT), 1)


async def _send(stream: FramedStream, step: Step) -> int:
    await send_message(stream, step)
    reply = await recv_message(stream, 10)
    assert isinstance(reply, StepResult) and reply.step == step.step, reply
    (token,) = int64_values(reply.output)
    return token


async def test_checkpoint_receipts_wait_for_the_clients_verdict(tiny_llama):
    async with serving(tiny_llama, receipt_every=4) as (server, open_stream):
        stream, _ = await _open(open_stream, tiny_llama.model_id)
        await send_message(stream, _step(0, PROMPT, 0))
        reply = await recv_message(stream, 10)
        assert isinstance(reply, StepResult) and reply.receipt is not None  # 5 tokens >= 4
        checkpoint = verify_receipt(Receipt.from_bytes(reply.receipt))
        assert (checkpoint.checkpoint, checkpoint.final, checkpoint.prefill_tokens) == (0, False, len(PROMPT))
        await send_message(stream, Countersign(checkpoint.receipt_id,
                                               countersign_receipt(CLIENT, checkpoint).client_sig))
        (token,) = int64_values(reply.output)
        await _send(stream, _step(1, [token], len(PROMPT)))  # the session goes on after the verdict
        await stream.reset()
        await _idle(server)
    # The checkpoint countersigned; the decode step after it settled as the server's word only.
    assert server.stats.receipts == {"countersigned": 1, "server_only": 1}


async def test_a_malformed_frame_ends_its_session_and_the_server_serves_the_others(tiny_llama):
    async with serving(tiny_llama) as (server, open_stream):
        good, _ = await _open(open_stream, tiny_llama.model_id)
        bad, _ = await _open(open_stream, tiny_llama.model_id)
        await bad.send(struct.pack(">I", 3) + b"\xc1ab")  # 0xc1: never valid msgpack
        assert (await _error_then_end(bad)).code == MalformedFrame.code
        token = await _send(good, _step(0, PROMPT, 0))  # the other session is unaffected
        assert token == reference(tiny_llama, PROMPT, 1)[0]
        fresh, _ = await _open(open_stream, tiny_llama.model_id)  # and new ones open
        await fresh.reset()
        await good.reset()
        await _idle(server)
    assert server.stats.errors_by_code == {MalformedFrame.code: 1}
    assert server.stats.sessions_total == 3


async def _bad_after_open(stream, model_id):
    await send_message(stream, _step(1, PROMPT, 0))  # step 1 before step 0


async def _oversized_header(stream, model_id):
    await stream.send(struct.pack(">I", MAX_FRAME_BYTES + 1))


async def _unknown_model(stream, model_id):
    await send_message(stream, OpenSession("other@" + "0" * 16, 0, 6, 32))


async def _span_not_served(stream, model_id):
    await send_message(stream, OpenSession(model_id, 0, 6, 32))


async def _hidden_states_to_the_first_span(stream, model_id):
    await send_message(stream, OpenSession(model_id, 0, 3, 32))
    assert isinstance(await recv_message(stream, 10), SessionOpened)
    hidden = Tensor("float32", (1, 1, 64), bytes(256))  # the first span takes token ids
    await send_message(stream, Step(0, hidden, int64_tensor([[0]])))


async def _step_before_open(stream, model_id):
    await send_message(stream, _step(0, PROMPT, 0))


@pytest.mark.parametrize("send_bad, span, code", [
    (_bad_after_open, (0, 6), InvalidMessage.code),
    (_oversized_header, (0, 6), FrameTooLarge.code),
    (_unknown_model, (0, 6), UnknownModel.code),
    (_span_not_served, (0, 3), SpanNotServed.code),
    (_hidden_states_to_the_first_span, (0, 3), BadShape.code),
    (_step_before_open, (0, 6), InvalidMessage.code),
], ids=["wrong step", "oversized header", "unknown model", "span not served", "bad shape", "step before open"])
async def test_each_violation_gets_its_error_code_and_the_server_goes_on(tiny_llama, send_bad, span, code):
    async with serving(tiny_llama, span=span) as (server, open_stream):
        if send_bad is _bad_after_open:
            stream, _ = await _open(open_stream, tiny_llama.model_id, *span)
        else:
            stream = await open_stream()
        await send_bad(stream, tiny_llama.model_id)
        assert (await _error_then_end(stream)).code == code
        again, _ = await _open(open_stream, tiny_llama.model_id, *span)  # still serving
        await again.reset()
        await _idle(server)
    assert server.stats.errors_by_code == {code: 1}


async def test_a_stream_that_breaks_mid_session_settles_the_work_done(tiny_llama, tmp_path):
    with Ledger.open(tmp_path / "server.sqlite", identity("server")) as ledger:
        async with serving(tiny_llama, ledger=ledger) as (server, open_stream):
            stream, _ = await _open(open_stream, tiny_llama.model_id)
            await _send(stream, _step(0, PROMPT, 0))
            await stream.reset()  # the client vanished
            await _idle(server)
        [entry] = list(ledger.entries())
    receipt = Receipt.from_bytes(entry.receipt)
    assert entry.status == "server_only" and receipt.final and receipt.prefill_tokens == len(PROMPT)
    assert server.stats.sessions_open == 0


async def test_sessions_over_the_limit_are_refused_busy_while_the_others_run(tiny_llama):
    limits = ServerLimits(max_sessions=1, shares=NodeShares(queue_wait_s=0.2))  # waits 0.2 s, then Busy
    async with serving(tiny_llama, limits=limits) as (server, open_stream):
        first, _ = await _open(open_stream, tiny_llama.model_id)
        second = await open_stream()
        await send_message(second, OpenSession(tiny_llama.model_id, 0, 6, 32))
        busy = await _error_then_end(second)
        assert busy.code == Busy.code and busy.retry_after_s is not None  # load: a hint, no strike
        assert server.peers.strikes_total == 0
        await _send(first, _step(0, PROMPT, 0))
        await first.reset()
        await _idle(server)


async def test_a_silent_stream_is_ended_by_the_open_deadline(tiny_llama):
    async with serving(tiny_llama, limits=ServerLimits(open_timeout_s=0.2)) as (server, open_stream):
        silent = await open_stream()
        with trio.fail_after(10):
            try:  # Error(Timeout), or a reset: the deadline cancelled the server's read, which
                reply = await recv_message(silent, None)  # breaks a libp2p-like stream
                assert isinstance(reply, Error) and reply.code == Timeout.code, reply
            except StreamBroken:
                pass
        await _idle(server)
    assert server.stats.errors_by_code == {Timeout.code: 1}


async def test_the_server_assigns_every_session_a_fresh_id(tiny_llama, tmp_path):
    # Before: the client chose the id; reusing one after closing gave the server two checkpoint-0
    # receipts of one (server, client, session), and the ledger refused the second: unbillable.
    with Ledger.open(tmp_path / "server.sqlite", identity("server")) as ledger:
        async with serving(tiny_llama, ledger=ledger) as (server, open_stream):
            ids = []
            for _ in range(2):
                stream = await open_stream()
                await send_message(stream, OpenSession(tiny_llama.model_id, 0, 6, 32, session_id="mine"))
                opened = await recv_message(stream, 10)
                assert isinstance(opened, SessionOpened), opened
                ids.append(opened.session_id)
                await _send(stream, _step(0, PROMPT, 0))
                await send_message(stream, CloseSession())
                closed = await recv_message(stream, 10)
                assert isinstance(closed, Closed) and closed.receipt is not None
                receipt = verify_receipt(Receipt.from_bytes(closed.receipt))
                assert receipt.session_id == opened.session_id
                await send_message(stream, Countersign(receipt.receipt_id,
                                                       countersign_receipt(CLIENT, receipt).client_sig))
                assert await recv_message(stream, 10) is None
            await _idle(server)
        entries = list(ledger.entries())
    assert "mine" not in ids and len(set(ids)) == 2
    assert sorted(e.session_id for e in entries if e.status == "countersigned") == sorted(ids)


async def test_an_engine_failure_reaches_the_peer_without_the_engine_s_words(tiny_llama):
    # Before: the engine's exception text (paths, devices, library internals) went to the peer.
    from node.engine.errors import EngineError
    from node.engine.faults import FaultyEngine, Faults

    class Failing(FaultyEngine):
        def run_steps(self, steps):
            return [EngineError("CUDA error in /home/operator/models/secret.bin") for _ in steps]

    failing = Failing(engine(tiny_llama, 0, 6), Faults())
    server = make_server(failing, identity("server"), tiny_llama.num_layers)
    async with open_memory_network() as net:
        net.set_handler(server.accounting.identity.peer_id, INFERENCE_PROTOCOL, server.handle_inference)
        connector = net.connector(CLIENT.peer_id)
        stream = await connector.open_stream(server.accounting.identity.peer_id, INFERENCE_PROTOCOL)
        await send_message(stream, OpenSession(tiny_llama.model_id, 0, 6, 32))
        assert isinstance(await recv_message(stream, 10), SessionOpened)
        await send_message(stream, _step(0, PROMPT, 0))
        error = await _error_then_end(stream)
        await _idle(server)
    assert error.code == SessionClosed.code
    assert "secret" not in error.message and "/home" not in error.message
