"""How long a failover takes, from SIGKILL of a node in the route to the next token, against the
length of the history the replacement must replay.

    python -m benchmarks.failover [--model smollm2-135m] [--history 8 32 128] [--out DIR]

Real node processes on loopback: one node serving the first half of the layers and two serving
the second half; for each history length a fresh pair is started, generation runs that many
tokens, the node in the route is killed, and the client replays the history to the other one.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import trio


async def _one(model_spec: str, nodes, history: int, replay: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from node.client.swarm import SwarmClient
    from node.client.textgen import TextModel

    model = TextModel.load(model_spec)
    prompt = model.encode("Tell me a long story about a lighthouse keeper.")
    by_peer = {n.peer_id: n for n in nodes}
    marks: dict[str, float] = {}
    async with SwarmClient.open([nodes[0].addr], step_timeout_s=10, replay=replay) as client:
        route = await client.wait_for_route(model.model_id, 120, num_layers=model.num_layers)
        victim = by_peer[route[-1].peer_id]
        count = 0

        def on_tokens(tokens: list[int]) -> None:
            nonlocal count
            count += 1
            now = time.monotonic()
            if count >= 2 and "killed" not in marks:
                marks.setdefault("step_s", now - marks["last"])
            if count == history:
                os.kill(victim.proc.pid, signal.SIGKILL)
                marks["killed"] = time.monotonic()
            elif count == history + 1:
                marks["resumed"] = now
            marks["last"] = now

        result = await client.generate(model.model_id, [prompt], max_new_tokens=history + 3, route=route,
                                       on_tokens=on_tokens)
    assert result.failovers == 1, "the kill did not cause a failover"
    return {"replay": replay, "history_steps": history, "failover_s": marks["resumed"] - marks["killed"],
            "normal_step_s": marks["step_s"]}


def main(argv: list[str] | None = None) -> int:
    from node.engine.registry import resolve_model
    from node.devtools.localswarm import start_chain, stop_all

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--history", type=int, nargs="+", default=[8, 32, 128])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--replay", nargs="+", default=["exact", "merged"], choices=["exact", "merged"])
    args = ap.parse_args(argv)
    source = resolve_model(args.model)
    half = source.num_layers // 2
    rows = []
    for replay, history in [(r, h) for r in args.replay for h in args.history]:
        with tempfile.TemporaryDirectory(prefix="shiza-failover-") as tmp:
            nodes = start_chain(Path(tmp), [(0, half), (half, source.num_layers), (half, source.num_layers)],
                                model=args.model, timeout_s=300)
            try:
                row = trio.run(_one, args.model, nodes, history, replay)
            finally:
                stop_all(nodes)
        rows.append(row)
        print(f"{replay:>6} replay, history {history:>4} steps: failover {row['failover_s'] * 1000:7.0f} ms "
              f"(a normal step {row['normal_step_s'] * 1000:.0f} ms)", file=sys.stderr, flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "failover.json").write_text(json.dumps(rows, indent=1))
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
