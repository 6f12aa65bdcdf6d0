"""``shiza generate``: one prompt through the swarm, text streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import trio

from protocol.errors import ShizaError
from protocol.messages import SamplingParams

from node.client.drafts import DRAFTERS
from node.client.swarm import SwarmClient
from node.util.dirs import default_data_dir
from node.client.routing import NoRoute
from node.client.errors import ClientError, InvalidRequest
from node.client.textgen import generate_text
from node.cli.model import load_text_model
from node.models import DEFAULT_MODEL, ModelError


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
    gen.add_argument("--speculate", choices=(*DRAFTERS, "model"), default="ngram",
                     help="draft source for speculative decoding (SPEC 9.7): ngram (prompt lookup, the "
                          "default), model (a draft model run here, --draft-model) or off (one token per pass)")
    gen.add_argument("--draft-model", default=None, metavar="MODEL",
                     help="with --speculate model: a smaller model with the same tokenizer (a name or a "
                          "checkpoint dir); it runs in this process, on torch")
    gen.add_argument("--no-push", action="store_true",
                     help="drive every hop from this client (no node-to-node flow, SPEC 9.6)")
    gen.add_argument("--wait", type=float, default=60.0, help="seconds to wait for full coverage")
    gen.add_argument("--data-dir", type=Path, default=None,
                     help="keep this agent's identity and receipt ledger here (default: ~/.shiza/client)")
    gen.add_argument("--swarm-key", type=Path, default=None, metavar="FILE",
                     help="the key of a private swarm (see `shiza node run --swarm-key`)")


def run(args: argparse.Namespace) -> int:
    if not args.bootstrap:
        print("error: give at least one --bootstrap MULTIADDR of a node in the swarm", file=sys.stderr)
        return 2
    try:
        model = load_text_model(args.model)
    except ModelError as exc:  # e.g. the default model not prepared on a light install
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_dir = args.data_dir or default_data_dir() / "client"
    speculate = getattr(args, "speculate", "off")
    if speculate == "model":
        if not getattr(args, "draft_model", None):
            print("error: --speculate model needs --draft-model MODEL (a smaller model with the same tokenizer)",
                  file=sys.stderr)
            return 2
        try:
            from node.engine.draft import model_drafters
        except ImportError as exc:  # a light install without torch
            print(f"error: --speculate model needs torch ({exc}); use --speculate ngram", file=sys.stderr)
            return 2
        speculate = model_drafters(args.draft_model)
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    async def main() -> dict[str, object]:
        async with SwarmClient.open(args.bootstrap, data_dir=data_dir, swarm_key=getattr(args, "swarm_key", None),
                                    push=not getattr(args, "no_push", False),
                                    speculate=speculate) as client:
            if client.host is not None and not client.host.connected_peers():
                raise ConnectionError(f"none of the {len(args.bootstrap)} bootstrap peer(s) answered "
                              f"({', '.join(args.bootstrap)}): check each address and that a node runs there")
            t0 = time.monotonic()
            route = await client.wait_for_route(model.model_id, args.wait, num_layers=model.num_layers)
            coverage_s = time.monotonic() - t0  # connected to a bootstrap peer to a full route found
            on_text = None if args.json else (lambda s: print(s, end="", flush=True))
            text, prompt_ids, result = await generate_text(
                client, model, args.prompt, raw=args.raw, max_new_tokens=args.max_new_tokens,
                sampling=sampling, on_text=on_text, route=route,
            )
            return {
                "text": text,
                "prompt_token_ids": prompt_ids,
                "token_ids": result.token_ids[0],
                "route": [{"peer": h.peer_id, "start": h.start, "end": h.end} for h in route],
                "coverage_s": round(coverage_s, 4),
                "ttft_s": round(result.ttft_s, 4),
                "tokens_per_s": round(result.tokens_per_s, 2),
                "pushed_steps": result.pushed_steps,
                "speculate": result.speculate,
                "passes": result.passes,
                "drafted": result.drafted,
                "accepted": result.accepted,
                "model_id": model.model_id,
            }

    try:
        out = trio.run(main)
    except NoRoute as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except InvalidRequest as exc:  # e.g. an unusable --swarm-key file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ClientError, ShizaError) as exc:  # a peer refused or failed (a PeerError is both)
        print(f"error: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(out))
    else:
        print()
    return 0
