"""``shiza gateway``: the OpenAI-compatible HTTP API in front of the swarm (node/gateway.py)."""

from __future__ import annotations

import argparse
import functools
import os
import signal
import sys
from pathlib import Path
from typing import Mapping, Sequence

import trio

DEFAULT_MODEL = "smollm2-135m"
API_KEYS_ENV = "SHIZA_API_KEYS"  # comma-separated keys, kept out of the command line (``ps``)


class ApiKeyError(ValueError):
    """An API key, or where keys come from, that cannot be used: a usage error."""


def _check_key(key: str, where: str) -> str:
    if not key:
        raise ApiKeyError(f"an empty API key in {where} would let every request in")
    if not all("\x21" <= c <= "\x7e" for c in key):
        raise ApiKeyError(f"an API key in {where} has characters other than printable ASCII "
                          "(it must fit an Authorization header)")
    return key


def read_api_keys(flags: Sequence[str], key_file: Path | None, env: Mapping[str, str]) -> list[str]:
    """The gateway's API keys, in order and without repeats: ``--api-key`` flags, then the lines
    of ``key_file`` (blank lines and ``#`` comments skipped; the file must not be accessible by
    group or others, like the swarm key), then ``SHIZA_API_KEYS``. None at all: an open
    gateway. Raises ApiKeyError for an empty or unprintable key, a file or variable that names
    none, or a file others may read."""
    keys = [_check_key(k.strip(), "--api-key") for k in flags]
    if key_file is not None:
        try:
            mode = key_file.stat().st_mode
            text = key_file.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ApiKeyError(f"cannot read API key file {key_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if os.name == "posix" and mode & 0o077:
            raise ApiKeyError(f"API key file {key_file} is accessible by group or others; chmod 600 it")
        lines = [line.strip() for line in text.splitlines()]
        from_file = [_check_key(line, str(key_file)) for line in lines if line and not line.startswith("#")]
        if not from_file:
            raise ApiKeyError(f"API key file {key_file} holds no key")
        keys += from_file
    if API_KEYS_ENV in env:
        if not env[API_KEYS_ENV].strip():
            raise ApiKeyError(f"{API_KEYS_ENV} is set but holds no API key")
        keys += [_check_key(k.strip(), API_KEYS_ENV) for k in env[API_KEYS_ENV].split(",")]
    return list(dict.fromkeys(keys))


def add_api_key_args(parser: argparse.ArgumentParser, prefix: str = "") -> None:
    """``--{prefix}api-key KEY`` (repeatable) and ``--{prefix}api-key-file FILE``."""
    parser.add_argument(f"--{prefix}api-key", action="append", default=[], metavar="KEY",
                        help="accept only requests with Authorization: Bearer KEY (repeatable; visible "
                             f"in ps: prefer --{prefix}api-key-file or {API_KEYS_ENV})")
    parser.add_argument(f"--{prefix}api-key-file", type=Path, default=None, metavar="FILE",
                        help="API keys, one per line (# comments); mode 600. Keys also come from "
                             f"{API_KEYS_ENV} (comma-separated)")


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("gateway", help="serve an OpenAI-compatible API backed by the swarm")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                   help="a peer of the swarm (repeatable)")
    p.add_argument("--swarm-key", type=Path, default=None, metavar="FILE", help="join a private swarm")
    p.add_argument("--no-push", action="store_true",
                   help="drive every hop from the gateway (no node-to-node flow, SPEC 9.6)")
    p.add_argument("--speculate", choices=("off", "ngram"), default="ngram",
                   help="draft source for speculative decoding of each request (SPEC 9.7): ngram "
                        "(prompt lookup, the default) or off")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the gateway's identity and receipt ledger (default: ~/.shiza/gateway)")
    add_api_key_args(p)
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
        api_keys = read_api_keys(args.api_key, args.api_key_file, os.environ)
    except ApiKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        models = [load_text_model(spec) for spec in (args.model or [DEFAULT_MODEL])]
    except ModelError as exc:  # e.g. the default model not prepared on a light install
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or default_data_dir() / "gateway"

    async def main() -> None:
        async with SwarmClient.open(args.bootstrap, data_dir=data_dir, swarm_key=args.swarm_key,
                                    push=not getattr(args, "no_push", False),
                                    speculate=getattr(args, "speculate", "off")) as client:
            async with trio.open_nursery() as nursery:
                port = await nursery.start(functools.partial(
                    serve_gateway, client, models, host=args.host, port=args.port, api_keys=api_keys))
                print(f"gateway ready: http://{args.host}:{port}/v1 as peer {client.identity.peer_id}", flush=True)
                for m in models:
                    print(f"  model {m.model_id}", flush=True)
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
                nursery.cancel_scope.cancel()  # stop serving; open generations settle their receipts

    trio.run(main)
    return 0
