"""``shiza node run``: serve a span of a model's layers until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from node.cli.gateway import ApiKeyError, add_api_key_args, read_api_keys
from node.ledger.accounting import DEFAULT_MAX_UNPAID_WORK_UNITS
from node.serve.limits import NodeShares, PeerLimits, read_peer_list
from node.util.dirs import default_data_dir

if TYPE_CHECKING:
    from node.serve.daemon import NodeConfig

DEFAULT_MODEL = "smollm2-135m"


def parse_layers(text: str) -> tuple[int, int]:
    try:
        a, b = text.split(":")
        start, end = int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"need 0 <= START < END, got {text!r}")
    return start, end


def parse_announce(text: str) -> str:
    """An address to advertise: /ip4|ip6|dns*/HOST/tcp/PORT, a concrete host and port."""
    import multiaddr

    try:
        addr = multiaddr.Multiaddr(text)
    except Exception:  # noqa: BLE001 - multiaddr raises several kinds for a bad string
        raise argparse.ArgumentTypeError(f"not a multiaddr: {text!r}") from None
    parts = str(addr).split("/")
    if (len(parts) < 5 or parts[1] not in ("ip4", "ip6", "dns", "dns4", "dns6") or parts[3] != "tcp"
            or parts[2] in ("0.0.0.0", "::") or parts[4] == "0"):
        raise argparse.ArgumentTypeError(f"--announce wants /ip4/HOST/tcp/PORT with a real host and port, got {text!r}")
    return str(addr)


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    node = sub.add_parser("node", help="run a serving node").add_subparsers(dest="node_command", required=True)
    run = node.add_parser("run", help="serve a span of a model's layers")
    run.add_argument("--model", default=DEFAULT_MODEL, help="smollm2-135m or a local checkpoint directory")
    run.add_argument("--layers", type=parse_layers, default=None,
                     help="START:END (default: chosen from the swarm, the weakest layers first)")
    run.add_argument("--max-layers", type=int, default=None,
                     help="cap on a chosen span (default: as many as memory allows)")
    run.add_argument("--rebalance-interval", type=float, default=60.0,
                     help="seconds between re-checks of the swarm for a node without --layers")
    run.add_argument("--throttle-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    run.add_argument("--data-dir", type=Path, default=None, help="identity, caches and node.json (default ~/.shiza)")
    run.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", help="multiaddr to listen on")
    run.add_argument("--announce", action="append", default=[], type=parse_announce, metavar="MULTIADDR",
                     help="advertise this address instead of --listen's (repeatable; port forwarding, "
                          "containers). Without it a 0.0.0.0 listen address is advertised as the "
                          "interfaces' addresses")
    run.add_argument("--relay-service", action="store_true",
                     help="relay connections for nodes behind NATs (circuit relay v2, with limits)")
    run.add_argument("--relay", action="append", default=[], metavar="MULTIADDR",
                     help="behind a NAT: reserve a slot on this relay (a full /p2p/ address) and "
                          "advertise the relayed address (repeatable)")
    run.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a peer to join through (repeatable)")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="default: float32 on cpu, bfloat16 on cuda")
    run.add_argument("--record-ttl", type=float, default=120.0, help="seconds a capacity record lives")
    run.add_argument("--receipt-every", type=int, default=64,
                     help="issue a cumulative receipt at least every N tokens of a session")
    run.add_argument("--unit-price", type=float, default=None, help="advertised price per work unit")
    run.add_argument("--gateway-port", type=int, default=None, help="serve the OpenAI-compatible API on this port")
    add_api_key_args(run, "gateway-")  # --gateway-api-key KEY, --gateway-api-key-file FILE
    run.add_argument("--engine", default="span", choices=["span", "vllm"],
                     help="span: transformers, any span of layers; vllm: with --layers, that span on "
                          "vLLM's engine, without, the whole model through a vLLM server")
    run.add_argument("--tensor-parallel", type=int, default=None,
                     help="vllm: GPUs to shard the model over (default: all visible; 1 on cpu)")
    run.add_argument("--vllm-python", default=None,
                     help="vllm: the python of vLLM's venv (default: .venv-vllm/bin/python if it exists)")
    run.add_argument("--vllm-eager", action="store_true",
                     help="vllm, whole model: skip torch.compile and CUDA graphs (vLLM's --enforce-eager): "
                          "the server starts in seconds instead of about a minute, and steps run slower")
    run.add_argument("--direct-port", type=int, default=0,
                     help="TCP port of the direct activation channel, on --listen's address "
                          "(default: any free port; SPEC 9.5)")
    run.add_argument("--no-direct", action="store_true",
                     help="serve sessions over libp2p streams only (no direct channel)")
    run.add_argument("--no-push", action="store_true",
                     help="take no steps pushed by other nodes and push none (clients then drive "
                          "every hop; SPEC 9.6)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus /metrics, /healthz and /readyz on this port")
    run.add_argument("--monitor-port", type=int, default=None, help="serve the swarm map on this port")
    run.add_argument("--http-host", default="127.0.0.1",
                     help="address of the metrics and monitor ports (0.0.0.0 in a container)")
    add_limit_args(run)


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """The per-peer limit, deadline and admission flags of ``shiza node run``."""
    d = PeerLimits()
    g = parser.add_argument_group("abuse limits and admission")
    g.add_argument("--open-timeout", type=float, default=30.0, help="seconds from stream open to OpenSession")
    g.add_argument("--idle-timeout", type=float, default=300.0, help="seconds a session may wait between frames")
    g.add_argument("--peer-max-sessions", type=int, default=d.max_sessions, help="open sessions per peer")
    g.add_argument("--peer-kv-tokens", type=int, default=d.max_kv_tokens,
                   help="KV cache one peer may reserve (sum of batch_size x max_length)")
    g.add_argument("--peer-steps-per-s", type=float, default=d.steps_per_s, help="Steps per second per peer")
    g.add_argument("--peer-tokens-per-s", type=float, default=d.tokens_per_s, help="tokens per second per peer")
    g.add_argument("--peer-bytes-per-s", type=float, default=d.bytes_per_s, help="input bytes per second per peer")
    shares = NodeShares()
    g.add_argument("--max-sessions", type=int, default=64,  # ServerLimits.max_sessions (server.py is heavy)
                   help="open sessions on this node, all peers together (shared fairly among them)")
    g.add_argument("--open-queue-s", type=float, default=shares.queue_wait_s,
                   help="seconds an open beyond a peer's share waits for a slot before it is answered Busy")
    g.add_argument("--new-peers-per-s", type=float, default=shares.new_peers_per_s,
                   help="identities never seen before admitted per second (a burst of 16)")
    g.add_argument("--ban-after", type=int, default=d.strikes_to_ban,
                   help="limit violations within a minute that ban a peer")
    g.add_argument("--ban-s", type=float, default=d.ban_s, help="seconds a banned peer's streams are refused")
    g.add_argument("--max-unpaid-work", type=int, default=DEFAULT_MAX_UNPAID_WORK_UNITS, metavar="UNITS",
                   help="work units (tokens x layers) a client may leave disputed or never countersigned, "
                        "less what it countersigned since, before it gets a strike and its opens are "
                        "refused (SPEC 17)")
    g.add_argument("--allow-peers", type=Path, default=None, metavar="FILE",
                   help="only the peer ids in FILE (one per line) may open sessions")
    g.add_argument("--swarm-key", type=Path, default=None, metavar="FILE",
                   help="join the private swarm of this key: peers without it cannot connect")
    g.add_argument("--corrupt-outputs", type=float, default=0.0, help=argparse.SUPPRESS)
    g.add_argument("--tamper-pushes", action="store_true", help=argparse.SUPPRESS)


def apply_limit_args(cfg: "NodeConfig", args: argparse.Namespace) -> None:
    """Fill a NodeConfig from the flags of ``add_limit_args``."""
    from dataclasses import replace

    peer = PeerLimits(
        max_sessions=args.peer_max_sessions, max_kv_tokens=args.peer_kv_tokens,
        steps_per_s=args.peer_steps_per_s, tokens_per_s=args.peer_tokens_per_s,
        bytes_per_s=args.peer_bytes_per_s, strikes_to_ban=args.ban_after, ban_s=args.ban_s,
    )
    allow = read_peer_list(args.allow_peers) if args.allow_peers is not None else None
    cfg.limits = replace(cfg.limits, open_timeout_s=args.open_timeout, idle_timeout_s=args.idle_timeout,
                         peer=peer, allow_peers=allow)
    cfg.limits = replace(cfg.limits, max_unpaid_work_units=args.max_unpaid_work, max_sessions=args.max_sessions,
                         shares=replace(cfg.limits.shares, queue_wait_s=args.open_queue_s,
                                        new_peers_per_s=args.new_peers_per_s))
    if args.swarm_key is not None:
        cfg.swarm_key = args.swarm_key
    if args.corrupt_outputs:
        cfg.corrupt_outputs = args.corrupt_outputs
    cfg.push = not getattr(args, "no_push", False)
    cfg.tamper_pushes = args.tamper_pushes


def run(args: argparse.Namespace) -> int:
    from node.serve.daemon import NodeConfig, NodeHooks, run_node

    try:  # a usage error before anything starts (an empty key would let every request in)
        gateway_api_keys = read_api_keys(args.gateway_api_key, args.gateway_api_key_file, os.environ)
    except ApiKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cfg = NodeConfig(
        model=args.model,
        layers=args.layers,
        max_layers=args.max_layers,
        rebalance_interval_s=args.rebalance_interval,
        throttle_s=args.throttle_ms / 1000.0,
        data_dir=args.data_dir or default_data_dir(),
        listen=args.listen,
        announce=list(args.announce),
        relay_service=args.relay_service,
        relays=list(args.relay),
        bootstrap=list(args.bootstrap),
        device=args.device,
        dtype=dtype,
        record_ttl_s=args.record_ttl,
        receipt_every=args.receipt_every,
        unit_price=args.unit_price,
        engine=args.engine,
        tensor_parallel=args.tensor_parallel,
        vllm_python=args.vllm_python,
        vllm_eager=args.vllm_eager,
        direct_port=None if args.no_direct else args.direct_port,
    )
    # The node is built with its observers: the metrics see every step from the first one.
    metrics = None
    hooks = NodeHooks()
    if args.metrics_port is not None:
        from node.http.metrics import NodeMetrics, metrics_service

        metrics = NodeMetrics()
        hooks = NodeHooks(on_step=metrics.on_step, on_dht=metrics.on_dht)
        cfg.services.append(functools.partial(metrics_service, metrics=metrics, port=args.metrics_port,
                                              host=args.http_host))
    if args.monitor_port is not None:
        from node.http.monitor import monitor_service

        cfg.services.append(functools.partial(monitor_service, port=args.monitor_port, host=args.http_host))
    if args.gateway_port is not None:
        from node.http.gateway import gateway_service

        cfg.services.append(functools.partial(gateway_service, port=args.gateway_port, host=args.http_host,
                                              api_keys=gateway_api_keys, models=[cfg.model],
                                              metrics=metrics))
    apply_limit_args(cfg, args)

    async def main_task() -> None:
        stop = trio.Event()
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        stop.set()

            nursery.start_soon(on_signals)

            async def node_task(task_status: trio.TaskStatus[object] = trio.TASK_STATUS_IGNORED) -> None:
                await run_node(cfg, stop, hooks=hooks, task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop listening for signals

            ready = await nursery.start(node_task)
            print(f"node ready: peer id {ready.peer_id}", flush=True)
            print(f"serving {ready.model_id} layers {ready.start}:{ready.end} of {ready.num_layers}", flush=True)
            for addr in ready.addrs:
                print(f"  listening on {addr}", flush=True)

    try:
        trio.run(main_task)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
