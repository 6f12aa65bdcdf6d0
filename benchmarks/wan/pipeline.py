"""One session through 3 nodes and a client, each in its own namespace, at chosen one-way delays.

    sudo .venv/bin/python -m benchmarks.wan [--model tiny|smollm2-135m|DIR] [--delays 0,10,25,50]
        [--tokens 32] [--repeats 2] [--out DIR]

Every link between two hosts (node-node and client-node) gets the same one-way delay. For each
delay it runs ``shiza generate --json`` in the client's namespace and reads the session's
tokens/s and time to first token, and prints beside them what the client-driven cost model
predicts (ARCHITECTURE.md, "How a token travels"):

    seconds per token = t_compute + legs x one-way delay,   legs = 2 x hops

where t_compute (engine and protocol time per token, everything but the wire) is measured at the
first delay of the list (0 ms by default: 1 / tokens/s there). results.json and results.md go to
``--out``. The nodes keep running between delays; only the forwarder is restarted with the new
delay.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from node.devtools.localswarm import stop_all
from node.devtools.netns import Network, start_node, tcp_round_trips, why_unavailable

NODES = ("n1", "n2", "n3")
CLIENT = "c"
PROMPT = "The capital of France is"


@dataclass
class Point:
    delay_ms: float
    tcp_rtt_ms: float  # a plain TCP round trip client to node, the injector's check (2 x delay)
    tokens_per_s: float
    ttft_s: float
    per_token_ms: float
    predicted_tokens_per_s: float | None = None
    predicted_per_token_ms: float | None = None
    measured_vs_predicted_ratio: float | None = None


def client_driven_s_per_token(compute_s: float, hops: int, delay_s: float) -> float:
    """Seconds per decoded token when every activation passes the client: 2 x hops legs."""
    return compute_s + 2 * hops * delay_s


def spans_of(num_layers: int, hops: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_layers / hops) for i in range(hops + 1)]
    return [(cuts[i], cuts[i + 1]) for i in range(hops)]


def _model(name: str, work: Path) -> tuple[str, int]:
    from node.engine.registry import resolve_model

    if name == "tiny":
        from node.engine.testing import make_tiny_model

        path = make_tiny_model(work / "tiny", seed=0, arch="llama", num_layers=6)
        return str(path), 6
    return name, resolve_model(name).num_layers


def _generate(net: Network, model: str, bootstrap: str, tokens: int, data_dir: Path) -> dict:
    done = net.run(CLIENT, [sys.executable, "-m", "node", "generate", "--model", model, "--raw", "--json",
                            "--max-new-tokens", str(tokens), "--wait", "120", "--data-dir", str(data_dir),
                            "--bootstrap", bootstrap, PROMPT], check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"generate failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(model: str, delays: Sequence[float], tokens: int, repeats: int, work: Path) -> list[Point]:
    model_path, num_layers = _model(model, work)
    spans = spans_of(num_layers, len(NODES))
    points: list[Point] = []
    with Network([*NODES, CLIENT], delay_ms=delays[0], log_dir=work) as net:
        nodes = []
        try:
            for host, span in zip(NODES, spans):
                boot = [nodes[0].addr] if nodes else []
                nodes.append(start_node(net, host, work / host, model=model_path, layers=span, bootstrap=boot))
                if len(nodes) == 1:
                    nodes[0].wait_ready(600)
            for n in nodes:
                n.wait_ready(600)
            for delay in delays:
                net.reconfigure(delay_ms=delay)
                rtt = statistics.median(tcp_round_trips(net, CLIENT, NODES[0], n=10)) * 1000
                _generate(net, model_path, nodes[-1].addr, 4, work / "client")  # warm: caches, routes
                runs = [_generate(net, model_path, nodes[-1].addr, tokens, work / "client") for _ in range(repeats)]
                tok_s = statistics.median(r["tokens_per_s"] for r in runs)
                ttft = statistics.median(r["ttft_s"] for r in runs)
                points.append(Point(delay, round(rtt, 2), tok_s, round(ttft, 3), round(1000 / tok_s, 1)))
                print(f"delay {delay:5.1f} ms: tcp rtt {rtt:6.1f} ms, {tok_s:6.2f} tok/s, ttft {ttft:.3f} s",
                      flush=True)
        finally:
            stop_all(nodes)
    compute_s = 1 / points[0].tokens_per_s - 2 * len(NODES) * points[0].delay_ms / 1000
    for p in points:
        s = client_driven_s_per_token(compute_s, len(NODES), p.delay_ms / 1000)
        p.predicted_per_token_ms = round(s * 1000, 1)
        p.predicted_tokens_per_s = round(1 / s, 2)
        p.measured_vs_predicted_ratio = round(p.tokens_per_s / p.predicted_tokens_per_s, 3)
    return points


def markdown(points: Sequence[Point], hops: int) -> str:
    rows = ["| one-way delay (ms) | TCP RTT (ms) | tok/s | predicted tok/s | ratio | ms/token | predicted ms/token | TTFT (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in points:
        rows.append(f"| {p.delay_ms:g} | {p.tcp_rtt_ms} | {p.tokens_per_s} | {p.predicted_tokens_per_s} | "
                    f"{p.measured_vs_predicted_ratio} | {p.per_token_ms} | {p.predicted_per_token_ms} | {p.ttft_s} |")
    rows.append(f"\nCost model (client-driven, {hops} hops): s/token = t_compute + {2 * hops} x one-way delay; "
                "t_compute from the first row.")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (a seeded random 6-layer Llama), smollm2-135m or a DIR")
    p.add_argument("--delays", default="0,10,25,50", help="one-way delays per link, ms, comma-separated")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("bench-wan"))
    args = p.parse_args(argv)
    reason = why_unavailable()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    delays = [float(d) for d in args.delays.split(",")]
    # SIGTERM unwinds like Ctrl-C: the nodes stop and the namespaces go (node/devtools/netns.py)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shiza-wan-") as tmp:
        points = run(args.model, delays, args.tokens, args.repeats, Path(tmp))
    table = markdown(points, len(NODES))
    print(table)
    (args.out / "results.json").write_text(json.dumps(
        {"model": args.model, "hops": len(NODES), "tokens": args.tokens, "mode": "client-driven",
         "points": [asdict(p) for p in points], "wall_s": round(time.monotonic() - t0, 1),
         "pid": os.getpid()}, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    return 0
