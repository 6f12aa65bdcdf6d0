"""The swarm map: which peers serve which layers of each model, how fast, with how much room.

``SwarmWatcher`` builds a snapshot from the DHT: for every model id it knows, the signed records
of the model's providers (``fetch_records``, draining ones included so an operator sees a node
leave). Model ids come from three places, so the map needs no configuration in the common case:

1. ids given explicitly (``shiza monitor --model ID``),
2. the node's own model when the map runs inside a node (``--monitor-port``),
3. the spans in the ``NodeInfo`` of every connected or routing-table peer (INFO protocol),
   asked once per peer and again every ``INFO_REFRESH_S``.

A background loop refreshes the snapshot every ``interval_s``; HTTP only reads the latest one,
so a slow DHT never makes the page hang. ``GET /`` is a self-contained page (no external
assets) that polls ``GET /api/swarm`` (the snapshot as JSON).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import trio

from protocol.ids import INFO_PROTOCOL
from protocol.messages import InfoRequest, NodeInfo
from protocol.records import CapacityRecord

from node.net.dht import SwarmDHT
from node.net.host import Host
from node.net.records import fetch_records
from node.http.asgi import http_only, send_bytes, send_json, serve_asgi
from node.net.wire import recv_message, send_message

if TYPE_CHECKING:
    from node.serve.daemon import Node

log = logging.getLogger(__name__)

INFO_TIMEOUT_S = 5.0
INFO_REFRESH_S = 60.0
LOOKUP_TIMEOUT_S = 20.0


@dataclass
class _Asked:
    at: float
    models: dict[str, int]  # model id -> num_layers


def snapshot_of(records_by_model: dict[str, list[CapacityRecord]], num_layers: dict[str, int],
                now: float) -> dict[str, Any]:
    """The JSON of /api/swarm (a pure function: tests feed it records directly).

    Per model: each peer's span, state, throughput and cache room; per layer, how many online
    peers cover it and their summed throughput. A model's throughput is its bottleneck layer's
    (a pipeline runs no faster than its weakest layer); the swarm's is the sum over models.
    """
    models = []
    for model_id in sorted(records_by_model):
        records = records_by_model[model_id]
        n = num_layers.get(model_id, 0)
        peers = []
        for r in records:
            for s in r.spans:
                if s.model_id != model_id:
                    continue
                n = max(n, s.num_layers)
                peers.append({
                    "peer_id": r.peer_id, "start": s.start, "end": s.end, "state": r.state,
                    "throughput": round(r.throughput, 2), "cache_tokens_left": r.cache_tokens_left,
                    "device": f"{r.hardware.device_kind}: {r.hardware.device_name}",
                    "gpus": [f"{g.name}, {g.memory_free / 2**30:.1f} of {g.memory_total / 2**30:.1f} GiB free, "
                             f"compute {g.compute_capability}{', bf16' if g.bf16 else ''}"
                             for g in r.hardware.gpus],
                    "addrs": list(r.addrs), "expires_in_s": round(r.expires_at - now, 1),
                })
        peers.sort(key=lambda p: (p["start"], p["end"], p["peer_id"]))
        coverage = [0] * n
        layer_tps = [0.0] * n
        for p in peers:
            if p["state"] != "online":
                continue
            for layer in range(p["start"], min(p["end"], n)):
                coverage[layer] += 1
                layer_tps[layer] += p["throughput"]
        models.append({
            "model_id": model_id, "num_layers": n, "peers": peers, "coverage": coverage,
            "layer_throughput": [round(t, 2) for t in layer_tps],
            "uncovered": [i for i, c in enumerate(coverage) if c == 0],
            "thin": [i for i, c in enumerate(coverage) if c == 1],
            "throughput": round(min(layer_tps), 2) if layer_tps else 0.0,
        })
    return {"generated_at": now, "models": models,
            "total_throughput": round(sum(m["throughput"] for m in models), 2),
            "peers_online": len({p["peer_id"] for m in models for p in m["peers"] if p["state"] == "online"})}


class SwarmWatcher:
    """Keeps a snapshot of the swarm, seen through one host and its DHT."""

    def __init__(self, host: Host, dht: SwarmDHT, *, models: Sequence[str] = (),
                 own_models: Callable[[], dict[str, int]] | None = None, interval_s: float = 3.0) -> None:
        self.host, self.dht = host, dht
        self.explicit = list(models)
        self.own_models = own_models
        self.interval_s = interval_s
        self._asked: dict[str, _Asked] = {}
        self.snapshot: dict[str, Any] = snapshot_of({}, {}, time.time())
        self.refreshed = trio.Event()  # set after the first refresh

    def known_models(self) -> dict[str, int]:
        models: dict[str, int] = {m: 0 for m in self.explicit}
        if self.own_models is not None:
            models.update(self.own_models())
        for asked in self._asked.values():
            for m, n in asked.models.items():
                models[m] = max(models.get(m, 0), n)
        return models

    async def _ask_info(self, peer_id: str) -> None:
        models: dict[str, int] = {}
        try:
            with trio.fail_after(INFO_TIMEOUT_S):
                stream = await self.host.open_stream(peer_id, INFO_PROTOCOL)
                try:
                    await send_message(stream, InfoRequest())
                    info = await recv_message(stream, INFO_TIMEOUT_S)
                finally:
                    await stream.close()
            if isinstance(info, NodeInfo):
                models = {s.model_id: s.num_layers for s in info.spans}
        except Exception as exc:  # noqa: BLE001 - any peer may be broken (timeouts, errors, resets)
            log.debug("no node info from %s: %s", peer_id, exc)
        self._asked[peer_id] = _Asked(time.monotonic(), models)

    async def learn_models(self) -> None:
        now = time.monotonic()
        peers = set(self.host.connected_peers()) | set(self.dht.routing_table_peers())
        due = [p for p in peers if p not in self._asked or now - self._asked[p].at > INFO_REFRESH_S]
        async with trio.open_nursery() as nursery:
            for peer_id in due:
                nursery.start_soon(self._ask_info, peer_id)

    async def refresh(self) -> dict[str, Any]:
        await self.learn_models()
        models = self.known_models()
        found: dict[str, list[CapacityRecord]] = {}

        async def lookup(model_id: str) -> None:
            with trio.move_on_after(LOOKUP_TIMEOUT_S):
                found[model_id] = await fetch_records(self.dht, model_id, include_draining=True)

        async with trio.open_nursery() as nursery:
            for model_id in models:
                nursery.start_soon(lookup, model_id)
        self.snapshot = snapshot_of({m: found.get(m, []) for m in models}, models, time.time())
        self.refreshed.set()
        return self.snapshot

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh until cancelled (a failed refresh keeps the last snapshot)."""
        task_status.started()
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - keep the map up through network trouble
                log.warning("swarm refresh failed: %s", exc)
            await trio.sleep(self.interval_s)


def page_html() -> bytes:
    from node.http._monitor_page import PAGE

    return PAGE.encode()


def make_app(watcher: SwarmWatcher) -> Callable[..., Any]:
    page = page_html()

    @http_only
    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["path"] in ("/", "/index.html"):
            await send_bytes(send, 200, page, "text/html; charset=utf-8")
        elif scope["path"] == "/api/swarm":
            await send_json(send, 200, watcher.snapshot, [(b"cache-control", b"no-store")])
        elif scope["path"] == "/healthz":
            await send_bytes(send, 200, b"ok\n", "text/plain")
        else:
            await send_bytes(send, 404, b"not found: try / or /api/swarm\n", "text/plain")

    return app


async def serve_monitor(watcher: SwarmWatcher, *, port: int, host: str = "127.0.0.1",
                        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(watcher.run)
        bound = await nursery.start(functools.partial(serve_asgi, make_app(watcher), host=host, port=port))
        print(f"swarm map on http://{host}:{bound}/", flush=True)
        task_status.started(bound)


async def monitor_service(node: Node, *, port: int, host: str = "127.0.0.1",
                          task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """A node service (``NodeConfig.services``): the swarm map, seen from this node's host and
    DHT (read only: it changes nothing of the node). Cancellation closes the port."""
    source = node.source
    watcher = SwarmWatcher(node.host, node.dht, own_models=lambda: {source.model_id: source.num_layers})
    await serve_monitor(watcher, port=port, host=host, task_status=task_status)


async def run_monitor(bootstrap: Sequence[str], *, models: Sequence[str] = (), port: int = 8090,
                      host: str = "127.0.0.1", interval_s: float = 3.0) -> None:
    """``shiza monitor``: its own host and DHT (an ephemeral identity), until cancelled."""
    from protocol.identity import Identity

    from node.net.records import DHT_SELECTORS, DHT_VALIDATORS
    from node.net.dht import open_dht
    from node.net.host import open_host

    async with open_host(Identity.generate().seed) as lp2p:
        async with open_dht(lp2p, DHT_VALIDATORS, DHT_SELECTORS, list(bootstrap)) as dht:
            watcher = SwarmWatcher(lp2p, dht, models=models, interval_s=interval_s)
            await serve_monitor(watcher, port=port, host=host)
