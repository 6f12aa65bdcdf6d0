"""Node-to-node flow (SPEC 9.6) between real node processes: activations go hop to hop, each
hop reports to the client, and the client still checks, pays and fails over every hop."""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest

from node.client.hops import TamperedPush
from node.client.swarm import SwarmClient
from node.devtools.localswarm import start_chain, stop_all
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model
from node.ledger.store import Ledger
from protocol.identity import Identity
from protocol.receipts import Receipt

pytestmark = pytest.mark.integration

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140]
NEW = 16


def _route_through(route, nodes_by_layers):
    """``route`` with hop i on the node given for its layers (by (start, end))."""
    out = []
    for hop in route:
        node = nodes_by_layers.get((hop.start, hop.end))
        out.append(hop if node is None else dataclasses.replace(hop, peer_id=node.peer_id, addrs=(node.addr,)))
    return out


def _statuses(data_dir):
    with Ledger.open(data_dir / "ledger.sqlite", Identity.load_or_create(data_dir)) as ledger:
        return [(Receipt.from_bytes(e.receipt), e.status) for e in ledger.entries()]


@pytest.fixture
def chain3(tiny_model, tmp_path):
    """0:2, 2:4 twice, 4:6: the middle layers have a spare."""
    from node.http.asgi import free_port

    ports = [free_port() for _ in range(4)]
    nodes = start_chain(tmp_path, [(0, 2), (2, 4), (4, 6), (2, 4)], model=str(tiny_model),
                        extra_args=["--receipt-every", "4"], timeout_s=120, metrics_ports=ports)
    for node, port in zip(nodes, ports):
        node.metrics_port = port
    yield nodes
    for n in nodes:
        if n.proc.poll() is None:
            os.kill(n.proc.pid, signal.SIGCONT)
    stop_all(nodes)


async def test_activations_flow_node_to_node_with_the_same_text_and_receipts(chain3, tiny_model, tmp_path):
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    texts = {}
    for push in (False, True):
        agent = tmp_path / f"agent-{push}"
        async with SwarmClient.open([chain3[0].addr], data_dir=agent, push=push) as client:
            route = _route_through(await client.wait_for_route(source.model_id, 60), {(2, 4): chain3[1]})
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route)
        texts[push] = result.token_ids[0]
        # Pushed: hops 2 and 3 took every step from the hop before them, none from the client.
        assert result.pushed_steps == (2 * result.steps if push else 0)
        # Every hop's receipts are countersigned: the client counted what the hops received.
        receipts = _statuses(agent)
        assert {r.server for r, _ in receipts} == {h.peer_id for h in route}
        assert all(status == "countersigned" for _, status in receipts), receipts
    assert texts[True] == texts[False] == expected
    # The middle node's metrics count the steps it took pushed and pushed on.
    from tests.integration.test_metrics import scrape, value

    samples = scrape(chain3[1].metrics_port)
    assert value(samples, "shiza_pushes_total", direction="in") == result.steps
    assert value(samples, "shiza_pushes_total", direction="out") == result.steps
    assert value(samples, "shiza_links_open") == 1
    assert value(samples, "shiza_links_opened_total", channel="direct") + \
        value(samples, "shiza_links_opened_total", channel="libp2p") == 1
    # Four long prompts next, on the link the short session left waiting for its next frame: their
    # first push (a prefill chunk of 4 x 256 positions, 4x the short session's frame limit) is
    # taken, not refused as too large (the link read with the limit of the sessions open when
    # that read began).
    long_prompt = (PROMPT * 50)[:300]
    async with SwarmClient.open([chain3[0].addr], data_dir=tmp_path / "agent-long", push=True) as client:
        result = await client.generate(source.model_id, [long_prompt] * 4, max_new_tokens=4, route=route)
    assert result.token_ids == [reference_greedy(source, long_prompt, 4)] * 4
    # every step pushed, the prefill's chunks too, and nothing failed over
    assert result.pushed_steps > 2 * result.steps and result.pushed_steps % 2 == 0 and result.failovers == 0
    assert value(scrape(chain3[1].metrics_port), "shiza_links_opened_total", channel="direct") + \
        value(scrape(chain3[1].metrics_port), "shiza_links_opened_total", channel="libp2p") == 1


async def test_a_node_without_push_is_driven_by_the_client(tiny_model, tmp_path):
    nodes = start_chain(tmp_path, [(0, 2), (2, 4), (4, 6)], model=str(tiny_model), timeout_s=120,
                        node_args=[[], ["--no-push"], []])
    try:
        source = resolve_model(str(tiny_model))
        async with SwarmClient.open([nodes[0].addr], data_dir=tmp_path / "agent") as client:
            await client.wait_for_route(source.model_id, 60)
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW)
            assert client.no_push == {nodes[1].peer_id}
        assert result.token_ids[0] == reference_greedy(source, PROMPT, NEW)
        assert result.pushed_steps == 0 and result.failovers == 0
    finally:
        stop_all(nodes)


async def test_a_hop_that_alters_what_it_pushes_is_caught_and_replaced(chain3, tiny_model, tmp_path):
    """Attack: the 2:4 hop reports its true output to the client and pushes an altered one to
    the next hop. Its signature of the push gives it away; the client fails it over."""
    tamperer = start_chain(tmp_path / "bad", [(2, 4)], model=str(tiny_model), timeout_s=120,
                           extra_args=["--bootstrap", chain3[0].addr, "--tamper-pushes"])[0]
    try:
        source = resolve_model(str(tiny_model))
        async with SwarmClient.open([chain3[0].addr], data_dir=tmp_path / "agent") as client:
            await client.wait_for_route(source.model_id, 60)
            route = _route_through(await client.route(source.model_id), {(2, 4): tamperer})
            failures = []
            original = client._fail_over

            async def spy(chain, index, failure):
                failures.append(failure)
                return await original(chain, index, failure)

            client._fail_over = spy
            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route)
        assert result.token_ids[0] == reference_greedy(source, PROMPT, NEW)
        assert [type(f) for f in failures] == [TamperedPush]
        assert failures[0].peer_id == tamperer.peer_id
        assert tamperer.peer_id not in {h.peer_id for h in result.route}
        assert result.pushed_steps > 0  # relinked after the failover
    finally:
        stop_all([tamperer])


@pytest.mark.parametrize("sig,victim_layers", [(signal.SIGKILL, (2, 4)), (signal.SIGSTOP, (2, 4)),
                                               (signal.SIGKILL, (4, 6))])
async def test_failover_under_push_gives_the_same_text(chain3, tiny_model, tmp_path, sig, victim_layers):
    nodes = chain3
    if victim_layers == (4, 6):  # a spare last hop
        nodes = nodes + start_chain(tmp_path / "spare", [(4, 6)], model=str(tiny_model), timeout_s=120,
                                    extra_args=["--bootstrap", nodes[0].addr])
    source = resolve_model(str(tiny_model))
    expected = reference_greedy(source, PROMPT, NEW)
    events = {}
    try:
        async with SwarmClient.open([nodes[0].addr], data_dir=tmp_path / "agent", step_timeout_s=3) as client:
            await client.wait_for_route(source.model_id, 60)
            victim = nodes[1] if victim_layers == (2, 4) else nodes[2]
            route = _route_through(await client.route(source.model_id), {victim_layers: victim})

            def on_tokens(tokens):
                n = events["n"] = events.get("n", 0) + 1
                if n == 6:
                    os.kill(victim.proc.pid, sig)
                    events["disrupted"] = time.monotonic()
                elif n == 7:
                    events["resumed"] = time.monotonic()

            result = await client.generate(source.model_id, [PROMPT], max_new_tokens=NEW, route=route,
                                           on_tokens=on_tokens)
        print(f"\n[push failover {signal.Signals(sig).name} {victim_layers}] kill to next token "
              f"{(events['resumed'] - events['disrupted']) * 1000:.0f} ms")
        assert result.token_ids[0] == expected
        assert result.failovers == 1
        assert victim.peer_id not in {h.peer_id for h in result.route}
        # Linked again after the failover: the rest of the steps were pushed.
        assert result.pushed_steps >= 2 * (NEW - 7)
    finally:
        if victim_layers == (4, 6):
            stop_all(nodes[4:])


async def test_links_and_pushes_from_strangers_are_refused(tiny_model, tmp_path):
    """Attacks on a node serving 2:6: a link nobody named, a push with a forged signature, a
    push into its session claiming another client. Each is refused; the honest push works."""
    import struct

    from node.net.host import open_host
    from node.net.wire import int64_tensor, recv_message, send_message
    from protocol.codec import Tensor
    from protocol.identity import Identity
    from protocol.ids import INFERENCE_PROTOCOL, LINK_PROTOCOL
    from protocol.messages import Error, OpenSession, SessionOpened, Step, StepResult
    from protocol.push import Link, Linked, LinkOpen, LinkOpened, Push, Pushed, push_digest, sign_push

    node = start_chain(tmp_path, [(2, 6)], model=str(tiny_model), timeout_s=120)[0]
    source = resolve_model(str(tiny_model))
    me = Identity.generate()
    hidden = Tensor("float32", (1, 2, 64), struct.pack("<128f", *([0.01] * 128)))
    pos = int64_tensor([[0, 1]])

    async def link():
        stream = await host.open_stream(node.peer_id, LINK_PROTOCOL)
        await send_message(stream, LinkOpen())
        return stream, await recv_message(stream, 30)

    try:
        async with open_host(me.seed) as host:
            await host.connect(node.addr)
            _, reply = await link()
            assert isinstance(reply, Error) and reply.code == 28, reply  # NotAllowed: nobody named us
            session = await host.open_stream(node.peer_id, INFERENCE_PROTOCOL)
            await send_message(session, OpenSession(source.model_id, 2, 6, 64))
            opened = await recv_message(session, 30)
            assert isinstance(opened, SessionOpened)
            await send_message(session, Link(prev_peer=me.peer_id))
            assert isinstance(await recv_message(session, 30), Linked)
            step = Step(0, hidden, pos)
            good_sig = sign_push(me, push_digest(opened.session_id, step))
            for client, sig, code in ((me.peer_id, bytes(64), 10),  # forged: InvalidSignature
                                      (Identity.generate().peer_id, good_sig, 28)):  # another's session
                stream, reply = await link()
                assert isinstance(reply, LinkOpened)
                await send_message(stream, Push(opened.session_id, client, 0, hidden, pos, sig))
                reply = await recv_message(stream, 30)
                assert isinstance(reply, Error) and reply.code == code, reply
            stream, _ = await link()
            await send_message(stream, Push(opened.session_id, me.peer_id, 0, hidden, pos, good_sig))
            pushed = await recv_message(session, 30)
            assert isinstance(pushed, Pushed) and pushed.input_digest == push_digest(opened.session_id, step)
            result = await recv_message(session, 30)
            assert isinstance(result, StepResult) and result.step == 0 and result.output.dtype == "int64"
    finally:
        stop_all([node])
