"""``shiza generate``: one prompt through the swarm, text streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys

import trio

from protocol.errors import ShizaError
from protocol.messages import SamplingParams

from node.client.swarm import SwarmClient
from node.serve.daemon import default_data_dir
from node.client.routing import NoRoute
from node.client.textgen import TextModel, generate_text


def run_generate(args: argparse.Namespace) -> int:
    if not args.bootstrap:
        print("error: give at least one --bootstrap MULTIADDR of a node in the swarm", file=sys.stderr)
        return 2
    model = TextModel.load(args.model)
    data_dir = args.data_dir or default_data_dir() / "client"
    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed)

    async def main() -> dict[str, object]:
        async with SwarmClient.open(args.bootstrap, data_dir=data_dir, swarm_key=getattr(args, "swarm_key", None)) as client:
            route = await client.wait_for_route(model.model_id, args.wait, num_layers=model.num_layers)
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
                "ttft_s": round(result.ttft_s, 4),
                "tokens_per_s": round(result.tokens_per_s, 2),
                "model_id": model.model_id,
            }

    try:
        out = trio.run(main)
    except NoRoute as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except ShizaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 4
    if args.json:
        print(json.dumps(out))
    else:
        print()
    return 0
