"""The ``shiza`` command."""

from __future__ import annotations

import argparse
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

    demo = sub.add_parser("demo", help="start a local 3-node swarm and ask it a question")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--spans", default="0:10,10:20,20:30")
    demo.add_argument("--no-baseline", action="store_true", help="skip the one-process comparison")

    from .receipts_cmd import add_parser as add_receipts

    add_receipts(sub)

    model = sub.add_parser("model", help="prepare a model").add_subparsers(dest="model_command", required=True)
    prep = model.add_parser("prepare", help="convert/cache a model and print its content id")
    prep.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "node":
        return _node_run(args)
    if args.command == "generate":
        from .generate_cmd import run_generate

        return run_generate(args)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(args)
    if args.command == "receipts":
        from .receipts_cmd import run as run_receipts

        return run_receipts(args)
    if args.command == "model":
        from .engine.registry import resolve_model

        src = resolve_model(args.model)
        print(json.dumps({"model_id": src.model_id, "path": str(src.path), "num_layers": src.num_layers}))
        return 0
    return 2


def _node_run(args: argparse.Namespace) -> int:
    from .daemon import NodeConfig, default_data_dir, run_node

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
    )

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
