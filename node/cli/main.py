"""The ``shiza`` command: one module of node/cli per subcommand, each with ``add_parser(sub)``
and ``run(args) -> exit code``. Building the parser imports every one of them, so each imports
at module level only what is light (no torch): ``shiza generate`` runs on a light install."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

# subcommand -> its module in node/cli
COMMANDS = {
    "node": "node_run",
    "generate": "generate",
    "demo": "demo",
    "receipts": "receipts",
    "bench": "bench",
    "gateway": "gateway",
    "monitor": "monitor",
    "model": "model",
}


def _module(command: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"node.cli.{COMMANDS[command]}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shiza", description="shiza-node: p2p LLM inference")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _module(command).add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from node.util.memtune import tune_malloc

    tune_malloc()  # large frames without page faults: node/util/memtune.py
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return int(_module(args.command).run(args))


if __name__ == "__main__":
    raise SystemExit(main())
