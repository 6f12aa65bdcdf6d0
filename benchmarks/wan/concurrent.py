"""N concurrent generations from one process: the aggregate tokens/s of a swarm under load.

    python -m benchmarks.wan.concurrent --model PATH --bootstrap ADDR --sessions 16 --tokens 32 \\
        [--mode push|client] [--per-client 8] [--data-dir DIR]

Run by benchmarks/wan/pipeline.py inside the client's namespace. A node holds at most
``PeerLimits.max_sessions`` (8) sessions per client peer, and a SwarmClient's pacer never asks a
peer for more (node/client/pacing.py), so the N sessions are spread round-robin over
ceil(N / per-client) SwarmClients, each its own identity (and, under ``--data-dir``, its own
ledger in DIR/client-K). Each client first waits for a route and runs one short warm-up
generation (connections, caches); then all N generations start together in one trio nursery.

Tokenizer-free: the prompt is a fixed list of token ids and no EOS is given, so every session
asks for ``--tokens`` new tokens; what came back is counted (``len(token_ids[0])``) all the same.

Prints one JSON object (``summarize``): total new tokens, the wall time from the first start to
the last finish, their quotient (aggregate tokens/s), the per-session decode tokens/s (as
``shiza generate --json`` reports it) and their median, TTFTs, pushed steps and errors. Exits 1
when no session finished.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Sequence

PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 5140]
PER_CLIENT = 8  # PeerLimits.max_sessions (node/serve/limits.py) and pacing.DEFAULT_PER_PEER


def clients_for(sessions: int, per_client: int = PER_CLIENT) -> int:
    """How many client identities ``sessions`` need at ``per_client`` sessions each (at least 1)."""
    if per_client < 1:
        raise ValueError("per_client must be at least 1")
    return max(1, math.ceil(sessions / per_client))


def summarize(runs: Sequence[dict], clients: int) -> dict:
    """The numbers of one concurrent run. ``runs``: per session ``start``/``end`` (seconds on one
    clock), and either ``tokens``, ``tokens_per_s``, ``ttft_s``, ``pushed_steps`` or ``error``.

    aggregate tokens/s = all new tokens / (last end - first start), over the sessions that
    finished; the window still opens at the first start of any session (a failed one too)."""
    ok = [r for r in runs if "error" not in r]
    errors = [r["error"] for r in runs if "error" in r]
    total = sum(r["tokens"] for r in ok)
    wall = (max(r["end"] for r in ok) - min(r["start"] for r in runs)) if ok else 0.0
    per = [r["tokens_per_s"] for r in ok]
    t0 = min(r["start"] for r in runs) if runs else 0.0
    return {
        "sessions": len(runs),
        "clients": clients,
        "finished": len(ok),
        "tokens_total": total,
        "tokens_per_session": [r["tokens"] for r in ok],
        "wall_s": round(wall, 4),
        "aggregate_tokens_per_s": round(total / wall, 2) if wall > 0 else 0.0,
        "session_tokens_per_s": [round(v, 2) for v in per],
        "session_start_s": [round(r["start"] - t0, 3) for r in ok],  # from the first start
        "session_end_s": [round(r["end"] - t0, 3) for r in ok],
        "median_session_tokens_per_s": round(statistics.median(per), 2) if per else 0.0,
        "median_ttft_s": round(statistics.median(r["ttft_s"] for r in ok), 4) if ok else None,
        "pushed_steps": [r["pushed_steps"] for r in ok],
        "errors": errors,
    }


async def measure(model: str, bootstrap: Sequence[str], sessions: int, tokens: int, push: bool,
                  per_client: int = PER_CLIENT, data_dir: Path | None = None, wait_s: float = 120.0,
                  warmup_tokens: int = 4) -> dict:
    import trio

    from node.client.swarm import SwarmClient
    from node.engine.registry import resolve_model

    src = resolve_model(model)
    k = clients_for(sessions, per_client)
    async with AsyncExitStack() as stack:
        clients = []
        for i in range(k):
            dd = None if data_dir is None else data_dir / f"client-{i}"
            clients.append(await stack.enter_async_context(SwarmClient.open(list(bootstrap), data_dir=dd, push=push)))
        routes: list = [None] * k

        async def warm(i: int) -> None:
            routes[i] = await clients[i].wait_for_route(src.model_id, wait_s, num_layers=src.num_layers)
            await clients[i].generate(src.model_id, [PROMPT_IDS], max_new_tokens=warmup_tokens, route=routes[i])

        async with trio.open_nursery() as nursery:
            for i in range(k):
                nursery.start_soon(warm, i)

        runs: list[dict] = [{} for _ in range(sessions)]

        async def one(j: int) -> None:
            c = j % k
            r = runs[j]
            r["start"] = time.perf_counter()
            try:
                res = await clients[c].generate(src.model_id, [PROMPT_IDS], max_new_tokens=tokens, route=routes[c])
            except Exception as exc:  # noqa: BLE001 - a failed session is reported, the others go on
                r["end"] = time.perf_counter()
                r["error"] = f"session {j} (client {c}): {type(exc).__name__}: {exc}"
                return
            r["end"] = time.perf_counter()
            r.update(tokens=len(res.token_ids[0]), tokens_per_s=res.tokens_per_s, ttft_s=res.ttft_s,
                     pushed_steps=res.pushed_steps)

        async with trio.open_nursery() as nursery:
            for j in range(sessions):
                nursery.start_soon(one, j)
    return summarize(runs, k)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan.concurrent", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--bootstrap", action="append", required=True)
    p.add_argument("--sessions", type=int, required=True)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--mode", choices=("client", "push"), default="push")
    p.add_argument("--per-client", type=int, default=PER_CLIENT)
    p.add_argument("--data-dir", type=Path, default=None)
    p.add_argument("--wait", type=float, default=120.0)
    args = p.parse_args(argv)
    if args.sessions < 1:
        p.error("--sessions must be at least 1")
    import trio

    out = trio.run(measure, args.model, args.bootstrap, args.sessions, args.tokens, args.mode == "push",
                   args.per_client, args.data_dir, args.wait)
    out["mode"] = args.mode
    print(json.dumps(out), flush=True)
    return 0 if out["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
