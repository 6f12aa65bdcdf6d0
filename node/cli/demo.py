"""``shiza demo`` / ``make demo``: a local three-node swarm answers a question.

Starts one node process per span on loopback, waits until the DHT shows full coverage, streams
the answer, prints the route, compares decode speed with the same model in one process, and
stops the nodes gracefully.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio

from node.client.swarm import SwarmClient
from node.devtools.localswarm import NodeProcess, start_chain, stop_all
from node.client.routing import NoRoute
from node.client.textgen import TextModel, generate_text
from node.cli.model import load_text_model
from node.models import DEFAULT_MODEL


def _spans(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, b = part.split(":")
        out.append((int(a), int(b)))
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    demo = sub.add_parser("demo", help="start a local 3-node swarm and ask it a question")
    demo.add_argument("--model", default=DEFAULT_MODEL)
    demo.add_argument("--prompt", default="What is the capital of France?")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    demo.add_argument("--spans", default="0:10,10:20,20:30")
    demo.add_argument("--no-baseline", action="store_true", help="skip the one-process comparison")


def run(args: argparse.Namespace) -> int:
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    say(f"[1/5] preparing {args.model} (converted once, then cached)")
    model = load_text_model(args.model)  # converts the default model on first use
    say(f"      model id {model.model_id}")
    spans = _spans(args.spans)
    with tempfile.TemporaryDirectory(prefix="shiza-demo-") as tmp:
        say(f"[2/5] starting {len(spans)} nodes on 127.0.0.1: spans {args.spans}")
        t0 = time.monotonic()
        nodes = start_chain(Path(tmp), spans, model=args.model)
        try:
            for n in nodes:
                say(f"      node {n.peer_id} layers {n.info['start']}:{n.info['end']} at {n.addr}")
            say(f"      all nodes ready in {time.monotonic() - t0:.1f} s")
            result = trio.run(_ask, nodes, model, args, say)
        finally:
            say("[5/5] stopping the nodes (SIGTERM: drain, withdraw records)")
            codes = stop_all(nodes)
            say(f"      exit codes {codes}")
    if result is None:
        return 1
    if not args.no_baseline:
        from benchmarks.baseline import monolithic_greedy

        prompt_ids, token_ids, piped_tps = result
        say("      comparing with the whole model in this process ...")
        base = monolithic_greedy(args.model, prompt_ids, len(token_ids))
        same = base.token_ids == token_ids
        say(f"      one process: {base.tokens_per_s:.1f} tok/s; pipelined over {len(spans)} nodes: "
            f"{piped_tps:.1f} tok/s (ratio {piped_tps / base.tokens_per_s:.2f}); "
            f"identical tokens: {'yes' if same else 'NO'}")
        if not same:
            return 1
    return 0


async def _ask(nodes: list[NodeProcess], model: TextModel, args: argparse.Namespace, say):  # type: ignore[no-untyped-def]
    async with SwarmClient.open([nodes[0].addr]) as client:
        say("[3/5] waiting for full coverage in the DHT")
        try:
            route = await client.wait_for_route(model.model_id, 120, num_layers=model.num_layers)
        except NoRoute as exc:
            say(f"error: {exc}")
            return None
        say(f"[4/5] asking: {args.prompt}")
        print("      answer: ", end="", flush=True)
        text, prompt_ids, result = await generate_text(
            client, model, args.prompt, max_new_tokens=args.max_new_tokens,
            on_text=lambda s: print(s, end="", flush=True), route=route,
        )
        print(flush=True)
        say("      route:")
        for i, hop in enumerate(route):
            say(f"        hop {i + 1}: {hop.peer_id} layers {hop.start}:{hop.end}")
        say(f"      {len(result.token_ids[0])} tokens, time to first token {result.ttft_s * 1000:.0f} ms, "
            f"{result.tokens_per_s:.1f} tok/s decode")
        return prompt_ids, result.token_ids[0], result.tokens_per_s
