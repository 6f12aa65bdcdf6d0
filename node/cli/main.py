"""The ``shiza`` command: one module of node/cli per subcommand, each with ``add_parser(sub)``
and ``run(args) -> exit code``. Building the parser imports every one of them, so each imports
at module level only what is light (no torch): ``shiza generate`` runs on a light install.

What every subcommand shares is added here: ``-v/--verbose``, ``--log-level`` and
``--log-format`` (before or after the subcommand's name), help that shows defaults and an
example, and one line on stderr with a documented exit code for any failure (node/cli/errors.py).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from typing import Sequence

from node.cli.config import ConfigError, add_config_flags, apply_settings, find_parser, render_toml
from node.cli.errors import EXIT_CODES, EXIT_INTERNAL, EXIT_USAGE, explain
from node.cli.logs import LEVELS, configure, level_of

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
    "swarm-key": "swarm_key",
}

# Commands that read settings from --config FILE (and print them with --print-config).
CONFIGURABLE = ("node run", "gateway")

# An example per command (by its words after "shiza"), shown at the end of its --help.
EXAMPLES = {
    "node": "shiza node run --model smollm2-135m --layers 0:15",
    "node run": "shiza node run --model smollm2-135m --layers 0:15 --listen /ip4/0.0.0.0/tcp/4100",
    "generate": 'shiza generate --bootstrap /ip4/127.0.0.1/tcp/4100/p2p/12D3KooW... "The capital of France is"',
    "demo": "shiza demo",
    "receipts": "shiza receipts list",
    "receipts list": "shiza receipts list --data-dir ~/.local/share/shiza --json",
    "receipts settle": "shiza receipts settle --counterparty 12D3KooW... --since 1764547200 --out statement.json",
    "bench": "shiza bench",
    "gateway": "shiza gateway --bootstrap /ip4/127.0.0.1/tcp/4100/p2p/12D3KooW... --port 8000",
    "monitor": "shiza monitor --bootstrap /ip4/127.0.0.1/tcp/4100/p2p/12D3KooW...",
    "model": "shiza model prepare smollm2-135m",
    "model prepare": "shiza model prepare smollm2-135m",
    "swarm-key": "shiza swarm-key new swarm.key",
    "swarm-key new": "shiza swarm-key new swarm.key",
}


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in every option's help; descriptions and examples keep their line breaks."""


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version as dist_version

    try:
        return dist_version("shiza-node")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _module(command: str):  # type: ignore[no-untyped-def]
    return importlib.import_module(f"node.cli.{COMMANDS[command]}")


def _add_common(p: argparse.ArgumentParser, *, top: bool) -> None:
    # On subcommands the defaults are SUPPRESS: a flag given there overrides the top-level one,
    # and one not given there leaves the top-level value alone.
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    p.add_argument("-v", "--verbose", action="count", default=default(0),
                   help="more logging: -v info, -vv debug and tracebacks")
    p.add_argument("--log-level", choices=LEVELS, default=default(None),
                   help="log level (overrides -v)")
    p.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                   help="text for people, json (one object per line) for journald, docker and log shippers")


def _subparsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``p`` (subcommands and their own subcommands)."""
    found = []
    for action in p._actions:  # argparse keeps no public list of its subparsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found += [child, *_subparsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    codes = "\n".join(f"  {code:>3}  {what}" for code, what in EXIT_CODES.items())
    p = argparse.ArgumentParser(
        prog="shiza", description="shiza-node: p2p LLM inference", formatter_class=_Help,
        epilog=f"example:\n  shiza demo\n\nexit codes:\n{codes}")
    p.add_argument("--version", action="version", version=f"shiza {version()}")
    _add_common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        _module(command).add_parser(sub)
    for child in _subparsers(p):
        child.formatter_class = _Help
        _add_common(child, top=False)
        if child.prog.removeprefix(f"{p.prog} ") in CONFIGURABLE:
            add_config_flags(child)
        example = EXAMPLES.get(child.prog.removeprefix(f"{p.prog} "))
        if example and not child.epilog:
            child.epilog = f"example:\n  {example}"
    return p


def _words(args: argparse.Namespace) -> tuple[str, ...]:
    """The command's words: ("node", "run"), ("gateway",), ..."""
    words = (args.command,)
    nested = getattr(args, f"{args.command}_command", None)  # each nested parser's dest
    return words + ((nested,) if nested else ())


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace | int:
    """The command line over the environment's SHIZA_* and the --config file (node/cli/config.py);
    an exit code when it only printed (--print-config) or could not use them."""
    args = parser.parse_args(argv)
    command = find_parser(parser, _words(args))
    try:
        apply_settings(command, getattr(args, "config", None), os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    given = args
    args = parser.parse_args(argv)
    for action in command._actions:  # a repeatable flag given replaces the file's list
        if isinstance(action, argparse._AppendAction) and getattr(given, action.dest, None):
            setattr(args, action.dest, getattr(given, action.dest))
    if getattr(args, "print_config", False):
        print(render_toml(command, args), end="")
        return 0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if isinstance(args, int):
        return args
    from node.util.memtune import tune_malloc

    tune_malloc()  # large frames without page faults: node/util/memtune.py
    level = level_of(args.verbose, args.log_level)
    configure(level, args.log_format)
    try:
        return int(_module(args.command).run(args))
    except BaseException as exc:  # noqa: BLE001 - every failure is one line and an exit code
        if isinstance(exc, SystemExit):
            raise
        code, message = explain(exc)
        if level <= logging.DEBUG or code == EXIT_INTERNAL:
            logging.getLogger("shiza").debug("traceback of the error below", exc_info=exc)
        print(f"error: {message}", file=sys.stderr, flush=True)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
