"""``shiza gateway``: the OpenAI-compatible HTTP API in front of the swarm (node/gateway.py)."""

from __future__ import annotations

import argparse
import functools
import signal
import sys
from pathlib import Path

import trio

DEFAULT_MODEL = "smollm2-135m"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="serve an OpenAI-compatible API backed by the swarm")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="a peer of the swarm (repeatable)")
    p.add_argument("--swarm-key", type=Path, default=None, metavar="FILE", help="join a private swarm")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the gateway's identity and receipt ledger (default: ~/.shiza/gateway)")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept only requests with Authorization: Bearer KEY (repeatable)")
    p.add_argument("--model", action="append", default=[], metavar="MODEL",
                   help=f"a model it can tokenize: {DEFAULT_MODEL} (default) or a checkpoint dir (repeatable)")


def run(args: argparse.Namespace) -> int:
    from node.client.swarm import SwarmClient
    from node.util.dirs import default_data_dir
    from node.http.gateway import serve_gateway
    from node.cli.model import load_text_model
    from node.models import ModelError

    if not args.bootstrap:
        print("error: give at least one --bootstrap MULTIADDR of a node in the swarm", file=sys.stderr)
        return 2
    try:
        models = [load_text_model(spec) for spec in (args.model or [DEFAULT_MODEL])]
    except ModelError as exc:  # e.g. the default model not prepared on a light install
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or default_data_dir() / "gateway"

    async def main() -> None:
        async with SwarmClient.open(args.bootstrap, data_dir=data_dir, swarm_key=args.swarm_key) as client:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(functools.partial(
                    serve_gateway, client, models, host=args.host, port=args.port, api_keys=args.api_key))
                print(f"gateway ready: http://{args.host}:{port}/v1 as peer {client.identity.peer_id}", flush=True)
                for m in models:
                    print(f"  model {m.model_id}", flush=True)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()  # stop serving; open generations settle their receipts

    trio.run(main)
    return 0
