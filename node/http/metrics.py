"""Every Prometheus metric of a node, with liveness and readiness, on one HTTP port.

Most values are read from the node's own state at scrape time by a custom collector (the
server's ``ServerStats``, the engine's KV-cache bookkeeping, the host's connections, the
announcer's last record), so nothing has to be kept in step. Only what cannot be derived is
observed as it happens: step latency and batch size (``NodeMetrics.on_step``, which the node is
built with: ``NodeHooks(on_step=...)``) and DHT operations (the node's ``SwarmDHT`` methods are
wrapped, per instance, when the service starts). A gateway in the node adds its client's
failovers (``add_client``).

Wiring (node/cli/main.py): ``metrics = NodeMetrics()`` before the node; ``run_node(...,
hooks=NodeHooks(on_step=metrics.on_step))``; the service ``metrics_service(node,
metrics=metrics, port=...)`` reads the node it runs in.

Each node has its own ``CollectorRegistry``: no global state, several nodes in one process
(tests) never share a metric. Labels stay low-cardinality: never a session id or a peer id.

    GET /metrics   Prometheus text format
    GET /healthz   200 while the node's trio loop runs (it answers this request)
    GET /readyz    200 when serving and the record is published online; else 503 and a reason
"""

from __future__ import annotations

import functools
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterator

import trio
from prometheus_client import (CollectorRegistry, Counter, Histogram, Info, PlatformCollector, ProcessCollector,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from protocol.errors import ERROR_CLASSES
from protocol.ids import PROTOCOL_VERSION

from node.http.asgi import http_only, send_bytes, serve_asgi
from node.serve.server import StepDone

if TYPE_CHECKING:
    from node.client.swarm import SwarmClient
    from node.serve.daemon import Node

log = logging.getLogger(__name__)

PREFIX = "shiza"
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
DHT_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DHT_OPERATIONS = ("put", "get", "provide", "find_providers")


@functools.lru_cache(maxsize=1)
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shiza-node")
    except PackageNotFoundError:
        return "unknown"


def span_label(span: tuple[int, int]) -> str:
    return f"{span[0]}:{span[1]}"


class NodeCollector(Collector):
    """Reads a running node's state at scrape time."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        server, engine, state = node.server, node.engine, node.state
        span = span_label((engine.start, engine.end)) if engine is not None else ""
        model = node.source.model_id

        info = GaugeMetricFamily(f"{PREFIX}_node_info", "Constant 1, labelled with what this node serves.",
                                 labels=["model", "span", "device"])
        info.add_metric([model, span, node.cfg.device], 1)
        yield info
        node_state = GaugeMetricFamily(f"{PREFIX}_node_state", "1 for the state the node advertises now.",
                                       labels=["state"])
        current = state.state if state is not None else "joining"
        for name in ("joining", "online", "draining"):
            node_state.add_metric([name], 1 if name == current else 0)
        yield node_state
        if state is not None:
            yield GaugeMetricFamily(f"{PREFIX}_throughput_tokens_per_second",
                                    "Throughput the node measured and advertises.", value=state.throughput)

        if server is not None:
            st = server.stats
            yield GaugeMetricFamily(f"{PREFIX}_sessions_open", "Inference sessions open now.", value=st.sessions_open)
            yield CounterMetricFamily(f"{PREFIX}_sessions", "Inference sessions opened.", value=st.sessions_total)
            yield CounterMetricFamily(f"{PREFIX}_steps", "Engine steps served.", value=st.steps_total)
            tokens = CounterMetricFamily(f"{PREFIX}_tokens_served", "Tokens through this node's span.",
                                         labels=["phase"])
            tokens.add_metric(["prefill"], st.tokens_prefill)
            tokens.add_metric(["decode"], st.tokens_decode)
            yield tokens
            yield CounterMetricFamily(f"{PREFIX}_work_units", "Work units served (tokens times layers).",
                                      value=st.work_units)
            pushes = CounterMetricFamily(f"{PREFIX}_pushes", "Steps pushed node to node (SPEC 9.6): "
                                         "in, taken from the hop before; out, sent to the hop after.",
                                         labels=["direction"])
            pushes.add_metric(["in"], getattr(server, "pushes_in", 0))
            pushes.add_metric(["out"], getattr(server, "pushes_out", 0))
            yield pushes
            links = getattr(server, "links", None)
            if links is not None:
                yield GaugeMetricFamily(f"{PREFIX}_links_open", "Node-to-node links this node pushes on now.",
                                        value=len(links.links()))
                opened = CounterMetricFamily(f"{PREFIX}_links_opened", "Node-to-node links opened since start, by "
                                             "the channel they ended on.", labels=["channel"])
                opened.add_metric(["direct"], links.direct_opened)
                opened.add_metric(["libp2p"], links.opened - links.direct_opened)
                yield opened
            receipts = CounterMetricFamily(f"{PREFIX}_receipts", "Receipts issued, by how the client answered.",
                                           labels=["status"])
            for status in ("countersigned", "disputed", "server_only"):
                receipts.add_metric([status], st.receipts.get(status, 0))
            yield receipts
            yield CounterMetricFamily(f"{PREFIX}_receipts_issued", "Receipts issued (all statuses).",
                                      value=sum(st.receipts.values()))
            errors = CounterMetricFamily(f"{PREFIX}_errors", "Streams ended with a wire error, by code and name.",
                                         labels=["code", "name"])
            for code, count in sorted(st.errors_by_code.items()):
                cls = ERROR_CLASSES.get(code)
                errors.add_metric([str(code), cls.name if cls is not None else "unknown"], count)
            yield errors
            peers = getattr(server, "peers", None)  # limits: load waits or is Busy; abuse strikes, bans
            if peers is not None:
                yield CounterMetricFamily(f"{PREFIX}_peer_strikes", "Limit violations counted against peers.",
                                          value=peers.strikes_total)
                yield CounterMetricFamily(f"{PREFIX}_peer_bans", "Peers banned for repeated violations.",
                                          value=peers.bans_total)
                yield CounterMetricFamily(f"{PREFIX}_session_opens_queued",
                                          "Opens that waited for a session slot.", value=peers.opens_waited)
                yield CounterMetricFamily(f"{PREFIX}_session_opens_busy",
                                          "Opens answered Busy for want of a slot.", value=peers.opens_busy)
            scheduler = server.scheduler  # batches concurrent sessions' steps
            yield GaugeMetricFamily(f"{PREFIX}_queue_depth", "Steps waiting for the engine.",
                                    value=scheduler.pending)
            yield CounterMetricFamily(f"{PREFIX}_engine_batches", "Engine calls (each runs one batch of steps).",
                                      value=scheduler.stats.batches)
            yield CounterMetricFamily(f"{PREFIX}_engine_batched_steps", "Session steps run in engine batches.",
                                      value=scheduler.stats.steps)
            capacity = server.limits.max_sessions * server.limits.max_length
            reserved = engine.cache_tokens_reserved() if engine is not None else 0
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_capacity_tokens", "KV-cache tokens this node offers.",
                                    value=capacity)
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_reserved_tokens", "KV-cache tokens reserved by sessions.",
                                    value=reserved)
            yield GaugeMetricFamily(f"{PREFIX}_kv_cache_free_tokens", "KV-cache room left.",
                                    value=max(0, capacity - reserved))

        yield GaugeMetricFamily(f"{PREFIX}_connected_peers", "libp2p peers connected now.",
                                value=len(node.host.connected_peers()))
        yield GaugeMetricFamily(f"{PREFIX}_dht_routing_table_peers", "Peers in the DHT routing table.",
                                value=len(node.dht.routing_table_peers()))


class ClientCollector(Collector):
    """Client-side metrics of a ``SwarmClient`` (a gateway or an agent exports these)."""

    def __init__(self, client: SwarmClient) -> None:
        self.client = client

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(f"{PREFIX}_client_failovers", "Hops a client replaced mid-generation.",
                                  value=self.client.failovers_total)


class NodeMetrics:
    """The registry of one node: what is observed as it happens (``on_step``, DHT operations)
    plus, once ``collect_from(node)`` is called (the service does), the node's state at scrape
    time. ``NodeMetrics(node)`` does both at once (tests)."""

    def __init__(self, node: Node | None = None) -> None:
        self.node: Node | None = None
        self.registry = CollectorRegistry()
        # What every exporter has: the process (CPU, memory, open files), the Python platform
        # and the build, so a fleet's dashboards can tell versions apart.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info(f"{PREFIX}_build", "The node software's version.", registry=self.registry).info(
            {"version": _version(), "protocol_version": str(PROTOCOL_VERSION)})
        self.step_seconds = Histogram(
            f"{PREFIX}_step_duration_seconds", "Engine time of one step (prefill or decode).",
            ["span", "phase"], buckets=STEP_BUCKETS, registry=self.registry)
        self.batch_size = Histogram(
            f"{PREFIX}_step_batch_size", "Rows in the engine call (batch) each step ran in.", ["span"], buckets=BATCH_BUCKETS,
            registry=self.registry)
        self.dht_seconds = Histogram(
            f"{PREFIX}_dht_operation_duration_seconds", "Time of one DHT operation.", ["operation"],
            buckets=DHT_BUCKETS, registry=self.registry)
        self.dht_ops = Counter(
            f"{PREFIX}_dht_operations", "DHT operations, by outcome.", ["operation", "outcome"],
            registry=self.registry)
        for op in DHT_OPERATIONS:  # present from the start, so rate() works from the first scrape
            self.dht_seconds.labels(op)
            for outcome in ("ok", "error"):
                self.dht_ops.labels(op, outcome)
        if node is not None:
            self.collect_from(node)

    def collect_from(self, node: Node) -> None:
        """Export ``node``'s state at every scrape (its DHT reports to ``on_dht``, passed
        to the node as a hook when it was built)."""
        if self.node is not None:
            raise RuntimeError("these metrics already collect from a node")
        self.node = node
        self.registry.register(NodeCollector(node))

    def add_client(self, client: SwarmClient) -> None:
        """Export a client's metrics too (the node's gateway)."""
        self.registry.register(ClientCollector(client))

    def on_step(self, step: StepDone) -> None:
        """A ``NodeHooks.on_step`` observer: one step's engine time and batch size."""
        span = span_label(step.span)
        self.step_seconds.labels(span, "prefill" if step.prefill else "decode").observe(step.seconds)
        self.batch_size.labels(span).observe(step.rows)

    def on_dht(self, op: str, outcome: str, seconds: float) -> None:
        """A ``NodeHooks.on_dht`` observer: one DHT operation's outcome and duration."""
        self.dht_seconds.labels(op).observe(seconds)
        self.dht_ops.labels(op, outcome).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def readiness(node: Node) -> tuple[bool, str]:
    """(ready, reason): serving, accepting sessions, and an unexpired online record published."""
    if node.server is None or node.state is None:
        return False, "starting: not serving yet"
    if not node.server.accepting:
        return False, "not accepting sessions (draining or moving)"
    if node.state.state != "online":
        return False, f"record state is {node.state.state}"
    record = node.announcer.last_record if node.announcer is not None else None
    if record is None:
        return False, "record not published yet"
    if record.state != "online":
        return False, f"published record is {record.state}"
    if record.expires_at <= time.time():
        return False, "published record expired (refresh failing?)"
    return True, "ready"


def metric_names(registry: CollectorRegistry) -> set[str]:
    """Every sample name the registry exposes now (``_total``, ``_bucket``... included)."""
    return {s.name for m in registry.collect() for s in m.samples}


def make_app(metrics: NodeMetrics, node: Node) -> Callable[..., Awaitable[None]]:

    @http_only
    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            await send_bytes(send, 405, b"method not allowed\n", "text/plain")
        elif path == "/metrics":
            await send_bytes(send, 200, metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path == "/healthz":
            await send_bytes(send, 200, b"ok\n", "text/plain")
        elif path == "/readyz":
            ready, reason = readiness(node)
            await send_bytes(send, 200 if ready else 503, (reason + "\n").encode(), "text/plain")
        else:
            await send_bytes(send, 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")

    return app


async def metrics_service(
    node: Node,
    *,
    metrics: NodeMetrics,
    port: int,
    host: str = "127.0.0.1",
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A node service (``NodeConfig.services``): /metrics, /healthz and /readyz until cancelled.

    ``metrics``: the ones the node was built with (its ``NodeHooks.on_step``), so that steps
    are observed; this service adds the node's state and serves them. Cancellation closes the
    port.
    """
    metrics.collect_from(node)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(functools.partial(serve_asgi, make_app(metrics, node), host=host, port=port))
        print(f"metrics on http://{host}:{bound}/metrics", flush=True)
        task_status.started(bound)

