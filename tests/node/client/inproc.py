"""An in-process swarm for fast tests: real SpanServers and engines behind node/net/memory.py.

No node processes and no libp2p: each node is a ``SpanServer`` whose ``handle_inference`` serves
the memory network's streams, its signed capacity record sits in the network's ``MemoryDHT``,
and clients are ``SwarmClient``s with the network's connector. Everything above the transport
(sessions, scheduler, engine, receipts, routing, failover, spot checks) is the real code.

    async with open_swarm(tiny_llama, [(0, 3), (3, 6)]) as swarm:
        async with swarm.client() as client:
            result = await client.generate(swarm.model_id, [prompt], max_new_tokens=8)

``make_server`` is the one place that knows how the daemon builds a SpanServer.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from protocol.codec import Tensor
from protocol.identity import Identity
from protocol.ids import DEFAULT_SWARM_ID, INFERENCE_PROTOCOL, INFO_PROTOCOL, capacity_key, model_provider_key
from protocol.messages import NodeInfo, ServedSpan
from protocol.records import CapacityRecord, Hardware, sign_record

from node.client.spotcheck import SpotChecker
from node.client.swarm import SwarmClient
from node.engine.faults import FaultyEngine, Faults
from node.engine.registry import ModelSource
from node.engine.span import SpanEngine
from node.ledger.store import Ledger
from node.net.memory import MemoryNetwork, open_memory_network
from node.serve.server import Accounting, ServerLimits, SpanServer

RECORD_TTL_S = 600.0


def identity(name: str) -> Identity:
    return Identity.from_seed(hashlib.sha256(name.encode()).digest())


def make_server(engine: Any, ident: Identity, model_layers: int, *, ledger: Ledger | None = None,
                limits: ServerLimits | None = None, receipt_every: int = 64,
                swarm_id: str = DEFAULT_SWARM_ID) -> SpanServer:
    """A SpanServer as the daemon builds one (no direct-channel listener)."""
    span = ServedSpan(engine.model_id, engine.start, engine.end, model_layers)
    info = NodeInfo(ident.peer_id, (), "test", "online", (span,))
    accounting = Accounting(ident, ledger, receipt_every, swarm_id=swarm_id)
    return SpanServer(engine, node_info=lambda: info, limits=limits or ServerLimits(),
                      accounting=accounting)


def capacity_record(ident: Identity, engine: Any, model_layers: int, *,
                    throughput: float = 100.0, cache_tokens_left: int = 1 << 20) -> CapacityRecord:
    now = time.time()
    return sign_record(ident, CapacityRecord(
        peer_id=ident.peer_id, addrs=(), spans=(ServedSpan(engine.model_id, engine.start, engine.end,
                                                           model_layers),),
        hardware=Hardware("cpu", "in-process", 0, 0), throughput=throughput,
        cache_tokens_left=cache_tokens_left, state="online", seq=int(now * 1000), issued_at=now,
        expires_at=now + RECORD_TTL_S))


@dataclass
class Node:
    name: str
    identity: Identity
    engine: Any
    server: SpanServer
    ledger: Ledger | None

    @property
    def peer_id(self) -> str:
        return self.identity.peer_id


@dataclass
class Swarm:
    net: MemoryNetwork
    source: ModelSource
    nodes: list[Node] = field(default_factory=list)
    data_dir: Path | None = None

    @property
    def model_id(self) -> str:
        return self.source.model_id

    def node(self, peer_id: str) -> Node:
        return next(n for n in self.nodes if n.peer_id == peer_id)

    async def add_node(self, name: str, engine: Any, *, announce: bool = True,
                       record: dict[str, Any] | None = None, **server_kwargs: Any) -> Node:
        """Serve ``engine`` as peer ``name`` (and publish its record unless ``announce`` is False;
        ``record``: keyword arguments of ``capacity_record``, e.g. ``cache_tokens_left``)."""
        ident = identity(name)
        ledger = Ledger.open(self.data_dir / f"{name}.sqlite", ident) if self.data_dir is not None else None
        server = make_server(engine, ident, self.source.num_layers, ledger=ledger, **server_kwargs)
        self.net.set_handler(ident.peer_id, INFERENCE_PROTOCOL, server.handle_inference)
        self.net.set_handler(ident.peer_id, INFO_PROTOCOL, server.handle_info)
        node = Node(name, ident, engine, server, ledger)
        self.nodes.append(node)
        if announce:
            dht = self.net.dht(ident.peer_id)
            await dht.put(capacity_key(ident.peer_id), capacity_record(ident, engine, self.source.num_layers,
                                                                   **(record or {})).to_bytes())
            await dht.provide(model_provider_key(engine.model_id))
        return node

    async def settle(self, timeout_s: float = 10.0) -> None:
        """Wait until every node's sessions have ended (their receipts stored): the client's
        ``generate`` returns once it has countersigned, before the node has stored that."""
        for n in self.nodes:
            assert await n.server.drain(timeout_s), f"{n.name} still has sessions open"

    def client(self, name: str = "agent", *, ledger: Ledger | None = None, swarm_id: str = DEFAULT_SWARM_ID,
               step_timeout_s: float = 30.0, spot_checker: SpotChecker | None = None,
               **kwargs: Any) -> SwarmClient:
        ident = identity(name)
        return SwarmClient(None, self.net.dht(ident.peer_id), ident, ledger,
                           connector=self.net.connector(ident.peer_id), swarm_id=swarm_id,
                           step_timeout_s=step_timeout_s, spot_checker=spot_checker, **kwargs)


class LyingEngine(FaultyEngine):
    """An engine whose every tensor output goes through ``lie`` before the server sends it: a
    hostile node that serves (and bills) steps with outputs of its choosing."""

    def __init__(self, inner: Any, lie: Callable[[Tensor], Tensor]) -> None:
        super().__init__(inner, Faults())
        self.lie = lie

    def run_steps(self, steps: Sequence[Any]) -> list[Tensor | Exception]:
        return [self.lie(r) if isinstance(r, Tensor) else r for r in self.inner.run_steps(steps)]


def lying(lie: Callable[[Tensor], Tensor]) -> Callable[[Any], Any]:
    """``engine(..., wrap=lying(lie))``: that span's node lies with ``lie``."""
    return lambda inner: LyingEngine(inner, lie)


_ENGINES: dict[tuple[str, int, int], Any] = {}


def engine(source: ModelSource, start: int, end: int, wrap: Callable[[Any], Any] | None = None) -> Any:
    """A span engine of ``source``: loaded once per process and span, then shared (every session
    a test opens is closed by the server, so sharing keeps no state between tests)."""
    key = (str(source.path), start, end)
    if key not in _ENGINES:
        _ENGINES[key] = SpanEngine.load(source, start, end, max_cache_tokens=1 << 16)
    eng = _ENGINES[key]
    return wrap(eng) if wrap is not None else eng


@asynccontextmanager
async def open_swarm(source: ModelSource, spans: Sequence[tuple[int, int]], *,
                     data_dir: Path | None = None, **server_kwargs: Any) -> AsyncIterator[Swarm]:
    """Nodes ``node0``, ``node1``, ... serving ``spans`` of ``source`` in this process.
    With ``data_dir`` each node keeps a ledger there (``<name>.sqlite``)."""
    nodes: list[Node] = []
    try:
        async with open_memory_network() as net:
            swarm = Swarm(net, source, nodes, data_dir=data_dir)
            for i, (start, end) in enumerate(spans):
                await swarm.add_node(f"node{i}", engine(source, start, end), **server_kwargs)
            yield swarm
    finally:  # after the network's handlers ended (they settle receipts in these ledgers)
        for n in nodes:
            if n.ledger is not None:
                n.ledger.close()


_REFERENCE: dict[tuple[str, tuple[int, ...], int], list[int]] = {}


def reference(source: ModelSource, prompt: Sequence[int], new_tokens: int) -> list[int]:
    """``reference_greedy`` (the whole model in plain transformers), memoised per process."""
    from node.engine.reference import reference_greedy

    key = (str(source.path), tuple(prompt), new_tokens)
    if key not in _REFERENCE:
        _REFERENCE[key] = reference_greedy(source, list(prompt), new_tokens)
    return _REFERENCE[key]
