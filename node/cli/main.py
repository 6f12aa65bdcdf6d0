"""The ``shiza`` command."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

import trio

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


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shiza", description="shiza-node: p2p LLM inference")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)

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
    run.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a peer to join through (repeatable)")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                     help="default: float32 on cpu, bfloat16 on cuda")
    run.add_argument("--record-ttl", type=float, default=120.0, help="seconds a capacity record lives")
    run.add_argument("--receipt-every", type=int, default=64,
                     help="issue a cumulative receipt at least every N tokens of a session")
    run.add_argument("--unit-price", type=float, default=None, help="advertised price per work unit")
    run.add_argument("--gateway-port", type=int, default=None, help="serve the OpenAI-compatible API on this port")
    run.add_argument("--gateway-api-key", action="append", default=[], metavar="KEY",
                     help="the gateway accepts only Authorization: Bearer KEY (repeatable)")
    run.add_argument("--engine", default="span", choices=["span", "vllm"],
                     help="span: transformers, any span of layers; vllm: the whole model through vLLM")
    run.add_argument("--tensor-parallel", type=int, default=None,
                     help="vllm: GPUs to shard the model over (default: all visible; 1 on cpu)")
    run.add_argument("--vllm-python", default=None,
                     help="vllm: the python of vLLM's venv (default: .venv-vllm/bin/python if it exists)")
    run.add_argument("--direct-port", type=int, default=0,
                     help="TCP port of the direct activation channel, on --listen's address "
                          "(default: any free port; SPEC 9.5)")
    run.add_argument("--no-direct", action="store_true",
                     help="serve sessions over libp2p streams only (no direct channel)")
    run.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus /metrics, /healthz and /readyz on this port")
    run.add_argument("--monitor-port", type=int, default=None, help="serve the swarm map on this port")
    run.add_argument("--http-host", default="127.0.0.1",
                     help="address of the metrics and monitor ports (0.0.0.0 in a container)")
    from node.serve.limits import add_limit_args

    add_limit_args(run)

    gen = sub.add_parser("generate", help="generate text through the swarm")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=DEFAULT_MODEL)
    gen.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR", help="a peer of the swarm (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--raw", action="store_true", help="send PROMPT as is, without the chat template")
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end")
    gen.add_argument("--wait", type=float, default=60.0, help="seconds to wait for full coverage")
    gen.add_argument("--data-dir", type=Path, default=None,
                     help="keep this agent's identity and receipt ledger here (default: ~/.shiza/client)")
    gen.add_argument("--swarm-key", type=Path, default=None, metavar="FILE",
                     help="the key of a private swarm (see `shiza node run --swarm-key`)")

    demo = sub.add_parser("demo", help="start a local 3-node swarm and ask it a question")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--spans", default="0:10,10:20,20:30")
    demo.add_argument("--no-baseline", action="store_true", help="skip the one-process comparison")

    from node.cli.receipts import add_parser as add_receipts

    add_receipts(sub)
    from benchmarks.suite import add_parser as add_bench

    add_bench(sub)
    from node.cli.gateway import add_parser as add_gateway

    add_gateway(sub)

    mon = sub.add_parser("monitor", help="serve a web map of the swarm: who serves which layers")
    mon.add_argument("--port", type=int, default=8090)
    mon.add_argument("--host", default="127.0.0.1", help="address to listen on")
    mon.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                     help="a peer of the swarm (repeatable)")
    mon.add_argument("--model", action="append", default=[], metavar="MODEL_ID",
                     help="a model id to show even before a peer reports it (repeatable)")
    mon.add_argument("--interval", type=float, default=3.0, help="seconds between looks at the DHT")

    model = sub.add_parser("model", help="prepare a model").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert/cache a model and print its content id")
    prep.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    from node.util.memtune import tune_malloc

    tune_malloc()  # large frames without page faults: node/memtune.py
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "node":
        return _node_run(args)
    if args.command == "generate":
        from node.cli.generate import run_generate

        return run_generate(args)
    if args.command == "demo":
        from node.cli.demo import run_demo

        return run_demo(args)
    if args.command == "gateway":
        from node.cli.gateway import run as run_gateway

        return run_gateway(args)
    if args.command == "bench":
        from benchmarks.suite import run as run_bench

        return run_bench(args)
    if args.command == "receipts":
        from node.cli.receipts import run as run_receipts

        return run_receipts(args)
    if args.command == "monitor":
        from node.http.monitor import run_monitor

        try:
            trio.run(lambda: run_monitor(args.bootstrap, models=args.model, port=args.port,
                                         host=args.host, interval_s=args.interval))
        except KeyboardInterrupt:
            pass
        return 0
    if args.command == "model":
        from node.engine.registry import resolve_model

        src = resolve_model(args.model)
        print(json.dumps({"model_id": src.model_id, "path": str(src.path), "num_layers": src.num_layers}))
        return 0
    return 2


def _node_run(args: argparse.Namespace) -> int:
    from node.serve.daemon import NodeConfig, default_data_dir, run_node

    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cfg = NodeConfig(
        model=args.model,
        layers=args.layers,
        max_layers=args.max_layers,
        rebalance_interval_s=args.rebalance_interval,
        throttle_s=args.throttle_ms / 1000.0,
        data_dir=args.data_dir or default_data_dir(),
        listen=args.listen,
        bootstrap=list(args.bootstrap),
        device=args.device,
        dtype=dtype,
        record_ttl_s=args.record_ttl,
        receipt_every=args.receipt_every,
        unit_price=args.unit_price,
        engine=args.engine,
        tensor_parallel=args.tensor_parallel,
        vllm_python=args.vllm_python,
        direct_port=None if args.no_direct else args.direct_port,
    )
    if args.metrics_port is not None:
        from node.http.metrics import metrics_service

        cfg.services.append(functools.partial(metrics_service, port=args.metrics_port, host=args.http_host))
    if args.monitor_port is not None:
        from node.http.monitor import monitor_service

        cfg.services.append(functools.partial(monitor_service, port=args.monitor_port, host=args.http_host))
    if args.gateway_port is not None:
        from node.http.gateway import gateway_service

        cfg.services.append(functools.partial(gateway_service, port=args.gateway_port, host=args.http_host,
                                              api_keys=args.gateway_api_key, models=[cfg.model]))
    from node.serve.limits import apply_limit_args

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
                await run_node(cfg, stop, task_status=task_status)
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


if __name__ == "__main__":
    raise SystemExit(main())
