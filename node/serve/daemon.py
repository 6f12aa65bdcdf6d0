"""The serving node: one nursery owns the host, the DHT, the announcer and every session.

Start-up: identity, model, host, DHT, the span (given, or chosen from the swarm's records),
engine, throughput (cached), record, ``node.json``. While running, a node without a fixed span
re-checks the swarm and moves when the weakest layers would gain clearly.
Shutdown (the ``stop`` event, set by SIGINT/SIGTERM in the CLI): publish ``draining``, stop
accepting sessions, let running ones finish (bounded), withdraw the record, close the ledger.

What the node is built with comes in through constructors: its swarm id, ``NodeHooks`` (the
observers of its steps: metrics), and for its server the engine, the accounting, the direct
channel and the hooks of KV-cache room. An engine behind a process (vLLM) reports its health
(``SupervisedEngine.watch``); ``supervise_engine`` here decides: drain, restart, online again.
Test-only faults (``corrupt_outputs``, ``throttle_s``) wrap the engine (node/engine/faults.py).
"""

from __future__ import annotations

import functools
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Awaitable, Callable

import trio

from protocol.identity import Identity
from protocol.codec import Tensor
from protocol.ids import DEFAULT_SWARM_ID, INFERENCE_PROTOCOL, INFO_PROTOCOL, LINK_PROTOCOL
from protocol.messages import NodeInfo, ServedSpan
from protocol.records import Gpu, Hardware

from node import __version__
from node.engine.base import Engine, SupervisedEngine
from node.engine.errors import EngineError
from node.engine.faults import Faults, FaultyEngine, slowed_throughput
from node.engine.hardware import HardwareInfo, detect_hardware
from node.engine.registry import ModelSource
from node.ledger.accounting import DEFAULT_RECEIPT_EVERY, UnpaidWork
from node.ledger.store import LEDGER_FILE, Ledger
from node.net.admission import SwarmKey, open_admission
from node.net.dht import DhtObserver, SwarmDHT, open_dht
from node.net.direct import DirectListener
from node.net.host import Host, Libp2pConnector, open_host
from node.net.links import LinkPool
from node.net.records import DHT_SELECTORS, DHT_VALIDATORS, fetch_records
from node.net.relay import RelayOptions
from node.serve.announce import Announcer, RecordState
from node.serve.capacity import cached_throughput
from node.serve.placement import choose_span, estimate_layer_bytes, layers_that_fit, should_move
from node.serve.scheduler import ENGINE_THREAD
from node.serve.server import Accounting, ServerHooks, ServerLimits, SpanServer, StepDone
from node.util.atomic import write_json_atomic
from node.util.dirs import default_data_dir

log = logging.getLogger(__name__)

# Peers may be shutting down too: never let one publish hold up the exit for long.
SHUTDOWN_PUBLISH_S = 3.0
# The share of free memory a node without --layers plans to fill (weights plus KV cache).
MEMORY_FRACTION = 0.8
# Restarts of a supervised engine (vLLM) before the node gives up and ends.
MAX_RESTARTS = 3
# Bound on one publish while the node drains or comes back after a restart.
SUPERVISION_PUBLISH_S = 5.0


@dataclass
class NodeConfig:
    model: str = "smollm2-135m"
    layers: tuple[int, int] | None = None  # None: chosen from the swarm's records
    max_layers: int | None = None  # cap on a chosen span (default: what memory allows)
    data_dir: Path = field(default_factory=default_data_dir)
    listen: str = "/ip4/127.0.0.1/tcp/0"
    announce: list[str] = field(default_factory=list)  # --announce: advertised instead of listen's
    relay_service: bool = False  # --relay-service: relay for nodes behind NATs (node/net/relay.py)
    relays: list[str] = field(default_factory=list)  # --relay: reserve on these, advertise through them
    bootstrap: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    record_ttl_s: float = 120.0
    drain_timeout_s: float = 30.0
    rebalance_interval_s: float = 60.0  # how often a node without --layers re-checks the swarm
    receipt_every: int = DEFAULT_RECEIPT_EVERY
    unit_price: float | None = None
    throttle_s: float = 0.0  # testing and demonstrations: extra delay per engine call (a slow node)
    # "span" (transformers, any span); "vllm": with layers, those layers on vLLM's engine in a
    # worker process (node/engine/vllm/span.py), without, the whole model through a managed
    # vLLM server (node/engine/vllm/engine.py).
    engine: str = "span"
    tensor_parallel: int | None = None  # vllm: GPUs to shard over (None: all visible; CPU: 1)
    vllm_python: str | None = None  # vllm: its venv's python (None: .venv-vllm, else this one)
    vllm_eager: bool = False  # vllm, whole model: --enforce-eager (no compile at start)
    limits: ServerLimits = field(default_factory=ServerLimits)
    swarm_key: Path | None = None  # --swarm-key: a private swarm (node/swarmkey.py)
    corrupt_outputs: float = 0.0  # testing only: noise on hidden-state outputs (spot checks catch it)
    # Extra services run in the node's nursery once it serves (HTTP surfaces and the like):
    # ``await service(node, task_status=...)``; each calls task_status.started() when ready.
    services: list[Callable[..., Awaitable[None]]] = field(default_factory=list)
    # The direct activation channel's TCP port (SPEC 9.5): 0 picks a free one, None disables it.
    direct_port: int | None = 0
    # Node-to-node flow (SPEC 9.6): take pushed steps and push outputs to the next hop.
    # False answers a client's Link as a node without it would (the client drives every hop).
    push: bool = True
    tamper_pushes: bool = False  # testing only: push altered outputs (the client catches it)


def _tamper(output: Tensor) -> Tensor:
    """Testing only (``tamper_pushes``): ``output`` with its first value's bytes changed."""
    data = bytearray(output.data)
    data[:2] = bytes(b ^ 0x5A for b in data[:2])
    return Tensor(output.dtype, output.shape, bytes(data))


@dataclass
class ReadyInfo:
    peer_id: str
    addrs: list[str]
    model_id: str
    start: int
    end: int
    num_layers: int

    def to_json(self) -> dict[str, object]:
        return self.__dict__.copy()


_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class NodeHooks:
    """Observers a node is built with; each is called in the trio thread and returns at once.

    ``on_step``: after every session step the node serves; ``on_dht``: after every DHT
    operation, (operation, "ok" or "error", seconds) (both: node/http/metrics.py).
    """

    on_step: Callable[[StepDone], None] | None = None
    on_dht: DhtObserver | None = None


@dataclass(frozen=True)
class LoadedEngine:
    engine: Engine  # what the server serves (the fault wrapper when the config asks for one)
    supervised: SupervisedEngine | None  # the engine itself when it reports its health
    throughput: float  # tokens/s it advertises


class Node:
    """A running node; ``run_node`` drives its life cycle.

    Built with what it needs: ``swarm_id`` (a private swarm's, else the public one) names the
    swarm in its receipts and is what its services (the gateway's client) belong to.
    ``engine``, ``state``, ``announcer`` and ``server`` are the node's own, made as it starts
    serving (None before).
    """

    def __init__(self, cfg: NodeConfig, identity: Identity, source: ModelSource, ledger: Ledger,
                 host: Host, dht: SwarmDHT, hardware: HardwareInfo, *,
                 swarm_id: str = DEFAULT_SWARM_ID, hooks: NodeHooks | None = None,
                 vllm_whole: bool = False) -> None:
        self.cfg, self.identity, self.source, self.ledger = cfg, identity, source, ledger
        self.vllm_whole = vllm_whole  # engine "vllm" without layers: the whole-model server
        self.host, self.dht, self.hardware = host, dht, hardware
        self.swarm_id = swarm_id
        self.hooks = hooks or NodeHooks()
        self.engine: Engine | None = None
        self.state: RecordState | None = None
        self.announcer: Announcer | None = None
        self.server: SpanServer | None = None

    # ---- span and engine --------------------------------------------------------------------
    def max_layers(self) -> int:
        n = self.source.num_layers
        if self.cfg.max_layers is not None:
            return max(1, min(self.cfg.max_layers, n))
        weights, kv = estimate_layer_bytes(self.source.config, _DTYPE_BYTES[self.cfg.dtype],
                                           self.cfg.limits.max_length * self.cfg.limits.max_sessions)
        return layers_that_fit(int(self.hardware.memory_free * MEMORY_FRACTION), weights, kv, num_layers=n)

    async def swarm_spans(self) -> list[tuple[int, int, float]]:
        """(start, end, throughput) of the other online nodes serving this model."""
        with trio.move_on_after(30):
            records = await fetch_records(self.dht, self.source.model_id)
            return [(s.start, s.end, r.throughput) for r in records if r.peer_id != self.identity.peer_id
                    for s in r.spans if s.model_id == self.source.model_id]
        log.warning("no answer from the DHT about the swarm within 30 s")
        return []

    async def choose_layers(self) -> tuple[int, int]:
        if self.cfg.layers is not None:
            return self.cfg.layers
        spans = await self.swarm_spans()
        chosen = choose_span(self.source.num_layers, spans, max_layers=self.max_layers(),
                             peer_id=self.identity.peer_id)
        log.info("chose layers %d:%d from %d spans in the swarm", *chosen, len(spans))
        return chosen

    async def load(self, start: int, end: int) -> LoadedEngine:
        """Load the engine for layers [start, end) and its throughput (measured once per model,
        span and device, then cached), in a worker thread; wrap it in the config's faults."""
        cfg = self.cfg

        def load_and_measure() -> tuple[Engine, SupervisedEngine | None, float]:
            from node.engine.throughput import measure_throughput

            engine: Engine
            supervised: SupervisedEngine | None = None
            key: dict[str, object]
            if cfg.engine == "vllm" and not self.vllm_whole:
                from node.engine.vllm.span import VllmSpanEngine

                vspan = VllmSpanEngine.load(
                    self.source, start, end, vllm_python=cfg.vllm_python, device=cfg.device,
                    dtype=cfg.dtype, max_model_len=cfg.limits.max_length,
                    log_path=cfg.data_dir / "vllm-span.log")
                engine = supervised = vspan
                key = {"engine": "vllm-span", "model": vspan.model_id, "start": start, "end": end,
                       "device": cfg.device, "dtype": cfg.dtype}
                steps = 8
            elif cfg.engine == "vllm":
                from node.engine.vllm.engine import VllmEngine

                vllm = VllmEngine.load(
                    self.source, vllm_python=cfg.vllm_python, device=cfg.device, dtype=cfg.dtype,
                    tensor_parallel=cfg.tensor_parallel, max_model_len=cfg.limits.max_length,
                    log_path=cfg.data_dir / "vllm.log", eager=cfg.vllm_eager)
                engine = supervised = vllm
                key = {"engine": "vllm", "model": vllm.model_id, "device": cfg.device,
                                          "dtype": cfg.dtype, "tp": vllm.server.tensor_parallel}
                steps = 16  # a stream's first tokens come in bursts: measure a little longer
            else:
                from node.engine.span import SpanEngine

                engine = SpanEngine.load(self.source, start, end, device=cfg.device, dtype=cfg.dtype,
                                         max_cache_tokens=cfg.limits.max_sessions * cfg.limits.max_length)
                key = {"model": engine.model_id, "start": start, "end": end, "device": cfg.device,
                       "dtype": cfg.dtype}
                steps = 8
            try:
                tps = cached_throughput(cfg.data_dir / "throughput.json", key,
                                        lambda: measure_throughput(engine, steps=steps))
            except BaseException:
                engine.close()
                raise
            return engine, supervised, tps

        # In the one thread every forward of this process runs in (scheduler.py, EngineThread).
        engine, supervised, tps = await ENGINE_THREAD.run(load_and_measure)
        faults = Faults(corrupt_outputs=cfg.corrupt_outputs, delay_s=cfg.throttle_s)
        if faults:
            log.warning("testing faults on: %s", faults)
            # Advertise what clients will really get from a throttled node.
            return LoadedEngine(FaultyEngine(engine, faults), supervised,
                                slowed_throughput(tps, faults.delay_s))
        return LoadedEngine(engine, supervised, tps)

    def served_span(self) -> ServedSpan:
        assert self.engine is not None
        return ServedSpan(self.source.model_id, self.engine.start, self.engine.end, self.source.num_layers)

    def node_info(self) -> NodeInfo:
        record = self.announcer.last_record if self.announcer else None
        state = self.state.state if self.state else "joining"
        return NodeInfo(self.identity.peer_id, tuple(self.host.addrs), __version__, state,
                        (self.served_span(),), record.to_bytes() if record else None)

    # ---- running ------------------------------------------------------------------------------
    async def serve(self, stop: trio.Event, task_status: trio.TaskStatus[ReadyInfo]) -> None:
        cfg, hw = self.cfg, self.hardware
        start, end = await self.choose_layers()
        loaded = await self.load(start, end)
        self.engine, throughput = loaded.engine, loaded.throughput
        log.info("serving %s layers %d:%d at %.1f tok/s", self.source.model_id, start, end, throughput)
        self.state = RecordState(
            addrs=tuple(self.host.addrs), spans=(self.served_span(),),
            hardware=Hardware(hw.device_kind, hw.device_name, hw.memory_total, hw.memory_free,
                              tuple(Gpu(g.name, g.memory_total, g.memory_free, g.compute_capability, g.bf16)
                                    for g in hw.gpus)),
            throughput=throughput, cache_tokens_left=min(
                cfg.limits.max_sessions * cfg.limits.max_length,  # the node's own limits, and
                self.engine.max_cache_tokens or 1 << 62),  # the engine's (vLLM: its real KV cache)
        )
        accounting = Accounting(self.identity, self.ledger, cfg.receipt_every, cfg.unit_price,
                                swarm_id=self.swarm_id)
        # Behind a NAT (the host advertises only relayed addresses) the direct port cannot be
        # reached: offering it made every peer that reached us through our router's address
        # wait out a TCP connect before falling back to the libp2p stream. Links we open still
        # ask for direct channels: connecting out works from behind a NAT.
        direct = (DirectListener(_listen_host(cfg.listen), cfg.direct_port)
                  if cfg.direct_port is not None and not self.host.circuit_only else None)
        hooks = ServerHooks(on_step=self.hooks.on_step, on_cache_change=self._cache_changed)
        links = LinkPool(Libp2pConnector(self.host), direct=cfg.direct_port is not None) if cfg.push else None
        self.server = SpanServer(self.engine, node_info=self.node_info, limits=cfg.limits,
                                 accounting=accounting, hooks=hooks, direct=direct, links=links,
                                 identity=self.identity, push=cfg.push,
                                 push_fault=_tamper if cfg.tamper_pushes else None)
        if self.ledger is not None:  # what clients left unpaid before a restart still counts (SPEC 17)
            ledger, me = self.ledger, self.identity.peer_id
            self.server.unpaid = await trio.to_thread.run_sync(
                lambda: UnpaidWork.restored(ledger.entries(), me))
        self.host.set_handler(INFO_PROTOCOL, self.server.handle_info)
        self.host.set_handler(INFERENCE_PROTOCOL, self.server.handle_inference)
        if links is not None:
            self.host.set_handler(LINK_PROTOCOL, self.server.handle_link)
        self.announcer = Announcer(self.identity, self.dht, self.state, ttl_s=cfg.record_ttl_s,
                                   provide_keys=(self.source.model_id,))
        async with trio.open_nursery() as channels:  # outlives the drain: sessions finish on it
            if direct is not None:
                await channels.start(direct.serve)
            if links is not None:
                await channels.start(links.run)
            await self._serve(start, end, stop, task_status, loaded.supervised)
            channels.cancel_scope.cancel()

    def _cache_changed(self, left: int | None) -> None:
        """KV-cache room after an open or close; the announcer republishes it periodically."""
        if left is not None and self.state is not None:
            self.state.cache_tokens_left = left

    async def _serve(self, start: int, end: int, stop: trio.Event,
                     task_status: trio.TaskStatus[ReadyInfo],
                     supervised: SupervisedEngine | None) -> None:
        cfg = self.cfg
        assert self.announcer is not None
        async with trio.open_nursery() as nursery:
            await nursery.start(self.announcer.serve)
            if cfg.layers is None:
                nursery.start_soon(self.rebalance)
            if supervised is not None:
                assert self.server is not None and self.state is not None
                nursery.start_soon(functools.partial(
                    supervise_engine, supervised, self.server, self.state, self.announcer.publish))
            for service in cfg.services:
                await nursery.start(service, self)
            ready = ReadyInfo(self.identity.peer_id, list(self.host.addrs), self.source.model_id,
                              start, end, self.source.num_layers)
            write_json_atomic(cfg.data_dir / "node.json", ready.to_json())
            task_status.started(ready)
            await stop.wait()
            log.info("shutting down: draining sessions")
            nursery.cancel_scope.cancel()  # stop refreshing and rebalancing
        with trio.CancelScope(shield=True):
            await self.drain()
            await self.announcer.withdraw(timeout_s=SHUTDOWN_PUBLISH_S)

    async def drain(self) -> None:
        """Mark draining in the DHT (when anyone is using us), stop accepting, let sessions end."""
        assert self.server is not None and self.state is not None and self.announcer is not None
        self.server.accepting = False
        if self.server.stats.sessions_open:
            self.state.state = "draining"
            with trio.move_on_after(SHUTDOWN_PUBLISH_S):
                await self.announcer.publish()
            if not await self.server.drain(self.cfg.drain_timeout_s):
                log.warning("sessions still open after %.0f s; closing them", self.cfg.drain_timeout_s)

    async def rebalance(self) -> None:
        """Move to the swarm's weakest layers when that gains clearly (hysteresis in should_move)."""
        assert self.server is not None and self.state is not None and self.announcer is not None
        while True:
            await trio.sleep(self.cfg.rebalance_interval_s)
            assert self.engine is not None
            spans = await self.swarm_spans()
            target = should_move(self.source.num_layers, spans, (self.engine.start, self.engine.end),
                                 self.state.throughput, peer_id=self.identity.peer_id)
            if target is None:
                continue
            log.warning("moving from layers %d:%d to %d:%d", self.engine.start, self.engine.end, *target)
            await self.drain()
            loaded = await self.load(*target)
            old, self.engine = self.engine, loaded.engine
            self.server.replace_engine(loaded.engine)
            old.close()
            self.state.spans = (self.served_span(),)
            self.state.throughput = loaded.throughput
            self.state.state = "online"
            self.server.accepting = True
            await self.announcer.publish()
            write_json_atomic(self.cfg.data_dir / "node.json", ReadyInfo(
                self.identity.peer_id, list(self.host.addrs), self.source.model_id,
                target[0], target[1], self.source.num_layers).to_json())


async def supervise_engine(engine: SupervisedEngine, server: SpanServer, state: RecordState,
                           publish: Callable[[], Awaitable[object]], *,
                           max_restarts: int = MAX_RESTARTS) -> None:
    """Act on what ``engine`` reports (``engine.watch()``), until cancelled.

    Up: its cache usage and the sessions' reservations feed the record's ``cache_tokens_left``.
    Down: stop accepting sessions, publish the record as ``draining`` (clients route around it;
    open sessions fail with SessionClosed and fail over), restart the engine, publish
    ``online`` again. After ``max_restarts`` restarts it raises ``EngineError``, which ends the
    node (its nursery cancels, the record is withdrawn, the engine closed). Cancellation: a
    restart in progress is abandoned (its thread finishes on its own; the engine's ``close``
    stops what it started); each publish is bounded by SUPERVISION_PUBLISH_S.
    """
    budget = int(state.cache_tokens_left)
    restarts = 0
    async with aclosing(engine.watch()) as reports:
        async for health in reports:
            if health.up:
                free = budget - engine.cache_tokens_reserved()
                if health.cache_usage is not None:
                    free = min(free, int(budget * (1.0 - health.cache_usage)))
                state.cache_tokens_left = max(0, free)
                continue
            log.error("engine down (%s), restart %d of %d: draining", health.detail,
                      restarts + 1, max_restarts)
            server.accepting = False
            state.state = "draining"
            with trio.move_on_after(SUPERVISION_PUBLISH_S):
                await publish()
            if restarts >= max_restarts:
                raise EngineError(f"engine failed {restarts + 1} times ({health.detail}); giving up")
            restarts += 1
            await trio.to_thread.run_sync(engine.restart, abandon_on_cancel=True)
            server.accepting = True
            state.state = "online"
            with trio.move_on_after(SUPERVISION_PUBLISH_S):
                await publish()
            log.warning("engine restarted; online again")


async def run_node(
    cfg: NodeConfig,
    stop: trio.Event,
    *,
    hooks: NodeHooks | None = None,
    task_status: trio.TaskStatus[ReadyInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until ``stop`` is set, then shut down gracefully. ``hooks``: the node's
    observers (metrics), passed to everything that reports to them."""
    from node.engine.registry import resolve_model

    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(cfg.data_dir)
    log.info("peer id %s; preparing %s", identity.peer_id, cfg.model)
    source = await trio.to_thread.run_sync(
        functools.partial(resolve_model, cfg.model, layers=cfg.layers))  # None: chosen later
    vllm_whole = cfg.engine == "vllm" and cfg.layers is None
    if vllm_whole:
        cfg.layers = (0, source.num_layers)  # no --layers: vLLM serves the whole model
    if cfg.layers is not None and not 0 <= cfg.layers[0] < cfg.layers[1] <= source.num_layers:
        raise ValueError(f"--layers {cfg.layers[0]}:{cfg.layers[1]} is outside the model's 0:{source.num_layers}")
    swarm_key = SwarmKey.load(cfg.swarm_key) if cfg.swarm_key is not None else None  # before any I/O
    # Opening verifies the whole hash chain: a worker thread, never the event loop.
    ledger = await trio.to_thread.run_sync(Ledger.open, cfg.data_dir / LEDGER_FILE, identity)
    try:
        relay_service = RelayOptions() if cfg.relay_service else None
        async with open_host(identity.seed, cfg.listen, cfg.announce, relay_service=relay_service,
                             relays=cfg.relays) as host, open_admission(host, swarm_key):
            async with open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, cfg.bootstrap,
                                observer=hooks.on_dht if hooks else None) as dht:
                swarm_id = swarm_key.swarm_id if swarm_key is not None else DEFAULT_SWARM_ID
                node = Node(cfg, identity, source, ledger, host, dht, detect_hardware(cfg.device),
                            swarm_id=swarm_id, hooks=hooks, vllm_whole=vllm_whole)
                try:
                    await node.serve(stop, task_status)
                finally:
                    if node.engine is not None:
                        node.engine.close()  # the vLLM engine's server process, among others
    finally:
        ledger.close()  # every receipt was committed as it was made; this releases the file
        try:
            (cfg.data_dir / "node.json").unlink()
        except FileNotFoundError:
            pass
    log.info("node stopped")


def _listen_host(listen: str) -> str:
    """The IP address of a listen multiaddr (/ip4/A/tcp/P or /ip6/A/tcp/P); the direct
    channel listens on the same address as libp2p."""
    parts = listen.split("/")
    if len(parts) > 2 and parts[1] in ("ip4", "ip6"):
        return parts[2]
    return "127.0.0.1"
