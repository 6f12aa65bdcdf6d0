"""``shiza bench``: throughput and latency of the swarm against the monolithic baseline.

    shiza bench --quick --out bench-out     # a few minutes on 2 cores; a tiny 6 x 256 model
    shiza bench --out bench-out             # SmolLM2-135M, 1-32 sessions, DHT up to 32 peers

Writes results.json (every figure, and each ratio under a key containing ``ratio`` that names
both sides), results.md (the same as tables) and two plots into ``--out``. Everything runs on
loopback: pipelines use real node processes (node.localswarm); the DHT part uses in-process
libp2p hosts with real signed records.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks import measure


@dataclass(frozen=True)
class Plan:
    model: str | None  # None: a tiny seeded model written into the output directory
    tiny_hidden: int
    new_tokens: int
    hops: tuple[int, ...]
    concurrency: tuple[int, ...]
    dht_sizes: tuple[int, ...]
    codec_sizes: tuple[int, ...]
    rounds: int
    receipts: int


PLANS = {
    "full": Plan("smollm2-135m", 0, 32, (1, 2, 3), (1, 4, 16, 32), (4, 8, 16, 32), (1, 256, 1820), 200, 2000),
    "quick": Plan(None, 256, 16, (1, 2, 3), (1, 4, 16), (4, 8), (1, 256, 1820), 100, 500),
    "smoke": Plan(None, 64, 6, (3,), (1, 4), (4,), (1, 256), 20, 100),
}


WAN_DELAYS = "0,10,25,50"


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="benchmarks against the monolithic baseline")
    p.add_argument("--quick", action="store_true", help="a few minutes: tiny model, fewer sessions")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: smallest run
    p.add_argument("--model", default=None, help="override the model (smollm2-135m or a path)")
    p.add_argument("--out", type=Path, default=Path("bench-out"), help="output directory")
    p.add_argument("--wan", action="store_true",
                   help="root: 3 nodes and a client in network namespaces at one-way delays per link "
                        "(benchmarks/wan; --model defaults to the tiny model there)")
    p.add_argument("--wan-delays", default=WAN_DELAYS, help="--wan: one-way delays, ms, comma-separated")
    p.add_argument("--discovery", action="store_true",
                   help="root: 10, 30 and 100 DHT peers as processes across network namespaces, at 0 and 25 ms "
                        "one way per link: time to a model's full coverage and one lookup "
                        "(benchmarks/wan/discovery.py; --wan-delays sets the delays)")
    p.add_argument("--engines", action="store_true",
                   help="one span on transformers and on vLLM (.venv-vllm), batch 1 and 16, and the "
                        "vLLM worker channel's cost (benchmarks/engines.py; --model defaults to smollm2-135m)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "engines", False):
        from benchmarks.engines import main as run_engines

        return run_engines(["--model", args.model or "smollm2-135m", "--out", str(args.out)])
    if getattr(args, "wan", False):
        from benchmarks.wan.pipeline import main as run_wan

        return run_wan(["--model", args.model or "tiny", "--delays", args.wan_delays, "--out", str(args.out)])
    if getattr(args, "discovery", False):
        from benchmarks.wan.discovery import main as run_discovery

        delays = args.wan_delays if args.wan_delays != WAN_DELAYS else "0,25"
        return run_discovery(["--delays", delays, "--out", str(args.out)])
    name = "smoke" if args.smoke else "quick" if args.quick else "full"
    plan = PLANS[name]
    if args.model:
        plan = Plan(args.model, *[getattr(plan, f) for f in list(Plan.__dataclass_fields__)[1:]])
    results = run_suite(plan, args.out, mode=name)
    print(f"wrote {args.out}/results.json, results.md, throughput.png, hops.png", file=sys.stderr)
    print((args.out / "results.md").read_text())
    return 0 if results else 1


def run_suite(plan: Plan, out: Path, mode: str = "quick") -> dict[str, Any]:
    from tqdm import tqdm

    logging.getLogger("libp2p").setLevel(logging.ERROR)
    out.mkdir(parents=True, exist_ok=True)
    model = plan.model
    if model is None:
        from node.engine.testing import make_tiny_model

        path = out / f"tiny-llama-6x{plan.tiny_hidden}"
        if not (path / "config.json").exists():
            make_tiny_model(path, seed=0, num_layers=6, hidden_size=plan.tiny_hidden)
        model = str(path)
    from node.engine.registry import resolve_model

    source = resolve_model(model, progress=False)
    r: dict[str, Any] = {"mode": mode, "model": model, "model_id": source.model_id,
                         "num_layers": source.num_layers, "hidden_size": source.hidden_size,
                         "new_tokens": plan.new_tokens, "started": time.time()}
    stages: list[tuple[str, Callable[[], None]]] = [
        ("monolithic", lambda: r.update(monolithic=measure.monolithic(model, plan.new_tokens))),
        *[(f"pipeline {h}", (lambda h=h: r.setdefault("pipeline", {}).update(
            {str(h): measure.pipeline(model, h, plan.new_tokens, list(plan.concurrency), out,
                                      libp2p_single=h == max(plan.hops))})))
          for h in plan.hops],
        ("round trips", lambda: r.update(round_trip=measure.round_trips(
            source.hidden_size * 4 + 120, plan.rounds))),
        ("step profile", lambda: r.update(step_profile=measure.step_profile(model, plan.rounds))),
        ("codec", lambda: r.update(codec=measure.codec(source.hidden_size, list(plan.codec_sizes),
                                                       max(3, plan.rounds // 10)))),
        ("receipts", lambda: r.update(receipts=measure.receipts(plan.receipts))),
        ("dht", lambda: r.update(dht=measure.dht(list(plan.dht_sizes)))),
    ]
    with tqdm(stages, desc="bench", file=sys.stderr, unit="stage") as bar:
        for label, fn in bar:
            bar.set_postfix_str(label)
            fn()
    r["elapsed_s"] = time.time() - r["started"]
    _ratios(r)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")
    (out / "results.md").write_text(markdown(r))
    _plots(r, out)
    return r


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _ratios(r: dict[str, Any]) -> None:
    """Every figure against its baseline from the same run.

    Per pipeline: ``per_hop_overhead_s`` is the protocol's cost of one hop of a decode step:
    the client's time per decode token minus the nodes' engine time for it (their metrics),
    over the hops; it is set beside the round trip of one activation over plain TCP, the
    direct channel and libp2p. ``per_hop_split_cost_s`` is the client's time per token minus
    the monolithic one, over the hops: the overhead plus any engine slowdown from splitting
    the model over processes that share this machine's cores."""
    mono = r["monolithic"]
    mono_tok_s = mono["monolithic_b1_tok_s"]
    mono_step_s = 1.0 / mono_tok_s
    rt = r["round_trip"]
    rt["libp2p_vs_tcp_rtt_ratio"] = rt["libp2p_rtt_s"] / rt["tcp_rtt_s"]
    rt["direct_vs_tcp_rtt_ratio"] = rt["direct_rtt_s"] / rt["tcp_rtt_s"]
    rt["libp2p_vs_direct_rtt_ratio"] = rt["libp2p_rtt_s"] / rt["direct_rtt_s"]
    for h, p in r.get("pipeline", {}).items():
        hops = int(h)
        p[f"pipeline{h}_vs_monolithic_ratio"] = p["single_tok_s"] / mono_tok_s
        p[f"pipeline{h}_ttft_vs_monolithic_ttft_ratio"] = p["ttft_s"] / mono["monolithic_ttft_s"]
        single_agg = p["aggregate_tok_s"].get("1") or p["single_tok_s"]
        p["aggregate_vs_single_session_ratio"] = {
            c: v / single_agg for c, v in p["aggregate_tok_s"].items()}
        step_s = p.get("client_step_s") or _div(1.0, p["single_tok_s"])
        compute = p.get("node_compute_per_token_s")
        p["time_per_token_s"] = step_s
        overhead = (step_s - compute) / hops if step_s is not None and compute is not None else None
        p["per_hop_overhead_s"] = overhead
        for side in ("tcp", "direct", "libp2p"):
            p[f"per_hop_overhead_vs_{side}_rtt_ratio"] = _div(overhead, rt[f"{side}_rtt_s"])
        split = (step_s - mono_step_s) / hops if step_s is not None else None
        p["per_hop_split_cost_s"] = split
        p["per_hop_split_cost_vs_tcp_rtt_ratio"] = _div(split, rt["tcp_rtt_s"])
        p["node_compute_vs_monolithic_step_ratio"] = _div(compute, mono_step_s)
        if "single_tok_s_client_driven" in p:  # node-to-node flow against the client driving
            p["push_vs_client_driven_single_session_ratio"] = _div(p["single_tok_s"],
                                                                   p["single_tok_s_client_driven"])
            step3, compute3 = p["client_step_s_client_driven"], p["node_compute_per_token_s_client_driven"]
            p["per_hop_overhead_client_driven_s"] = (
                (step3 - compute3) / hops if step3 is not None and compute3 is not None else None)
        if "single_tok_s_libp2p" in p:
            p["direct_vs_libp2p_single_session_ratio"] = _div(  # both driven by the client
                p.get("single_tok_s_client_driven", p["single_tok_s"]), p["single_tok_s_libp2p"])
            step2, compute2 = p["client_step_s_libp2p"], p["node_compute_per_token_s_libp2p"]
            p["per_hop_overhead_libp2p_s"] = (
                (step2 - compute2) / hops if step2 is not None and compute2 is not None else None)
    sp = r["step_profile"]
    sp["scheduler_overhead_vs_direct_step_ratio"] = (
        sp["one_layer_step_scheduled_s"] / sp["one_layer_step_direct_s"])
    rec = r["receipts"]
    rec["verify_vs_sign_ratio"] = rec["verify_per_s"] / rec["sign_per_s"]
    rec["commit_vs_sign_ratio"] = rec["commit_per_s"] / rec["sign_per_s"]
    sizes = sorted(r["dht"], key=int)
    base = r["dht"][sizes[0]].get("publish_to_coverage_s")
    for n in sizes:
        d = r["dht"][n]
        v = d.get("publish_to_coverage_s")
        d[f"coverage_vs_{sizes[0]}_nodes_ratio"] = v / base if v and base else None


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if abs(v) >= 100:
            return f"{v:,.0f}{unit}"
        return f"{v:.3g}{unit}"
    return f"{v}{unit}"


def _ms(v: float | None) -> str:
    return _fmt(v * 1e3 if v is not None else None)


def markdown(r: dict[str, Any]) -> str:
    m = r["monolithic"]
    lines = [f"# shiza bench ({r['mode']})", "",
             f"Model `{Path(r['model']).name}` ({r['num_layers']} layers, hidden {r['hidden_size']}), "
             f"{r['new_tokens']} new tokens per session, loopback, CPU; run took "
             f"{r['elapsed_s']:.0f} s. Numbers from a shared, noisy 2-core machine: magnitudes.", "",
             "| baseline (one process) | value |", "| --- | --- |",
             f"| decode batch 1 | {_fmt(m['monolithic_b1_tok_s'])} tok/s |",
             f"| decode batch 8 | {_fmt(m['monolithic_b8_tok_s'])} tok/s "
             f"({_fmt(m['monolithic_b8_vs_b1_ratio'])}x batch 1) |",
             f"| time to first token | {_fmt(m['monolithic_ttft_s'] * 1e3)} ms |", ""]
    pipes = r.get("pipeline", {})
    if pipes:
        concs = list(next(iter(pipes.values()))["aggregate_tok_s"])
        lines += ["| nodes | tok/s (1 session) | vs monolithic | TTFT ms | engine ms/token "
                  "| per-hop overhead ms | vs TCP RTT | split cost per hop ms | "
                  + " | ".join(f"{c} sessions tok/s (x single)" for c in concs)
                  + " |", "| --- " * (8 + len(concs)) + "|"]
        for h, p in pipes.items():
            aggs = " | ".join(f"{_fmt(p['aggregate_tok_s'][c])} "
                              f"({_fmt(p['aggregate_vs_single_session_ratio'][c])}x)" for c in concs)
            lines.append(f"| {h} | {_fmt(p['single_tok_s'])} | "
                         f"{_fmt(p[f'pipeline{h}_vs_monolithic_ratio'])} | {_fmt(p['ttft_s'] * 1e3)} | "
                         f"{_ms(p['node_compute_per_token_s'])} | {_ms(p['per_hop_overhead_s'])} | "
                         f"{_fmt(p['per_hop_overhead_vs_tcp_rtt_ratio'])}x | "
                         f"{_ms(p['per_hop_split_cost_s'])} | {aggs} |")
        lines += ["", "Engine ms/token: the nodes' own engine time per decode token (their "
                  "`shiza_step_duration_seconds`), summed over the chain. Per-hop overhead: the "
                  "client's time per decode token minus that, over the hops (protocol and "
                  "transport). Split cost: the client's time per token minus one process's, over "
                  "the hops (the overhead plus slower engines when processes share cores).", ""]
        for h, p in pipes.items():
            if "single_tok_s_client_driven" in p:
                lines += [f"{h} nodes, activations node to node (SPEC 9.6, the table above; "
                          f"{p.get('pushed_steps', 0)} hop steps pushed) against the client driving "
                          f"every hop: {_fmt(p['single_tok_s'])} vs "
                          f"{_fmt(p['single_tok_s_client_driven'])} tok/s "
                          f"({_fmt(p['push_vs_client_driven_single_session_ratio'])}x); per-hop overhead "
                          f"{_ms(p['per_hop_overhead_s'])} vs {_ms(p['per_hop_overhead_client_driven_s'])} ms.", ""]
            if "single_tok_s_libp2p" in p:
                lines += [f"{h} nodes, one session driven by the client on libp2p streams instead (`direct=False`): "
                          f"{_fmt(p['single_tok_s_libp2p'])} tok/s, per-hop overhead "
                          f"{_ms(p['per_hop_overhead_libp2p_s'])} ms; the direct channel gives "
                          f"{_fmt(p['direct_vs_libp2p_single_session_ratio'])}x the tokens/s.", ""]
            if p.get("direct_fallbacks"):
                lines += [f"Warning: {p['direct_fallbacks']} hop(s) of the {h}-node pipeline fell "
                          "back to libp2p streams (the direct channel failed).", ""]
    rt, sp = r["round_trip"], r["step_profile"]
    lines += ["| one decode hop, where the time goes | value |", "| --- | --- |",
              f"| plain TCP round trip ({sp['frame_bytes']} B) | {_fmt(rt['tcp_rtt_s'] * 1e3)} ms |",
              f"| direct channel round trip (sealed TCP), same payload | "
              f"{_fmt(rt['direct_rtt_s'] * 1e3)} ms ({_fmt(rt['direct_vs_tcp_rtt_ratio'])}x TCP) |",
              f"| libp2p round trip, same payload | {_fmt(rt['libp2p_rtt_s'] * 1e3)} ms "
              f"({_fmt(rt['libp2p_vs_tcp_rtt_ratio'])}x TCP, "
              f"{_fmt(rt['libp2p_vs_direct_rtt_ratio'])}x direct) |",
              f"| encode Step | {_fmt(sp['encode_step_s'] * 1e6)} us |",
              f"| decode Step | {_fmt(sp['decode_step_s'] * 1e6)} us |",
              f"| one-layer engine step, direct | {_fmt(sp['one_layer_step_direct_s'] * 1e3)} ms |",
              f"| same through the scheduler | {_fmt(sp['one_layer_step_scheduled_s'] * 1e3)} ms "
              f"({_fmt(sp['scheduler_overhead_vs_direct_step_ratio'])}x) |", ""]
    lines += ["| codec, fp32 (1, T, H) | bytes | encode GB/s | decode GB/s | memcpy GB/s |",
              "| --- | --- | --- | --- | --- |"]
    for k, c in r["codec"].items():
        lines.append(f"| {k} | {c['bytes']:,} | {_fmt(c['encode_gb_s'])} "
                     f"({_fmt(c['encode_vs_memcpy_ratio'])}x memcpy) | {_fmt(c['decode_gb_s'])} "
                     f"({_fmt(c['decode_vs_memcpy_ratio'])}x) | {_fmt(c['memcpy_gb_s'])} |")
    rec = r["receipts"]
    lines += ["", "| receipts | per second |", "| --- | --- |",
              f"| sign | {_fmt(rec['sign_per_s'])} |",
              f"| verify | {_fmt(rec['verify_per_s'])} ({_fmt(rec['verify_vs_sign_ratio'])}x sign) |",
              f"| ledger commit (durable) | {_fmt(rec['commit_per_s'])} "
              f"({_fmt(rec['commit_vs_sign_ratio'])}x sign) |", "",
              "| DHT peers | start hosts s | publish to full coverage s | one lookup s |",
              "| --- | --- | --- | --- |"]
    for n, d in sorted(r["dht"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {n} | {_fmt(d['setup_s'])} | {_fmt(d['publish_to_coverage_s'])} | "
                     f"{_fmt(d['lookup_s'])} |")
    return "\n".join(lines) + "\n"


def _plots(r: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pipes = r.get("pipeline", {})
    mono = r["monolithic"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for h, p in pipes.items():
        xs = [int(c) for c in p["aggregate_tok_s"]]
        ax.plot(xs, list(p["aggregate_tok_s"].values()), marker="o", label=f"{h} node(s)")
    ax.axhline(mono["monolithic_b1_tok_s"], color="grey", ls="--", label="one process, batch 1")
    ax.axhline(mono["monolithic_b8_tok_s"], color="black", ls=":", label="one process, batch 8")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("aggregate decode tokens/s")
    ax.set_title(f"Throughput against concurrency ({Path(r['model']).name})")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "throughput.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    hops = [int(h) for h in pipes]
    ax.plot([0] + hops, [1e3 / mono["monolithic_b1_tok_s"]]
            + [p["time_per_token_s"] * 1e3 for p in pipes.values()], marker="o",
            label="time per token (0 = one process)")
    measured = [(int(h), p["node_compute_per_token_s"]) for h, p in pipes.items()
                if p.get("node_compute_per_token_s") is not None]
    if measured:
        rt = r["round_trip"]
        ax.plot([h for h, _ in measured], [c * 1e3 for _, c in measured], marker="s",
                label="nodes' engine time per token")
        for side, style in (("tcp", "--"), ("direct", ":")):
            ax.plot([h for h, _ in measured], [(c + h * rt[f"{side}_rtt_s"]) * 1e3
                                               for h, c in measured], ls=style, marker="x",
                    label=f"engine time + one {'plain TCP' if side == 'tcp' else 'direct'} RTT per hop")
    ax.set_xlabel("nodes in the pipeline (hops)")
    ax.set_ylabel("ms per token, one session")
    ax.set_title("Time per token against hops")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "hops.png")
    plt.close(fig)
