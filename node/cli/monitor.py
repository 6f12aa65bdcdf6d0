"""``shiza monitor``: the swarm map, standalone (node/http/monitor.py)."""

from __future__ import annotations

import argparse

import trio


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    mon = sub.add_parser("monitor", help="serve a web map of the swarm: who serves which layers")
    mon.add_argument("--port", type=int, default=8090)
    mon.add_argument("--host", default="127.0.0.1", help="address to listen on")
    mon.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                     help="a peer of the swarm (repeatable)")
    mon.add_argument("--model", action="append", default=[], metavar="MODEL_ID",
                     help="a model id to show even before a peer reports it (repeatable)")
    mon.add_argument("--interval", type=float, default=3.0, help="seconds between looks at the DHT")


def run(args: argparse.Namespace) -> int:
    from node.http.monitor import run_monitor

    try:
        trio.run(lambda: run_monitor(args.bootstrap, models=args.model, port=args.port,
                                     host=args.host, interval_s=args.interval))
    except KeyboardInterrupt:
        pass
    return 0
