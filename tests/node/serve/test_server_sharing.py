"""SpanServer's node-wide sharing (node/serve/limits.py) with the real tiny engine over memory
streams, one connector per client identity: fresh identities cannot starve a peer that has
countersigned receipts, and opens beyond a share are load (queue, then Busy with a hint), never
a strike. Asserts by counting answers and strikes, not by timing."""

from __future__ import annotations

import trio
import trio.testing

from protocol.errors import Busy
from protocol.ids import INFERENCE_PROTOCOL
from protocol.messages import Countersign, Error, OpenSession, SessionOpened, StepResult
from protocol.receipts import Receipt, countersign_receipt, verify_receipt

from node.net.memory import open_memory_network
from node.net.wire import recv_message, send_message
from node.serve.limits import NodeShares
from node.serve.server import ServerLimits

from tests.node.client.inproc import engine, identity, make_server
from tests.node.serve.test_server_seam import PROMPT, _idle, _step
from tests.polling import eventually

SYBILS = 8  # fresh identities, each opening the per-peer maximum of sessions


async def test_eight_fresh_identities_cannot_starve_a_peer_with_countersigned_history(tiny_llama):
    # Before: 8 keys x 8 sessions took all 64 slots and the paying peer's open was Busy.
    limits = ServerLimits(shares=NodeShares(queue_wait_s=1.0))
    server = make_server(engine(tiny_llama, 0, 6), identity("server"), tiny_llama.num_layers,
                         limits=limits, receipt_every=4)
    server_id = server.accounting.identity.peer_id
    paid = identity("paying client")
    async with open_memory_network() as net:
        net.set_handler(server_id, INFERENCE_PROTOCOL, server.handle_inference)
        conn = net.connector(paid.peer_id)

        # History: one session whose checkpoint receipt the peer countersigns.
        stream = await conn.open_stream(server_id, INFERENCE_PROTOCOL)
        await send_message(stream, OpenSession(tiny_llama.model_id, 0, 6, 32))
        assert isinstance(await recv_message(stream, 10), SessionOpened)
        await send_message(stream, _step(0, PROMPT, 0))
        reply = await recv_message(stream, 10)
        assert isinstance(reply, StepResult) and reply.receipt is not None
        checkpoint = verify_receipt(Receipt.from_bytes(reply.receipt))
        await send_message(stream, Countersign(checkpoint.receipt_id, countersign_receipt(paid, checkpoint).client_sig))
        await eventually(lambda: server.stats.receipts.get("countersigned"), what="the countersignature stored")
        await stream.reset()
        await eventually(lambda: server.stats.sessions_open == 0, what="the paid session closed")

        opened: list = []
        answers: dict[str, int] = {}

        async def sybil_open(name: str) -> None:
            s = await net.connector(identity(name).peer_id).open_stream(server_id, INFERENCE_PROTOCOL)
            await send_message(s, OpenSession(tiny_llama.model_id, 0, 6, 32))
            got = await recv_message(s, 30)
            if isinstance(got, SessionOpened):
                opened.append(s)
                answers["opened"] = answers.get("opened", 0) + 1
            else:
                assert isinstance(got, Error) and got.code == Busy.code and got.retry_after_s, got
                answers["busy"] = answers.get("busy", 0) + 1
                await s.reset()

        async with trio.open_nursery() as nursery:
            for k in range(SYBILS):
                for _ in range(limits.peer.max_sessions):
                    nursery.start_soon(sybil_open, f"sybil {k}")
            await eventually(lambda: answers.get("opened", 0) >= 48, what="the sybils' sessions")
            await trio.testing.wait_all_tasks_blocked(0.05)  # every sybil open answered or queued

            # The paying peer still opens at once and is served, while the sybils wait.
            mine = await conn.open_stream(server_id, INFERENCE_PROTOCOL)
            await send_message(mine, OpenSession(tiny_llama.model_id, 0, 6, 32))
            with trio.fail_after(5):
                answer = await recv_message(mine, 5)
            assert isinstance(answer, SessionOpened), answer
            await send_message(mine, _step(0, PROMPT, 0))
            assert isinstance(await recv_message(mine, 10), StepResult)
            await mine.reset()

        # A quarter of the slots stayed for peers with history; the extra opens were load.
        assert answers == {"opened": 48, "busy": SYBILS * limits.peer.max_sessions - 48}
        assert (server.peers.strikes_total, server.peers.bans_total) == (0, 0)
        for s in opened:
            await s.reset()
        await _idle(server)
