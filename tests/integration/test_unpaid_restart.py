"""A client's unpaid work survives the node's restart (SPEC 17, issue 15).

Attack: take a receipt and leave without countersigning it, until the node refuses you; then
wait for the node to restart. Before the fix the count lived in memory only: the restarted node
served the same client again from zero."""

from __future__ import annotations

import pytest

from node.devtools.localswarm import start_node
from node.engine.registry import resolve_model
from node.net.host import open_host
from node.net.wire import int64_tensor, recv_message, send_message
from protocol.identity import Identity
from protocol.ids import INFERENCE_PROTOCOL
from protocol.messages import Error, OpenSession, SessionOpened, Step, StepResult

pytestmark = pytest.mark.integration

FLAGS = ["--receipt-every", "4", "--max-unpaid-work", "40"]  # one 8-token prefill on 6 layers: 48


async def _take_a_receipt_and_leave(host, node, model_id) -> object:
    """Open a session, run a prefill that earns a receipt, leave without a verdict. Returns
    the node's answer to the open (SessionOpened or Error)."""
    await host.connect(node.addr)
    stream = await host.open_stream(node.peer_id, INFERENCE_PROTOCOL)
    await send_message(stream, OpenSession(model_id, 0, 6, 64))
    opened = await recv_message(stream, 30)
    if isinstance(opened, SessionOpened):
        await send_message(stream, Step(0, int64_tensor([[5] * 8]), int64_tensor([list(range(8))])))
        result = await recv_message(stream, 30)
        assert isinstance(result, StepResult) and result.receipt is not None
    await stream.reset()
    return opened


async def test_unpaid_work_is_remembered_across_a_restart(tiny_model, tmp_path):
    model_id = resolve_model(str(tiny_model)).model_id
    cheat = Identity.generate()
    node = start_node(tmp_path / "node", model=str(tiny_model), layers=(0, 6), extra_args=FLAGS)
    try:
        node.wait_ready(120)
        async with open_host(cheat.seed) as host:
            assert isinstance(await _take_a_receipt_and_leave(host, node, model_id), SessionOpened)
            # The node settles a session that broke after the stream ends, so the next open
            # may come first: leave again (bounded) until it is refused.
            for _ in range(5):
                refused = await _take_a_receipt_and_leave(host, node, model_id)
                if not isinstance(refused, SessionOpened):
                    break
        assert isinstance(refused, Error) and "unpaid" in refused.message, refused
        assert node.stop() == 0
        node = start_node(tmp_path / "node", model=str(tiny_model), layers=(0, 6), extra_args=FLAGS)
        node.wait_ready(120)
        async with open_host(cheat.seed) as host:
            again = await _take_a_receipt_and_leave(host, node, model_id)
        assert isinstance(again, Error) and "unpaid" in again.message, again
    finally:
        node.stop()
