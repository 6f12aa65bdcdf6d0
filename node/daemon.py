"""The serving node: one nursery owns the host, the DHT, the announcer and every session.

Start-up: identity, model, engine, throughput (cached), host, DHT, record, ``node.json``.
Shutdown (the ``stop`` event, set by SIGINT/SIGTERM in the CLI): stop accepting sessions,
let running ones finish (bounded), withdraw the record, close the host.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import trio

from protocol.identity import Identity
from protocol.ids import INFERENCE_PROTOCOL, INFO_PROTOCOL
from protocol.messages import NodeInfo, ServedSpan
from protocol.records import Hardware

from . import __version__
from .accounting import DEFAULT_RECEIPT_EVERY
from .announce import DHT_SELECTORS, DHT_VALIDATORS, Announcer, RecordState
from .capacity import cached_throughput, detect_hardware
from .dht import open_dht
from .host import open_host
from .ledger import Ledger
from .server import Accounting, ServerLimits, SpanServer

LEDGER_FILE = "ledger.sqlite"

log = logging.getLogger(__name__)

# Peers may be shutting down too: never let one publish hold up the exit for long.
SHUTDOWN_PUBLISH_S = 3.0


def default_data_dir() -> Path:
    return Path(os.environ.get("SHIZA_HOME", Path.home() / ".shiza"))


@dataclass
class NodeConfig:
    model: str = "smollm2-135m"
    layers: tuple[int, int] | None = None  # None: the whole model
    data_dir: Path = field(default_factory=default_data_dir)
    listen: str = "/ip4/127.0.0.1/tcp/0"
    bootstrap: list[str] = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    record_ttl_s: float = 120.0
    drain_timeout_s: float = 30.0
    receipt_every: int = DEFAULT_RECEIPT_EVERY
    unit_price: float | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)


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


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _load_engine(cfg: NodeConfig):  # type: ignore[no-untyped-def]
    from .engine.registry import resolve_model
    from .engine.span import SpanEngine

    source = resolve_model(cfg.model)
    start, end = cfg.layers if cfg.layers is not None else (0, source.num_layers)
    if not 0 <= start < end <= source.num_layers:
        raise ValueError(f"--layers {start}:{end} is outside the model's 0:{source.num_layers}")
    engine = SpanEngine.load(source, start, end, device=cfg.device, dtype=cfg.dtype)
    return source, engine


def _throughput(cfg: NodeConfig, engine) -> float:  # type: ignore[no-untyped-def]
    from .engine.span import measure_throughput

    key = {"model": engine.model_id, "start": engine.start, "end": engine.end,
           "device": cfg.device, "dtype": cfg.dtype}
    return cached_throughput(cfg.data_dir / "throughput.json", key, lambda: measure_throughput(engine))


async def run_node(
    cfg: NodeConfig,
    stop: trio.Event,
    *,
    task_status: trio.TaskStatus[ReadyInfo] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a node until ``stop`` is set, then shut down gracefully."""
    cfg.data_dir.mkdir(parents=True, exist_ok=True)
    identity = Identity.load_or_create(cfg.data_dir)
    log.info("peer id %s; loading %s", identity.peer_id, cfg.model)
    source, engine = await trio.to_thread.run_sync(_load_engine, cfg)
    throughput = await trio.to_thread.run_sync(_throughput, cfg, engine)
    log.info("serving %s layers %d:%d at %.1f tok/s", engine.model_id, engine.start, engine.end, throughput)

    ledger = Ledger.open(cfg.data_dir / LEDGER_FILE)
    try:
        await _serve(cfg, stop, identity, source, engine, throughput, ledger, task_status)
    finally:
        ledger.close()  # every receipt was committed as it was made; this releases the file
    try:
        (cfg.data_dir / "node.json").unlink()
    except FileNotFoundError:
        pass
    log.info("node stopped")


async def _serve(cfg, stop, identity, source, engine, throughput, ledger, task_status):  # type: ignore[no-untyped-def]
    hw = detect_hardware(cfg.device)
    span = ServedSpan(engine.model_id, engine.start, engine.end, source.num_layers)
    async with open_host(identity.seed, cfg.listen) as host:
        state = RecordState(
            addrs=tuple(host.addrs),
            spans=(span,),
            hardware=Hardware(hw.device_kind, hw.device_name, hw.memory_total, hw.memory_free),
            throughput=throughput,
            cache_tokens_left=cfg.limits.max_sessions * cfg.limits.max_length,
        )
        announcer: Announcer | None = None

        def node_info() -> NodeInfo:
            record = announcer.last_record if announcer else None
            return NodeInfo(identity.peer_id, tuple(host.addrs), __version__, state.state, (span,),
                            record.to_bytes() if record else None)

        accounting = Accounting(identity, ledger, cfg.receipt_every, cfg.unit_price)
        server = SpanServer(engine, node_info=node_info, limits=cfg.limits, accounting=accounting)
        host.set_handler(INFO_PROTOCOL, server.handle_info)
        host.set_handler(INFERENCE_PROTOCOL, server.handle_inference)
        async with open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, cfg.bootstrap) as dht:
            announcer = Announcer(identity, dht, state, ttl_s=cfg.record_ttl_s,
                                  provide_keys=(engine.model_id,))
            async with trio.open_nursery() as nursery:
                await nursery.start(announcer.serve)
                ready = ReadyInfo(identity.peer_id, list(host.addrs), engine.model_id,
                                  engine.start, engine.end, source.num_layers)
                write_json_atomic(cfg.data_dir / "node.json", ready.to_json())
                task_status.started(ready)
                await stop.wait()
                log.info("shutting down: draining sessions")
                nursery.cancel_scope.cancel()  # stop refreshing
            with trio.CancelScope(shield=True):
                server.accepting = False
                if server.stats.sessions_open:
                    # Tell clients first, then let running sessions finish (bounded).
                    state.state = "draining"
                    with trio.move_on_after(SHUTDOWN_PUBLISH_S):
                        await announcer.publish()
                    if not await server.drain(cfg.drain_timeout_s):
                        log.warning("sessions still open after %.0f s; closing them", cfg.drain_timeout_s)
                await announcer.withdraw(timeout_s=SHUTDOWN_PUBLISH_S)
