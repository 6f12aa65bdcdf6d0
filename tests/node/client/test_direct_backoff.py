"""A node whose direct channel once failed is asked for one again after a back-off (issue 15).

A real SpanServer with a real DirectListener on loopback TCP serves a memory network's streams;
the client's connector reports no IP address for its connection while ``ip`` is None (so the
direct channel cannot connect, as behind a broken NAT mapping) and loopback once it is set.
Before the fix one failure kept the client off that node's direct channel for its whole life.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import trio

from protocol.messages import SamplingParams

from node.client.hops import DIRECT_RETRY_BASE_S, HopSessions, SessionSpec
from node.client.routing import Hop
from node.net.direct import DirectListener
from node.net.memory import MemoryConnector, open_memory_network
from node.net.streams import FramedStream
from protocol.ids import INFERENCE_PROTOCOL
from protocol.messages import NodeInfo, ServedSpan
from node.serve.server import SpanServer

from tests.node.client.inproc import engine, identity


class _Connector(MemoryConnector):
    ip: str | None = None

    def remote_ip(self, stream: FramedStream) -> str | None:
        return self.ip


class _Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _open_and_close(sessions: HopSessions, spec: SessionSpec, hop: Hop) -> Any:
    h = await sessions.open(spec, hop)
    await sessions.close(h)
    return h


@asynccontextmanager
async def _serving(source) -> AsyncIterator[tuple[HopSessions, _Connector, DirectListener, _Clock, Hop, SessionSpec]]:
    """A whole-model node with a direct-channel listener, and a client's HopSessions for it."""
    eng = engine(source, 0, source.num_layers)
    node = identity("node")
    info = NodeInfo(node.peer_id, (), "test", "online",
                    (ServedSpan(eng.model_id, 0, eng.end, source.num_layers),))
    listener = DirectListener("127.0.0.1", 0)
    server = SpanServer(eng, node_info=lambda: info, direct=listener)
    async with open_memory_network() as net, trio.open_nursery() as nursery:
        await nursery.start(listener.serve)
        net.set_handler(node.peer_id, INFERENCE_PROTOCOL, server.handle_inference)
        agent = identity("agent")
        connector = _Connector(net, agent.peer_id)
        clock = _Clock()
        sessions = HopSessions(connector, agent, None, clock=clock)
        spec = SessionSpec(eng.model_id, 1, 16, SamplingParams(), num_layers=source.num_layers)
        yield sessions, connector, listener, clock, Hop(node.peer_id, 0, eng.end), spec
        nursery.cancel_scope.cancel()


async def test_a_failed_direct_channel_is_tried_again_after_its_back_off(tiny_llama):
    async with _serving(tiny_llama) as (sessions, connector, listener, clock, hop, spec):
        first = await _open_and_close(sessions, spec, hop)  # the channel cannot connect
        assert first.anchor is None and sessions.direct_sessions == 0
        assert sessions.direct_failed == {hop.peer_id}
        offers = listener.refused + listener.channels
        connector.ip = "127.0.0.1"  # the path is fixed now, but the client is still backing off

        clock.now += DIRECT_RETRY_BASE_S / 2
        within = await _open_and_close(sessions, spec, hop)
        assert within.anchor is None and sessions.direct_sessions == 0  # not asked for one

        clock.now += DIRECT_RETRY_BASE_S  # the back-off is over: asked again, and it connects
        after = await _open_and_close(sessions, spec, hop)
        assert after.anchor is not None and sessions.direct_sessions == 1
        assert listener.channels == 1 and listener.refused + listener.channels == offers + 1
        assert sessions.direct_failed == frozenset()


async def test_each_further_failure_doubles_the_back_off(tiny_llama):
    async with _serving(tiny_llama) as (sessions, _, _, clock, hop, spec):
        await _open_and_close(sessions, spec, hop)  # fails: backed off for the base
        clock.now += DIRECT_RETRY_BASE_S + 1
        assert sessions.direct_failed == frozenset()
        await _open_and_close(sessions, spec, hop)  # asked again, fails again: twice as long
        clock.now += DIRECT_RETRY_BASE_S + 1
        assert sessions.direct_failed == {hop.peer_id}
        clock.now += DIRECT_RETRY_BASE_S
        assert sessions.direct_failed == frozenset()


async def test_a_peer_reached_only_through_relays_is_not_asked_for_a_direct_channel(tiny_llama):
    async with _serving(tiny_llama) as (sessions, connector, listener, _, hop, spec):
        connector.ip = "127.0.0.1"  # would connect, were it asked
        relayed = Hop(hop.peer_id, hop.start, hop.end, ("/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWRelay/p2p-circuit",))
        h = await _open_and_close(sessions, spec, relayed)
        assert h.anchor is None and sessions.direct_sessions == 0
        assert listener.refused + listener.channels == 0  # no offer was even made
        assert sessions.direct_failed == frozenset()  # nothing failed, nothing backed off
        direct = await _open_and_close(sessions, spec, hop)  # the same peer by its own address
        assert direct.anchor is not None
