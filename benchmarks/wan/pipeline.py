"""One session through 3 nodes and a client, each in its own namespace, at chosen one-way delays,
client-driven and node-to-node side by side.

    sudo .venv/bin/python -m benchmarks.wan [--model tiny|smollm2-135m|DIR] [--delays 0,10,25,50]
        [--tokens 32] [--repeats 2] [--modes client,push] [--sessions 1,16] [--relayed] [--no-join]
        [--out DIR]

Every link between two hosts (node-node and client-node) gets the same one-way delay. For each
delay and each mode it runs ``shiza generate --json`` in the client's namespace (a warm-up, then
``--repeats`` measured runs) and reads the session's tokens/s, time to first token and
``pushed_steps``. The modes:

    client   ``--no-push``: the client drives every hop (ARCHITECTURE.md, "How a token travels")
    push     the default: activations go node to node, only the token comes back (SPEC.md 9.6)

Beside each measurement it prints what the mode's cost model predicts:

    client-driven   seconds per token = t_compute + 2 x hops x one-way delay
    node-to-node    seconds per token = t_compute + (hops + 1) x one-way delay

where t_compute (engine and protocol time per token, everything but the wire) is measured per
mode at the first delay of the list (0 ms by default: 1 / tokens/s there), and at each delay the
push/client tokens/s ratio. results.json, results.md and results.png (tokens/s against delay,
the models dashed) go to ``--out``. The nodes keep running between delays; only the forwarder is
restarted with the new delay.

``--relayed``: the last node (n3) sits behind a masquerading NAT (no inbound connection) and
serves through n1's circuit relay (n1 ``--relay-service``, n3 ``--relay <n1>``); the leg into n3
and the leg out of it each cross the relay, so each mode's model counts RELAY_EXTRA_LEGS (2)
legs more, and a run whose last hop was not n3 is flagged.

A node joining (unless ``--no-join``; never with ``--relayed``): at each delay, after its
measurements, the last span's node stops gracefully (its record withdrawn) and a fresh one for
that span starts on another host; the run reports start -> serving (record published), start ->
the first generation through it (a fresh client that knows only n1), and that client's time to
full coverage (``generate --json``'s ``coverage_s``, reported for every measured run too).

Concurrent sessions (``--sessions``, default 1,16): when a count N > 1 is listed, at each delay
and mode benchmarks/wan/concurrent.py runs in the client's namespace, once with 1 session (the
baseline, measured the same way) and once per N > 1: ceil(N / 8) client identities (a node holds
8 sessions per client peer), a warm-up each, then N generations at once. Aggregate tokens/s = all
new tokens / wall time from the first start to the last finish; beside it the per-session median
(decode) tokens/s and the aggregate over the 1-session aggregate. These go to results.json
("sessions"), a second table in results.md and sessions.png (aggregate tokens/s against sessions
per mode and delay, linear scaling from 1 session dotted).
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from node.devtools.localswarm import stop_all
from node.devtools.netns import Network, start_node, tcp_round_trips, why_unavailable

NODES = ("n1", "n2", "n3")
CLIENT = "c"
JOINER = "j"  # the host a joining node starts in (``_join``), in turn with the last node's own
PROMPT = "The capital of France is"
MODES = ("client", "push")
MODE_FLAGS = {"client": ["--no-push", "--speculate", "off"], "push": ["--speculate", "off"]}  # one token a pass
MODE_NAMES = {"client": "client-driven", "push": "node-to-node"}


@dataclass
class Point:
    mode: str  # "client" (--no-push) or "push" (node-to-node, the default)
    delay_ms: float
    tcp_rtt_ms: float  # a plain TCP round trip client to node, the injector's check (2 x delay)
    tokens_per_s: float
    ttft_s: float
    per_token_ms: float
    pushed_steps: int | None = None  # the fewest over the measured runs; None if generate did not say
    pushed_steps_runs: list[int | None] = field(default_factory=list)
    tokens_generated: list[int] = field(default_factory=list)  # per measured run (fewer than asked: EOS)
    predicted_tokens_per_s: float | None = None
    predicted_per_token_ms: float | None = None
    measured_vs_predicted_ratio: float | None = None
    warning: str | None = None
    coverage_s: float | None = None  # median of the measured runs: the client's connect -> full route


@dataclass
class Join:
    """A fresh node joining at one delay: it replaces the last span's node (stopped gracefully,
    its record withdrawn) and a fresh client (no peers known but the bootstrap) generates."""

    delay_ms: float
    ready_s: float  # node process start -> serving (its record published: node.json written)
    first_served_s: float  # node process start -> the first generation through it returned
    client_s: float  # of which the fresh client's whole run: process start (imports), connect, coverage, 4 tokens
    coverage_s: float | None  # the fresh client: connected -> full coverage found (generate's coverage_s)
    ttft_s: float | None
    served_by_new_node: bool  # the generation's last hop was the node that joined


@dataclass
class Aggregate:
    """N concurrent sessions at one delay in one mode (benchmarks/wan/concurrent.py)."""

    mode: str
    delay_ms: float
    sessions: int
    clients: int = 0
    finished: int = 0
    tokens_total: int = 0
    wall_s: float = 0.0
    aggregate_tokens_per_s: float = 0.0
    median_session_tokens_per_s: float = 0.0
    median_ttft_s: float | None = None
    ratio_vs_single: float | None = None  # aggregate tok/s over the 1-session aggregate, same mode and delay
    pushed_steps_min: int | None = None
    tokens_per_session: list[int] = field(default_factory=list)
    session_tokens_per_s: list[float] = field(default_factory=list)  # decode tok/s of each finished session
    session_end_s: list[float] = field(default_factory=list)  # when each finished, from the first start
    errors: list[str] = field(default_factory=list)
    warning: str | None = None


def session_counts(spec: str) -> list[int]:
    """``--sessions``: positive counts, in order, duplicates dropped; 1 (the baseline) comes first
    whenever any count is over 1."""
    counts = list(dict.fromkeys(int(x) for x in spec.split(",") if x.strip()))
    if not counts or any(n < 1 for n in counts):
        raise ValueError(f"--sessions wants positive counts, got {spec!r}")
    if any(n > 1 for n in counts):
        counts = [1] + [n for n in counts if n != 1]
    return counts


def aggregate_from(mode: str, delay_ms: float, summary: dict) -> Aggregate:
    """An Aggregate from concurrent.py's JSON summary; a warning when sessions failed or, under
    push, some session pushed nothing."""
    pushed = summary.get("pushed_steps", [])
    a = Aggregate(mode, delay_ms, summary["sessions"], summary.get("clients", 0), summary.get("finished", 0),
                  summary.get("tokens_total", 0), summary.get("wall_s", 0.0),
                  summary.get("aggregate_tokens_per_s", 0.0), summary.get("median_session_tokens_per_s", 0.0),
                  summary.get("median_ttft_s"), None, min(pushed) if pushed else None,
                  list(summary.get("tokens_per_session", [])), list(summary.get("session_tokens_per_s", [])),
                  list(summary.get("session_end_s", [])), list(summary.get("errors", [])))
    notes = []
    if a.finished < a.sessions:
        notes.append(f"{a.sessions - a.finished} of {a.sessions} sessions failed")
    if a.finished and (w := check_pushed(mode, a.pushed_steps_min)):
        notes.append(w)
    a.warning = "; ".join(notes) or None
    return a


def apply_single_ratios(aggs: Sequence[Aggregate]) -> None:
    """Each aggregate over the 1-session aggregate of its mode and delay (None without one)."""
    single = {(a.mode, a.delay_ms): a.aggregate_tokens_per_s for a in aggs if a.sessions == 1}
    for a in aggs:
        base = single.get((a.mode, a.delay_ms))
        a.ratio_vs_single = round(a.aggregate_tokens_per_s / base, 2) if base else None


#: With ``--relayed`` the last hop sits behind a NAT and is reached through the first hop's relay
#: (circuit relay v2): the leg into it and the leg out of it each cross the relay, one leg more each.
RELAY_EXTRA_LEGS = 2


def client_driven_s_per_token(compute_s: float, hops: int, delay_s: float, extra_legs: int = 0) -> float:
    """Seconds per decoded token when every activation passes the client: 2 x hops legs (plus
    ``extra_legs``: those a relay adds)."""
    return compute_s + (2 * hops + extra_legs) * delay_s


def node_to_node_s_per_token(compute_s: float, hops: int, delay_s: float, extra_legs: int = 0) -> float:
    """Seconds per decoded token when activations go hop to hop (SPEC 9.6): client -> first hop,
    hops - 1 node-to-node legs, and the token back from the last hop: hops + 1 legs (plus
    ``extra_legs``)."""
    return compute_s + (hops + 1 + extra_legs) * delay_s


def legs(mode: str, hops: int, relayed: bool = False) -> int:
    """One-way legs per token in ``mode`` (``relayed``: the last hop behind a relay)."""
    return {"client": 2 * hops, "push": hops + 1}[mode] + (RELAY_EXTRA_LEGS if relayed else 0)


def s_per_token(mode: str, compute_s: float, hops: int, delay_s: float, relayed: bool = False) -> float:
    model = {"client": client_driven_s_per_token, "push": node_to_node_s_per_token}[mode]
    return model(compute_s, hops, delay_s, RELAY_EXTRA_LEGS if relayed else 0)


def compute_s_from(mode: str, tokens_per_s: float, hops: int, delay_s: float, relayed: bool = False) -> float:
    """t_compute from one measurement: what is left of a token's time once the wire is taken off."""
    return 1 / tokens_per_s - legs(mode, hops, relayed) * delay_s


def check_pushed(mode: str, pushed_steps: int | None) -> str | None:
    """A warning when the run did not go the way its mode says (push: some steps pushed; client: none)."""
    if pushed_steps is None:
        return "generate --json gave no pushed_steps"
    if mode == "push" and pushed_steps <= 0:
        return "0 pushed steps: the session fell back to client-driven"
    if mode == "client" and pushed_steps != 0:
        return f"{pushed_steps} pushed steps under --no-push"
    return None


def apply_models(points: list[Point], hops: int, relayed: bool = False) -> dict[str, float]:
    """Fill in each point's prediction from its mode's t_compute (taken at that mode's first delay)."""
    compute: dict[str, float] = {}
    for p in points:
        if p.mode not in compute:
            compute[p.mode] = compute_s_from(p.mode, p.tokens_per_s, hops, p.delay_ms / 1000, relayed)
    for p in points:
        s = s_per_token(p.mode, compute[p.mode], hops, p.delay_ms / 1000, relayed)
        if s <= 0:
            continue
        p.predicted_per_token_ms = round(s * 1000, 1)
        p.predicted_tokens_per_s = round(1 / s, 2)
        p.measured_vs_predicted_ratio = round(p.tokens_per_s / (1 / s), 3)
    return compute


def push_vs_client(points: Sequence[Point]) -> dict[float, float]:
    """At each delay measured in both modes: push tokens/s over client tokens/s."""
    by = {(p.mode, p.delay_ms): p for p in points}
    out: dict[float, float] = {}
    for p in points:
        if p.mode == "push" and ("client", p.delay_ms) in by and by[("client", p.delay_ms)].tokens_per_s > 0:
            out[p.delay_ms] = round(p.tokens_per_s / by[("client", p.delay_ms)].tokens_per_s, 3)
    return out


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


def _generate(net: Network, model: str, bootstrap: str, tokens: int, data_dir: Path, mode: str) -> dict:
    done = net.run(CLIENT, [sys.executable, "-m", "node", "generate", "--model", model, "--raw", "--json",
                            *MODE_FLAGS[mode], "--max-new-tokens", str(tokens), "--wait", "120",
                            "--data-dir", str(data_dir), "--bootstrap", bootstrap, PROMPT],
                   check=False, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"generate ({mode}) failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _concurrent(net: Network, model: str, bootstrap: str, sessions: int, tokens: int, data_dir: Path,
                mode: str, delay_ms: float) -> Aggregate:
    """concurrent.py in the client's namespace; a failed run is an Aggregate with a warning."""
    done = net.run(CLIENT, [sys.executable, "-m", "benchmarks.wan.concurrent", "--model", model,
                            "--bootstrap", bootstrap, "--sessions", str(sessions), "--tokens", str(tokens),
                            "--mode", mode, "--data-dir", str(data_dir)], check=False, timeout=600)
    try:
        summary = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return Aggregate(mode, delay_ms, sessions, warning=f"concurrent.py failed ({done.returncode}): "
                                                           f"{done.stderr.strip()[-1500:]}")
    return aggregate_from(mode, delay_ms, summary)


def run(model: str, delays: Sequence[float], tokens: int, repeats: int, work: Path,
        modes: Sequence[str] = MODES, sessions: Sequence[int] = (1,),
        aggregates: list[Aggregate] | None = None, relayed: bool = False,
        joins: list[Join] | None = None) -> list[Point]:
    """The single-session points; with a count over 1 in ``sessions``, the concurrent runs are
    appended to ``aggregates``. ``relayed``: the last node sits behind a NAT (no inbound) and
    serves through the first node's relay (``--relay-service`` / ``--relay``). ``joins`` (a list
    to fill; not with ``relayed``): at each delay, after the measurements, a fresh node replaces
    the last span's (``_join``)."""
    concurrent = session_counts(",".join(map(str, sessions))) if any(n > 1 for n in sessions) else []
    aggregates = aggregates if aggregates is not None else []
    model_path, num_layers = _model(model, work)
    spans = spans_of(num_layers, len(NODES))
    points: list[Point] = []
    hosts = [*NODES, CLIENT] + ([JOINER] if joins is not None else [])
    with Network(hosts, delay_ms=delays[0], log_dir=work, nat=NODES[-1] if relayed else None) as net:
        nodes = []
        try:
            for host, span in zip(NODES, spans):
                boot = [nodes[0].addr] if nodes else []
                extra = []
                if relayed and not nodes:
                    extra = ["--relay-service"]
                elif relayed and host == NODES[-1]:
                    extra = ["--relay", nodes[0].addr]
                nodes.append(start_node(net, host, work / host, model=model_path, layers=span, bootstrap=boot,
                                        extra_args=extra))
                if len(nodes) == 1:
                    nodes[0].wait_ready(600)
            for n in nodes:
                n.wait_ready(600)
            if relayed:
                circuit = f"{nodes[0].addr}/p2p-circuit/p2p/{nodes[-1].peer_id}"
                if circuit not in nodes[-1].info.get("addrs", []):
                    raise RuntimeError(f"the NATed node does not advertise {circuit}: {nodes[-1].info.get('addrs')}")
            for delay in delays:
                net.reconfigure(delay_ms=delay)
                rtt = statistics.median(tcp_round_trips(net, CLIENT, NODES[0], n=10)) * 1000
                boot = nodes[1].addr if relayed else nodes[-1].addr  # a NATed node takes no dial
                for mode in modes:
                    _generate(net, model_path, boot, 4, work / "client", mode)  # warm: caches, routes
                    runs = [_generate(net, model_path, boot, tokens, work / "client", mode) for _ in range(repeats)]
                    tok_s = round(statistics.median(r["tokens_per_s"] for r in runs), 2)
                    ttft = statistics.median(r["ttft_s"] for r in runs)
                    pushed = [r.get("pushed_steps") for r in runs]
                    fewest = None if None in pushed else min(pushed)
                    warning = check_pushed(mode, fewest)
                    if relayed and any(r["route"][-1]["peer"] != nodes[-1].peer_id for r in runs):
                        warning = "; ".join(filter(None, [warning, "the last hop was not the relayed node"]))
                    points.append(Point(mode, delay, round(rtt, 2), tok_s, round(ttft, 3), round(1000 / tok_s, 1),
                                        fewest, pushed, [len(r.get("token_ids", [])) for r in runs],
                                        warning=warning, coverage_s=_median_of(runs, "coverage_s")))
                    print(f"delay {delay:5.1f} ms, {mode:6}: tcp rtt {rtt:6.1f} ms, {tok_s:6.2f} tok/s, "
                          f"ttft {ttft:.3f} s, pushed steps {pushed}, tokens {points[-1].tokens_generated}", flush=True)
                    if warning:
                        print(f"warning: delay {delay:g} ms: {warning}", file=sys.stderr, flush=True)
                    for n in concurrent:
                        a = _concurrent(net, model_path, boot, n, tokens, work / "concurrent", mode, delay)
                        aggregates.append(a)
                        print(f"delay {delay:5.1f} ms, {mode:6}: {n:3} sessions ({a.clients} clients, {a.finished} "
                              f"finished): {a.aggregate_tokens_per_s:7.2f} tok/s aggregate, median session "
                              f"{a.median_session_tokens_per_s:6.2f} tok/s, {a.tokens_total} tokens in "
                              f"{a.wall_s:.2f} s", flush=True)
                        if a.warning:
                            print(f"warning: delay {delay:g} ms, {n} sessions: {a.warning}", file=sys.stderr,
                                  flush=True)
                if joins is not None and not relayed:
                    joined = _join(net, nodes, model_path, spans[-1], work, delay, len(joins))
                    joins.append(joined)
                    print(f"delay {delay:5.1f} ms, join: ready after {joined.ready_s:.2f} s, first generation "
                          f"through it after {joined.first_served_s:.2f} s (fresh client: coverage "
                          f"{joined.coverage_s} s, ttft {joined.ttft_s} s)", flush=True)
        finally:
            stop_all(nodes)
    apply_models(points, len(NODES), relayed)
    apply_single_ratios(aggregates)
    return points


def _median_of(runs: Sequence[dict], key: str) -> float | None:
    values = [r[key] for r in runs if isinstance(r.get(key), (int, float))]
    return round(statistics.median(values), 3) if values else None


def _join(net: Network, nodes: list, model_path: str, span: tuple[int, int], work: Path, delay: float,
          index: int) -> Join:
    """Stop the last span's node (gracefully: its record is withdrawn), start a fresh node for
    that span on the other of its two hosts, and time it: start -> serving, start -> the first
    generation through it (a fresh client, bootstrapped on the first node, in push mode).
    ``nodes[-1]`` becomes the new node."""
    old = nodes.pop()
    old.stop()
    host = JOINER if index % 2 == 0 else NODES[-1]
    t0 = time.monotonic()
    fresh = start_node(net, host, work / f"join{index}", model=model_path, layers=span, bootstrap=[nodes[0].addr])
    nodes.append(fresh)
    fresh.wait_ready(600)
    ready = time.monotonic() - t0
    out = _generate(net, model_path, nodes[0].addr, 4, work / f"join-client{index}", "push")
    served = time.monotonic() - t0
    return Join(delay, round(ready, 3), round(served, 3), round(served - ready, 3), out.get("coverage_s"),
                out.get("ttft_s"), out["route"][-1]["peer"] == fresh.peer_id)


def markdown_joins(joins: Sequence[Join]) -> str:
    rows = ["| one-way delay (ms) | start -> serving (s) | start -> first generation through it (s) | "
            "of which the fresh client's run (s) | its full coverage (s) | its TTFT (s) | served by the new node |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for j in joins:
        rows.append(f"| {j.delay_ms:g} | {j.ready_s} | {j.first_served_s} | {j.client_s} | {j.coverage_s} | "
                    f"{j.ttft_s} | {'yes' if j.served_by_new_node else 'NO'} |")
    return "\n".join(rows)


def markdown(points: Sequence[Point], hops: int, relayed: bool = False) -> str:
    modes = list(dict.fromkeys(p.mode for p in points))
    by = {(p.mode, p.delay_ms): p for p in points}
    ratios = push_vs_client(points)
    both = "client" in modes and "push" in modes
    head = ["one-way delay (ms)", "TCP RTT (ms)"]
    for m in modes:
        head += [f"{m} tok/s", f"{m} predicted tok/s", f"{m} measured/predicted"]
    if both:
        head.append("push/client tok/s")
    for m in modes:
        head += [f"{m} ms/token", f"{m} predicted ms/token", f"{m} TTFT (s)"]
    head += [f"{m} pushed steps" for m in modes]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for delay in dict.fromkeys(p.delay_ms for p in points):
        here = [by.get((m, delay)) for m in modes]
        rtt = next(p.tcp_rtt_ms for p in here if p is not None)
        cells: list[object] = [f"{delay:g}", rtt]
        for p in here:
            cells += [p.tokens_per_s, p.predicted_tokens_per_s, p.measured_vs_predicted_ratio] if p else ["-"] * 3
        if both:
            cells.append(ratios.get(delay, "-"))
        for p in here:
            cells += [p.per_token_ms, p.predicted_per_token_ms, p.ttft_s] if p else ["-"] * 3
        for p in here:
            cells.append("-" if p is None else f"{p.pushed_steps}" + (" (!)" if p.warning else ""))
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    rows.append("")
    for m in modes:
        rows.append(f"Cost model, {MODE_NAMES[m]} ({m}, {hops} hops): s/token = t_compute + {legs(m, hops, relayed)} x "
                    "one-way delay; t_compute from this mode's first row.")
    warnings = [f"{p.mode} at {p.delay_ms:g} ms: {p.warning}" for p in points if p.warning]
    if warnings:
        rows.append("\nWarnings (marked (!)): " + "; ".join(warnings))
    return "\n".join(rows)


def plot(points: Sequence[Point], hops: int, compute: dict[str, float], path: Path, title: str,
         relayed: bool = False) -> bool:
    """Left: tokens/s against one-way delay per mode (log scale), each cost model dashed. Right: the
    same as ms/token, where each model is a straight line of slope legs. False if matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"client": "#c44", "push": "#27a"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    delays = [p.delay_ms for p in points]
    lo, hi = min(delays), max(delays)
    grid = [lo + (hi - lo) * i / 200 for i in range(201)] if hi > lo else [lo]
    for m in dict.fromkeys(p.mode for p in points):
        mine = [p for p in points if p.mode == m]
        c = colors.get(m)
        xs = [p.delay_ms for p in mine]
        label = f"{MODE_NAMES.get(m, m)} ({m}), measured"
        left.plot(xs, [p.tokens_per_s for p in mine], "o", color=c, markersize=7, label=label)
        right.plot(xs, [p.per_token_ms for p in mine], "o", color=c, markersize=7, label=label)
        if m in compute:
            s = [s_per_token(m, compute[m], hops, d / 1000, relayed) for d in grid]
            model = f"model: t_compute + {legs(m, hops, relayed)} x delay"
            left.plot(grid, [1 / v if v > 0 else float("nan") for v in s], "--", color=c, alpha=0.8, label=model)
            right.plot(grid, [v * 1000 for v in s], "--", color=c, alpha=0.8, label=model)
    left.set_yscale("log")
    left.set_ylabel("tokens / s (log)")
    right.set_ylabel("ms / token")
    right.set_ylim(bottom=0)
    for ax in (left, right):
        ax.set_xlabel("one-way delay per link (ms)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


TARGET = ("push", 25.0, 16, 10.0)  # issue: 16 sessions at 25 ms one way, >= 10 x one session's tokens/s


def markdown_sessions(aggs: Sequence[Aggregate]) -> str:
    """The concurrent-sessions table, and the issue's target when it was measured."""
    head = ["one-way delay (ms)", "mode", "sessions", "clients", "finished", "new tokens", "wall (s)",
            "aggregate tok/s", "median session tok/s", "median TTFT (s)", "aggregate / 1 session",
            "pushed steps (min)"]
    rows = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for a in aggs:
        cells = [f"{a.delay_ms:g}", a.mode, a.sessions, a.clients, a.finished, a.tokens_total, round(a.wall_s, 2),
                 a.aggregate_tokens_per_s, a.median_session_tokens_per_s,
                 "-" if a.median_ttft_s is None else round(a.median_ttft_s, 3),
                 "-" if a.ratio_vs_single is None else f"{a.ratio_vs_single}x",
                 "-" if a.pushed_steps_min is None else a.pushed_steps_min]
        rows.append("| " + " | ".join(str(c) for c in cells) + (" (!)" if a.warning else "") + " |")
    rows.append("")
    rows.append("Aggregate tok/s = all new tokens / wall time from the first start to the last finish; "
                "session tok/s as `shiza generate --json` (decode, after the first token); "
                "aggregate / 1 session: over the 1-session run of the same mode and delay, measured the same way.")
    mode, delay, n, want = TARGET
    hit = next((a for a in aggs if (a.mode, a.delay_ms, a.sessions) == (mode, delay, n)), None)
    if hit is not None and hit.ratio_vs_single is not None:
        verdict = "met" if hit.ratio_vs_single >= want else "NOT met"
        rows.append(f"\nTarget ({mode}, {n} sessions at {delay:g} ms, >= {want:g}x one session): "
                    f"{hit.ratio_vs_single}x, {verdict}.")
    warnings = [f"{a.mode} at {a.delay_ms:g} ms, {a.sessions} sessions: {a.warning}" for a in aggs if a.warning]
    if warnings:
        rows.append("\nWarnings (marked (!)): " + "; ".join(warnings))
    return "\n".join(rows)


def plot_sessions(aggs: Sequence[Aggregate], path: Path, title: str) -> bool:
    """Left: aggregate tokens/s against concurrent sessions, one line per mode and delay, linear
    scaling from the 1-session run dotted. Right: the per-session median. False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"client": "#c44", "push": "#27a"}
    styles = ["o-", "s-", "^-", "D-", "v-"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    delays = list(dict.fromkeys(a.delay_ms for a in aggs))
    for m in dict.fromkeys(a.mode for a in aggs):
        for k, d in enumerate(delays):
            mine = sorted((a for a in aggs if a.mode == m and a.delay_ms == d), key=lambda a: a.sessions)
            if not mine:
                continue
            xs = [a.sessions for a in mine]
            label = f"{MODE_NAMES.get(m, m)} ({m}), {d:g} ms"
            style = styles[k % len(styles)]
            left.plot(xs, [a.aggregate_tokens_per_s for a in mine], style, color=colors.get(m), label=label)
            right.plot(xs, [a.median_session_tokens_per_s for a in mine], style, color=colors.get(m), label=label)
            base = next((a.aggregate_tokens_per_s for a in mine if a.sessions == 1), None)
            if base:
                left.plot(xs, [base * n for n in xs], ":", color=colors.get(m), alpha=0.6,
                          label=f"{m}, {d:g} ms: linear from 1 session")
    left.set_ylabel("aggregate tokens / s")
    right.set_ylabel("median per-session tokens / s")
    for ax in (left, right):
        ax.set_xlabel("concurrent sessions")
        ax.set_xscale("log", base=2)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (a seeded random 6-layer Llama), smollm2-135m or a DIR")
    p.add_argument("--delays", default="0,10,25,50", help="one-way delays per link, ms, comma-separated")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated, in order, from: client (--no-push), push (node-to-node, the default)")
    p.add_argument("--sessions", default="1,16",
                   help="concurrent session counts, comma-separated; with a count over 1 each is measured "
                        "at every delay and mode beside a 1-session baseline")
    p.add_argument("--relayed", action="store_true",
                   help="the last node behind a NAT (no inbound), served through the first node's relay")
    p.add_argument("--no-join", dest="join", action="store_false",
                   help="skip timing a fresh node joining at each delay (never with --relayed)")
    p.add_argument("--out", type=Path, default=Path("bench-wan"))
    args = p.parse_args(argv)
    try:
        sessions = session_counts(args.sessions)
    except ValueError as exc:
        p.error(str(exc))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
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
        print(f"work dir {tmp} (node logs under it)", file=sys.stderr, flush=True)
        aggs: list[Aggregate] = []
        joins: list[Join] | None = [] if args.join and not args.relayed else None
        points = run(args.model, delays, args.tokens, args.repeats, Path(tmp), modes, sessions, aggs,
                     relayed=args.relayed, joins=joins)
    hops = len(NODES)
    compute = {m: compute_s_from(m, first.tokens_per_s, hops, first.delay_ms / 1000, args.relayed)
               for m in modes if (first := next((q for q in points if q.mode == m), None))}
    table = markdown(points, hops, args.relayed)
    if args.relayed:
        table = ("The last node sits behind a NAT and serves through the first node's relay.\n\n" + table)
    if aggs:
        table += "\n\n## Concurrent sessions\n\n" + markdown_sessions(aggs)
    if joins:
        table += "\n\n## A node joining\n\n" + markdown_joins(joins)
    print(table)
    ratios = push_vs_client(points)
    (args.out / "results.json").write_text(json.dumps(
        {"model": args.model, "hops": hops, "tokens": args.tokens, "repeats": args.repeats, "modes": modes,
         "legs_per_token": {m: legs(m, hops, args.relayed) for m in modes}, "relayed": args.relayed,
         "t_compute_s": {m: round(c, 5) for m, c in compute.items()},
         "points": [asdict(q) for q in points],
         "push_vs_client_tokens_per_s": [{"delay_ms": d, "ratio": r} for d, r in ratios.items()],
         "session_counts": sessions if aggs else [1],
         "sessions": [asdict(a) for a in aggs],
         "joins": [asdict(j) for j in joins or []],
         "warnings": [f"{q.mode} at {q.delay_ms:g} ms: {q.warning}" for q in points if q.warning]
                     + [f"{a.mode} at {a.delay_ms:g} ms, {a.sessions} sessions: {a.warning}" for a in aggs
                        if a.warning],
         "wall_s": round(time.monotonic() - t0, 1), "pid": os.getpid()}, indent=2))
    (args.out / "results.md").write_text(table + "\n")
    plotted = plot(points, hops, compute, args.out / "results.png",
                   f"{args.model}, {hops} hops{' (last one relayed)' if args.relayed else ''}, {args.tokens} "
                   "tokens: client-driven vs node-to-node", args.relayed)
    plotted_sessions = bool(aggs) and plot_sessions(
        aggs, args.out / "sessions.png", f"{args.model}, {hops} hops, {args.tokens} tokens a session: concurrent sessions")
    print(f"wrote {args.out}/results.json, results.md" + (", results.png" if plotted else " (no matplotlib: no PNG)")
          + (", sessions.png" if plotted_sessions else ""), file=sys.stderr)
    return 0
