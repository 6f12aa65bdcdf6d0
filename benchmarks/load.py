"""Heavy honest use through one gateway: N concurrent chat requests, none of them abuse.

    python -m benchmarks.load [--n 64] [--max-tokens 16] [--per-peer 8] [--out DIR]

A 3-node local swarm (real ``shiza node run`` processes, node/devtools/localswarm.py) serves the
small seeded test model as spans 0:2, 2:4, 4:6; one OpenAI-compatible gateway
(node/http/gateway.py, in this process, with its own identity) sends every request through the
swarm. First one request alone, then N at once. Reports what the issue asks: requests completed,
answered 503 with Retry-After, other errors; aggregate completion tokens per second against one
request alone; and, from each node's Prometheus metrics, bans and strikes (an honest gateway
must never be banned) and how many opens waited in a node's queue or were answered Busy.

Writes results.json, results.md and load.png into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

SPANS = [(0, 2), (2, 4), (4, 6)]
PROMPT = "Write a short poem about the sea."
NODE_COUNTERS = ("peer_bans", "peer_strikes", "session_opens_queued", "session_opens_busy", "sessions")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    """The node counters above from one node's /metrics (``shiza_X_total`` or ``shiza_X``)."""
    import httpx

    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        for counter in NODE_COUNTERS:
            if name in (f"shiza_{counter}_total", f"shiza_{counter}"):
                out[counter] = float(value)
    return out


async def _chat(http: Any, base: str, model_id: str, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        resp = await http.post(f"{base}/chat/completions", json={
            "model": model_id, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens, "temperature": 0})
    except Exception as exc:  # noqa: BLE001 - a transport failure is a result here
        return {"status": 0, "error": f"{type(exc).__name__}: {exc}", "s": time.perf_counter() - t0}
    took = time.perf_counter() - t0
    out: dict[str, Any] = {"status": resp.status_code, "s": took, "end": time.perf_counter()}
    if resp.status_code == 200:
        out["tokens"] = int(resp.json()["usage"]["completion_tokens"])
    else:
        out["retry_after"] = resp.headers.get("retry-after")
        out["error"] = resp.text[:300]
    return out


async def _drive(nodes: list[Any], model_dir: Path, data_dir: Path, n: int, max_tokens: int,
                 per_peer: int) -> dict[str, Any]:
    import functools

    import httpx

    from node.client.swarm import SwarmClient
    from node.client.textgen import TextModel
    from node.http.gateway import serve_gateway

    model = TextModel.load(str(model_dir))
    async with SwarmClient.open([nodes[0].addr], data_dir=data_dir) as client:
        client.pacing.per_peer = per_peer  # as the nodes were told (--peer-max-sessions)
        await client.wait_for_route(model.model_id, 120, num_layers=model.num_layers)
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_gateway, client, [model], port=0))
            base = f"http://127.0.0.1:{port}/v1"
            limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
            async with httpx.AsyncClient(timeout=600, limits=limits) as http:
                await _chat(http, base, model.model_id, max_tokens)  # warm-up: caches, connections
                singles = [await _chat(http, base, model.model_id, max_tokens) for _ in range(2)]
                results: list[dict[str, Any]] = []

                async def one() -> None:
                    results.append(await _chat(http, base, model.model_id, max_tokens))

                t0 = time.perf_counter()
                async with trio.open_nursery() as load:
                    for _ in range(n):
                        load.start_soon(one)
                wall = time.perf_counter() - t0
            nursery.cancel_scope.cancel()
    for r in results:
        if "end" in r:
            r["end"] -= t0
    return {"singles": singles, "results": results, "wall_s": wall, "busy_retries": client.pacing.busy_answers}


def run(n: int, max_tokens: int, out: Path, per_peer: int = 8) -> dict[str, Any]:
    from node.devtools.localswarm import start_chain, stop_all
    from node.engine.testing import make_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shiza-load-") as tmp:
        root = Path(tmp)
        model_dir = make_tiny_model(root / "tiny-llama", seed=0, arch="llama", num_layers=6)
        ports = [_free_port() for _ in SPANS]
        nodes = start_chain(root / "swarm", SPANS, model=str(model_dir), timeout_s=180, metrics_ports=ports,
                            extra_args=["--peer-max-sessions", str(per_peer)])
        try:
            driven = trio.run(_drive, nodes, model_dir, root / "gateway", n, max_tokens, per_peer)
            counters = [_scrape(p) for p in ports]
        finally:
            stop_all(nodes)
    singles = [r for r in driven["singles"] if r["status"] == 200]
    single_tok_s = max(r["tokens"] / r["s"] for r in singles) if singles else 0.0
    results = driven["results"]
    done = [r for r in results if r["status"] == 200]
    busy = [r for r in results if r["status"] == 503 and r.get("retry_after")]
    errors = [r for r in results if r not in done and r not in busy]
    tokens = sum(r["tokens"] for r in done)
    aggregate = tokens / driven["wall_s"] if driven["wall_s"] > 0 else 0.0
    latencies = sorted(r["s"] for r in done)
    summary = {
        "n": n, "max_tokens": max_tokens, "per_peer_sessions": per_peer, "completed": len(done), "busy_503_with_retry_after": len(busy),
        "errors": len(errors), "error_samples": [r.get("error", "") for r in errors[:3]],
        "completion_tokens": tokens, "wall_s": driven["wall_s"],
        "single_tok_s": single_tok_s, "aggregate_tok_s": aggregate,
        "aggregate_vs_single_ratio": aggregate / single_tok_s if single_tok_s else 0.0,
        "latency_p50_s": latencies[len(latencies) // 2] if latencies else None,
        "latency_max_s": latencies[-1] if latencies else None,
        "client_busy_retries": driven["busy_retries"],
        "bans_total": sum(c.get("peer_bans", 0) for c in counters),
        "strikes_total": sum(c.get("peer_strikes", 0) for c in counters),
        "opens_queued_total": sum(c.get("session_opens_queued", 0) for c in counters),
        "opens_busy_total": sum(c.get("session_opens_busy", 0) for c in counters),
        "per_node": counters,
    }
    (out / "results.json").write_text(json.dumps({**summary, "requests": results}, indent=2))
    (out / "results.md").write_text(_markdown(summary))
    _plot(results, single_tok_s, aggregate, out / "load.png")
    return summary


def _markdown(s: dict[str, Any]) -> str:
    rows = [("concurrent requests", s["n"]), ("sessions a node allows the gateway", s["per_peer_sessions"]),
            ("completed", s["completed"]),
            ("503 with Retry-After", s["busy_503_with_retry_after"]), ("other errors", s["errors"]),
            ("one request alone, tokens/s", f"{s['single_tok_s']:.1f}"),
            ("aggregate, tokens/s", f"{s['aggregate_tok_s']:.1f}"),
            ("aggregate / one alone", f"{s['aggregate_vs_single_ratio']:.2f}x"),
            ("latency p50 / max, s", f"{s['latency_p50_s'] or 0:.1f} / {s['latency_max_s'] or 0:.1f}"),
            ("opens that waited in a node's queue", int(s["opens_queued_total"])),
            ("opens answered Busy / client retries", f"{int(s['opens_busy_total'])} / {s['client_busy_retries']}"),
            ("strikes / bans (all nodes)", f"{int(s['strikes_total'])} / {int(s['bans_total'])}")]
    return "| load through one gateway | |\n| --- | --- |\n" + "".join(f"| {a} | {b} |\n" for a, b in rows)


def _plot(results: list[dict[str, Any]], single: float, aggregate: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ends = sorted(r["end"] for r in results if r["status"] == 200 and "end" in r)
    left.step([0.0, *ends], list(range(len(ends) + 1)), where="post")
    left.set_xlabel("seconds since the burst")
    left.set_ylabel("requests completed")
    left.set_title(f"{len(results)} concurrent chat requests, one gateway")
    right.bar(["one alone", f"{len(results)} at once"], [single, aggregate], color=["#888", "#2a7"])
    right.set_ylabel("completion tokens / s")
    right.set_title(f"aggregate {aggregate / single:.1f}x one request" if single else "aggregate")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    import logging

    p = argparse.ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=64, help="concurrent chat requests")
    p.add_argument("--max-tokens", type=int, default=16, help="completion tokens per request")
    p.add_argument("--per-peer", type=int, default=8,
                   help="sessions a node allows one peer (--peer-max-sessions) and the gateway paces to")
    p.add_argument("--out", type=Path, default=Path("bench-out/load"))
    args = p.parse_args(argv)
    logging.getLogger("libp2p").setLevel(logging.ERROR)
    summary = run(args.n, args.max_tokens, args.out, args.per_peer)
    print(_markdown(summary))
    print(f"wrote {args.out}/results.json, results.md, load.png", file=sys.stderr)
    return 0 if summary["completed"] + summary["busy_503_with_retry_after"] == args.n else 1


if __name__ == "__main__":
    raise SystemExit(main())
