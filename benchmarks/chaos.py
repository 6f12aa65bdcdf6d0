"""Chaos, measured (issue 15): node processes SIGKILLed, SIGSTOPped and restarted under load.

    python -m benchmarks.chaos [--faults 100] [--seed 0] [--replicas 3] [--spans 2]
                               [--concurrency 8] [--new-tokens 16] [--out bench-out/chaos]

A swarm of real ``shiza node run`` processes (``--spans`` spans of the small seeded test model,
``--replicas`` nodes each: 6 by default) with their own identities and SQLite ledgers, and one
SwarmClient with a ledger driving ``--concurrency`` greedy generations at a time, each worker
generating its own prompt again and again. First one fault-free round gives the reference
output of every prompt; then, for a fixed seed, ``--faults`` faults are injected, each one after
``--tokens-per-fault`` more tokens were streamed (progress, not wall time, paces them):

    kill      SIGKILL, then the same data directory (identity, ledger) is started again
    stop      SIGSTOP; SIGCONT after 1-6 s (the client's step timeout is 3 s) and once
              ``--stop-tokens`` more tokens were streamed (20 s at most)
    restart   SIGTERM (graceful), then started again

A victim is only chosen among serving nodes whose span keeps another serving replica, so
every span always has one: a generation that still ends in LayersLost is counted as such (and
must name the layers). Afterwards every stopped node is continued, every node stopped with
SIGTERM (sessions settle), and the ledgers compared:

    receipts_lost          receipts the client countersigned that its server's ledger lacks
    per pair               the settleable receipts (latest countersigned checkpoint per
                           session, protocol/settlement.py) of each (server, client) in the
                           server's ledger vs the client's, plus a statement built by the server
                           and cosigned by the client (``shiza receipts settle`` / ``cosign``)

Results (results.json, chaos.png) go to ``--out``. Every process it starts is killed by pid on
the way out; the temporary directory is removed unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 5140],
    [1, 9906, 11, 1521, 374],
    [1, 42, 17, 99, 1000, 2000],
    [1, 3923, 374, 279, 6864, 315],
    [1, 7, 8, 9, 10, 11, 12, 13],
    [1, 12345, 23456, 345],
    [1, 600, 601, 602, 603],
    [1, 31, 41, 59, 26, 53, 58, 97],
]
STEP_TIMEOUT_S = 3.0  # the client's bound on a step: a SIGSTOPped hop is failed over after it
GENERATION_TIMEOUT_S = 240.0  # one generation past this is a hang (counted under "other")
READY_TIMEOUT_S = 180.0  # a (re)started node must serve within this
RECORD_TIMEOUT_S = 60.0  # ... and its new record be in the DHT within this
STOP_MAX_S = 20.0  # a SIGSTOPped node is continued after this at the latest


@dataclass
class ChaosConfig:
    faults: int = 100
    seed: int = 0
    spans: int = 2
    replicas: int = 3
    concurrency: int = 8
    new_tokens: int = 16
    tokens_per_fault: int = 12
    stop_tokens: int = 12
    receipt_every: int = 4
    max_s: float = 3600.0  # bound on the fault phase
    model: str | None = None  # a checkpoint dir; None: the seeded tiny test model, built here
    progress: bool = True


@dataclass
class Node:
    index: int
    span: tuple[int, int]
    data_dir: Path
    proc: Any = None  # node.devtools.localswarm.NodeProcess
    state: str = "starting"  # starting | up | stopped | down
    peer_id: str = ""
    starts: int = 0


@dataclass
class Outcome:
    worker: int
    t: float
    kind: str  # identical | layers_lost | other
    detail: str = ""
    failovers: int = 0
    duration_s: float = 0.0


@dataclass
class Fault:
    n: int
    t: float
    kind: str
    node: int
    peer_id: str
    span: tuple[int, int]


@dataclass
class _Run:
    cfg: ChaosConfig
    root: Path
    model_path: str
    model_id: str = ""
    nodes: list[Node] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    tokens: int = 0
    t0: float = 0.0
    token_event: trio.Event = field(default_factory=trio.Event)
    stop_generating: bool = False

    def log(self, msg: str) -> None:
        if self.cfg.progress:
            print(f"[chaos {time.monotonic() - self.t0:7.1f}s] {msg}", flush=True)

    def on_tokens(self, _tokens: list[int]) -> None:
        self.tokens += 1
        self.token_event.set()
        self.token_event = trio.Event()

    async def wait_tokens(self, n: int, timeout_s: float) -> None:
        """Until ``n`` more tokens were streamed (by all workers), or ``timeout_s``."""
        target = self.tokens + n
        with trio.move_on_after(timeout_s):
            while self.tokens < target:
                await self.token_event.wait()

    def up_addrs(self) -> list[str]:
        return [n.proc.addr for n in self.nodes if n.state == "up" and n.proc is not None and n.proc.info]


# ---- node processes ---------------------------------------------------------------------------

def _start(run: _Run, node: Node) -> None:
    """Start (or restart) ``node`` from its data directory; blocking, for a worker thread."""
    from node.devtools.localswarm import start_node

    log_path = node.data_dir / "node.log"
    if log_path.exists():  # keep every life's log
        log_path.rename(node.data_dir / f"node.{node.starts}.log")
    bootstrap = run.up_addrs()
    node.proc = start_node(node.data_dir, model=run.model_path, layers=node.span, bootstrap=bootstrap,
                           extra_args=run.extra_args)
    node.starts += 1
    node.proc.wait_ready(READY_TIMEOUT_S)
    node.peer_id = node.proc.peer_id


async def _serving(run: _Run, client: Any, node: Node) -> None:
    """Until the client's DHT lookup shows ``node``'s record with its current address (bounded)."""
    addr = node.proc.addr
    with trio.move_on_after(RECORD_TIMEOUT_S):
        while True:
            with trio.move_on_after(10):
                records = await client.records(run.model_id)
                if any(r.peer_id == node.peer_id and addr in r.addrs for r in records):
                    return
            await trio.sleep(0.25)  # polling the DHT, not synchronising
    run.log(f"node {node.index}: record with {addr} not seen within {RECORD_TIMEOUT_S:.0f} s")


async def _restart(run: _Run, client: Any, node: Node) -> None:
    node.state = "starting"
    try:
        await trio.to_thread.run_sync(_start, run, node)
    except Exception as exc:  # noqa: BLE001 - reported, the node stays down
        node.state = "down"
        run.log(f"node {node.index} failed to restart: {exc}")
        return
    await _serving(run, client, node)
    node.state = "up"
    run.log(f"node {node.index} {node.span[0]}:{node.span[1]} serving again (start {node.starts})")


def _eligible(run: _Run) -> list[Node]:
    """Serving nodes whose span keeps another serving replica without them."""
    up = [n for n in run.nodes if n.state == "up"]
    return [n for n in up if sum(1 for m in up if m.span == n.span) >= 2]


async def _faults(run: _Run, client: Any, nursery: trio.Nursery) -> None:
    cfg = run.cfg
    rng = random.Random(cfg.seed)
    deadline = time.monotonic() + cfg.max_s
    for k in range(cfg.faults):
        await run.wait_tokens(cfg.tokens_per_fault, 60)
        victims = _eligible(run)
        while not victims and time.monotonic() < deadline:
            await trio.sleep(0.2)  # polling node states (a restart in progress), bounded
            victims = _eligible(run)
        if time.monotonic() >= deadline:
            run.log(f"fault phase past its bound of {cfg.max_s:.0f} s: stopping after {k} faults")
            return
        victims.sort(key=lambda n: n.index)
        node = rng.choice(victims)
        kind = rng.choice(("kill", "stop", "restart"))
        run.faults.append(Fault(k + 1, time.monotonic() - run.t0, kind, node.index, node.peer_id, node.span))
        run.log(f"fault {k + 1}/{cfg.faults}: {kind} node {node.index} ({node.span[0]}:{node.span[1]}, "
                f"pid {node.proc.proc.pid}); tokens so far {run.tokens}")
        if kind == "kill":
            node.state = "down"
            node.proc.proc.send_signal(signal.SIGKILL)
            await trio.to_thread.run_sync(node.proc.proc.wait)
            nursery.start_soon(_restart, run, client, node)
        elif kind == "stop":
            node.state = "stopped"
            os.kill(node.proc.proc.pid, signal.SIGSTOP)
            nursery.start_soon(_continue_later, run, node, rng.uniform(1.0, 2 * STEP_TIMEOUT_S))
        else:
            node.state = "down"
            nursery.start_soon(_graceful_restart, run, client, node)


async def _continue_later(run: _Run, node: Node, hold_s: float) -> None:
    """SIGCONT after ``hold_s`` (the stall: past the client's step timeout, its sessions fail
    over) and ``stop_tokens`` more tokens (the others went on meanwhile), at most STOP_MAX_S."""
    with trio.move_on_after(STOP_MAX_S):
        await trio.sleep(hold_s)  # the fault's duration, not synchronisation
        await run.wait_tokens(run.cfg.stop_tokens, STOP_MAX_S)
    if node.proc.proc.poll() is None:
        os.kill(node.proc.proc.pid, signal.SIGCONT)
    node.state = "up"
    run.log(f"node {node.index} continued")


async def _graceful_restart(run: _Run, client: Any, node: Node) -> None:
    await trio.to_thread.run_sync(node.proc.stop, 60.0)
    await _restart(run, client, node)


# ---- generations -----------------------------------------------------------------------------

async def _generate(run: _Run, client: Any, worker: int, expected: list[int] | None) -> Outcome:
    from node.client.errors import NoRoute

    prompt = PROMPTS[worker % len(PROMPTS)]
    t = time.monotonic()
    outcome = Outcome(worker, t - run.t0, "other")
    try:
        with trio.fail_after(GENERATION_TIMEOUT_S):
            result = await client.generate(run.model_id, [prompt], max_new_tokens=run.cfg.new_tokens,
                                           on_tokens=run.on_tokens)
        outcome.failovers = result.failovers
        if expected is None or result.token_ids[0] == expected:
            outcome.kind, outcome.detail = "identical", ""
        else:
            outcome.detail = f"different output {result.token_ids[0]} != {expected}"
        outcome.tokens = result.token_ids[0]  # type: ignore[attr-defined]
    except NoRoute as exc:  # LayersLost mid-generation, NoRoute when routing finds the gap first
        named = bool(exc.missing) and all(f"{a}:{b}" in str(exc) for a, b in exc.missing)
        outcome.kind = "layers_lost" if named else "other"
        # The chaos never takes a span's last serving replica: say how many served meanwhile.
        serving = {f"{a}:{b}": sum(1 for n in run.nodes if n.state == "up" and a < n.span[1] and n.span[0] < b)
                   for a, b in exc.missing}
        outcome.detail = f"{type(exc).__name__} {exc.missing} (replicas serving now: {serving}): {exc}"
    except trio.TooSlowError:
        outcome.detail = f"hang: no result within {GENERATION_TIMEOUT_S:.0f} s"
    except Exception as exc:  # noqa: BLE001 - every other end is a finding
        outcome.detail = f"{type(exc).__name__}: {exc}"
    outcome.duration_s = time.monotonic() - t
    return outcome


async def _worker(run: _Run, client: Any, worker: int, expected: list[int], max_generations: int) -> None:
    for _ in range(max_generations):
        if run.stop_generating:
            return
        outcome = await _generate(run, client, worker, expected)
        run.outcomes.append(outcome)
        if outcome.kind != "identical":
            run.log(f"worker {worker}: {outcome.kind}: {outcome.detail[:300]}")
            # A generation that failed at once (NoRoute) is not retried in a tight loop: the
            # next try waits for the others' progress (a token streamed) or 2 s.
            await run.wait_tokens(1, 2.0)


# ---- ledgers ---------------------------------------------------------------------------------

def _receipts(path: Path, owner: str, errors: list[str]) -> list[Any]:
    """Every entry of the ledger at ``path`` (verified); [] and the reason in ``errors`` when it
    cannot be opened (a finding: a ledger a node wrote must open)."""
    from node.ledger.store import Ledger, LedgerError

    try:
        with Ledger.open(path, owner) as ledger:
            return list(ledger.entries())
    except LedgerError as exc:
        errors.append(f"{path}: {exc}")
        return []


def compare_ledgers(client_dir: Path, nodes: list[Node]) -> dict[str, Any]:
    """Receipts lost and per-pair settlement between the client's ledger and each server's."""
    from node.ledger.store import LEDGER_FILE
    from protocol.identity import Identity
    from protocol.receipts import Receipt
    from protocol.settlement import build_statement, cosign_statement, settleable

    client_id = Identity.load_or_create(client_dir)
    errors: list[str] = []
    client_entries = _receipts(client_dir / LEDGER_FILE, client_id.peer_id, errors)
    servers: dict[str, tuple[Identity, list[Any]]] = {}
    for n in nodes:
        ident = Identity.load_or_create(n.data_dir)
        servers[ident.peer_id] = (ident, _receipts(n.data_dir / LEDGER_FILE, ident.peer_id, errors))
    lost: list[dict[str, Any]] = []
    not_countersigned_on_server: list[dict[str, Any]] = []
    content_differs: list[str] = []
    client_status: dict[str, int] = {}
    for e in client_entries:
        client_status[e.status] = client_status.get(e.status, 0) + 1
        if e.status != "countersigned":
            continue
        server_entries = {s.receipt_id: s for s in servers.get(e.server, (None, []))[1]}
        s = server_entries.get(e.receipt_id)
        row = {"receipt_id": e.receipt_id, "server": e.server, "session_id": e.session_id,
               "checkpoint": e.checkpoint, "work_units": e.work_units}
        if s is None:
            lost.append(row)
        else:
            if s.status != "countersigned":
                not_countersigned_on_server.append({**row, "server_status": s.status, "reason": s.reason})
            if Receipt.from_bytes(s.receipt).signed_bytes() != Receipt.from_bytes(e.receipt).signed_bytes():
                content_differs.append(e.receipt_id)
    client_receipts = [Receipt.from_bytes(e.receipt) for e in client_entries if e.status == "countersigned"]
    pairs = []
    now = time.time() + 1
    for server, (ident, entries) in sorted(servers.items()):
        status: dict[str, int] = {}
        status_units: dict[str, int] = {}
        for s in entries:
            if s.client == client_id.peer_id:
                status[s.status] = status.get(s.status, 0) + 1
                status_units[s.status] = status_units.get(s.status, 0) + s.work_units
        srv = [Receipt.from_bytes(s.receipt) for s in entries if s.status == "countersigned"]
        mine = settleable(srv, party_a=server, party_b=client_id.peer_id, until=None)
        theirs = settleable(client_receipts, party_a=server, party_b=client_id.peer_id, until=None)
        statement_ok, statement_error = True, ""
        try:
            st = build_statement(ident, client_id.peer_id, srv, period_start=0.0, period_end=now)
            cosign_statement(client_id, st, client_receipts)
        except Exception as exc:  # noqa: BLE001 - the finding is the message
            statement_ok, statement_error = False, f"{type(exc).__name__}: {exc}"
        # What a killed server cannot know: the client countersigned a receipt the server had
        # stored (before sending it) as server_only, and the Countersign never reached it. Counting
        # the client's countersigned copies of those must make the two sides equal.
        held_only = {s.receipt_id for s in entries if s.status == "server_only"}
        completed = srv + [r for r in client_receipts if r.server == server and r.receipt_id in held_only]
        mine_completed = settleable(completed, party_a=server, party_b=client_id.peer_id, until=None)
        only_server = sorted({r.session_id for r in mine} - {r.session_id for r in theirs})
        only_client = sorted({r.session_id for r in theirs} - {r.session_id for r in mine})
        pairs.append({
            "server": server, "client": client_id.peer_id,
            "server_ledger_work_units": sum(r.work_units for r in mine),
            "client_ledger_work_units": sum(r.work_units for r in theirs),
            "server_sessions": len(mine), "client_sessions": len(theirs),
            "match": [(r.receipt_id, r.work_units) for r in mine] == [(r.receipt_id, r.work_units) for r in theirs],
            "statement_cosigned": statement_ok, "statement_error": statement_error,
            "match_counting_server_only": [(r.receipt_id, r.work_units) for r in mine_completed]
            == [(r.receipt_id, r.work_units) for r in theirs],
            "server_entries_by_status": status, "server_work_units_by_status": status_units,
            "sessions_only_in_server": only_server, "sessions_only_in_client": only_client,
        })
    return {
        "client": client_id.peer_id,
        "ledger_errors": errors,
        "client_entries_by_status": client_status,
        "receipts_countersigned_by_client": client_status.get("countersigned", 0),
        "receipts_lost": len(lost), "lost": lost[:50],
        "countersigned_by_client_but_not_on_server": len(not_countersigned_on_server),
        "not_countersigned_on_server": not_countersigned_on_server[:50],
        "receipt_content_differs": content_differs[:50],
        "pairs": pairs,
        "pairs_matching": sum(1 for p in pairs if p["match"] and p["statement_cosigned"]),
        "pairs_explained": sum(1 for p in pairs if not p["match"] and p["match_counting_server_only"]),
    }


# ---- the run ---------------------------------------------------------------------------------

async def run_chaos(cfg: ChaosConfig, root: Path) -> dict[str, Any]:
    """The whole experiment under ``root`` (created, left for the caller to remove)."""
    from node.client.swarm import SwarmClient
    from node.engine.registry import resolve_model
    from node.engine.testing import make_tiny_model

    root.mkdir(parents=True, exist_ok=True)
    model_path = cfg.model or str(await trio.to_thread.run_sync(
        lambda: make_tiny_model(root / "tiny-model", seed=0, arch="llama", num_layers=6)))
    source = resolve_model(model_path)
    layers = source.num_layers
    cuts = [round(i * layers / cfg.spans) for i in range(cfg.spans + 1)]
    spans = [(cuts[i], cuts[i + 1]) for i in range(cfg.spans)]
    run = _Run(cfg, root, model_path, model_id=source.model_id, t0=time.monotonic(),
               extra_args=["--receipt-every", str(cfg.receipt_every)])
    run.nodes = [Node(i, spans[i % cfg.spans], root / f"node{i}") for i in range(cfg.spans * cfg.replicas)]
    result: dict[str, Any] = {"config": {**cfg.__dict__, "spans_layout": spans, "nodes": len(run.nodes),
                                         "model_id": source.model_id}}
    try:
        run.log(f"starting {len(run.nodes)} nodes, spans {spans} x {cfg.replicas}")
        await trio.to_thread.run_sync(_start, run, run.nodes[0])
        run.nodes[0].state = "up"
        async with trio.open_nursery() as nursery:
            for n in run.nodes[1:]:
                nursery.start_soon(trio.to_thread.run_sync, _start, run, n)
        for n in run.nodes:
            n.state = "up"
        client_dir = root / "client"
        async with SwarmClient.open(run.up_addrs(), data_dir=client_dir, step_timeout_s=STEP_TIMEOUT_S) as client:
            await client.wait_for_route(source.model_id, 120)
            for n in run.nodes:
                await _serving(run, client, n)
            run.log("all records visible; fault-free reference round")
            reference: list[list[int]] = [[] for _ in range(cfg.concurrency)]

            async def ref(i: int) -> None:
                o = await _generate(run, client, i, None)
                if o.kind != "identical":
                    raise RuntimeError(f"the fault-free reference generation failed: {o.detail}")
                reference[i] = o.tokens  # type: ignore[attr-defined]

            async with trio.open_nursery() as nursery:
                for i in range(cfg.concurrency):
                    nursery.start_soon(ref, i)
            from node.engine.reference import reference_greedy
            local = [await trio.to_thread.run_sync(reference_greedy, source, PROMPTS[i % len(PROMPTS)], cfg.new_tokens)
                     for i in range(cfg.concurrency)]
            result["reference_equals_local_greedy"] = local == reference
            run.log(f"reference done ({run.tokens} tokens); equals in-process greedy: {local == reference}")
            t_faults = time.monotonic()
            async with trio.open_nursery() as nursery:
                async with trio.open_nursery() as workers:
                    for i in range(cfg.concurrency):
                        workers.start_soon(_worker, run, client, i, reference[i], 10_000)
                    await _faults(run, client, nursery)
                    run.log(f"{len(run.faults)} faults injected; letting running generations finish")
                    run.stop_generating = True
                # restarts and SIGCONTs still pending finish here (each bounded)
            fault_phase_s = time.monotonic() - t_faults
            # Everything serving again: one more fault-free round proves the swarm recovered.
            for n in run.nodes:
                if n.proc.proc.poll() is None and n.state == "stopped":
                    os.kill(n.proc.proc.pid, signal.SIGCONT)
            after = [await _generate(run, client, i, reference[i]) for i in range(cfg.concurrency)]
            result["after_chaos_identical"] = sum(1 for o in after if o.kind == "identical")
        run.log("stopping every node (SIGTERM) for settlement")
        await trio.to_thread.run_sync(_stop_all, run)
        ledgers = await trio.to_thread.run_sync(compare_ledgers, client_dir, run.nodes)
    finally:
        _kill_all(run)
    counts = {k: sum(1 for o in run.outcomes if o.kind == k) for k in ("identical", "layers_lost", "other")}
    result.update({
        "faults": len(run.faults),
        "faults_by_kind": {k: sum(1 for f in run.faults if f.kind == k) for k in ("kill", "stop", "restart")},
        "fault_phase_s": fault_phase_s,
        "generations": len(run.outcomes),
        "generations_identical": counts["identical"],
        "generations_layers_lost": counts["layers_lost"],
        "generations_other": counts["other"],
        "other_details": [o.detail for o in run.outcomes if o.kind == "other"][:50],
        "layers_lost_details": [o.detail for o in run.outcomes if o.kind == "layers_lost"][:50],
        "failovers_total": sum(o.failovers for o in run.outcomes),
        "node_starts": {n.index: n.starts for n in run.nodes},
        "ledgers": ledgers,
        "timeline": {
            "faults": [f.__dict__ for f in run.faults],
            "outcomes": [{k: v for k, v in o.__dict__.items() if k != "tokens"} for o in run.outcomes],
        },
    })
    return result


def _stop_all(run: _Run) -> None:
    for n in run.nodes:
        if n.proc is not None and n.proc.proc.poll() is None:
            os.kill(n.proc.proc.pid, signal.SIGCONT)
            n.proc.terminate()
    for n in run.nodes:
        if n.proc is not None:
            n.proc.stop(60.0)


def _kill_all(run: _Run) -> None:
    """Every process this run started, by pid (SIGCONT first: a stopped one cannot die cleanly)."""
    for n in run.nodes:
        if n.proc is not None and n.proc.proc.poll() is None:
            try:
                os.kill(n.proc.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            n.proc.kill()


def plot(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 7), gridspec_kw={"height_ratios": [3, 2]})
    colours = {"kill": "tab:red", "stop": "tab:orange", "restart": "tab:purple"}
    for f in result["timeline"]["faults"]:
        ax1.axvline(f["t"], color=colours[f["kind"]], alpha=0.35, lw=1)
    marks = {"identical": ("tab:green", "o"), "layers_lost": ("tab:blue", "s"), "other": ("black", "x")}
    for kind, (c, m) in marks.items():
        pts = [o for o in result["timeline"]["outcomes"] if o["kind"] == kind]
        if pts:
            ax1.scatter([o["t"] + o["duration_s"] for o in pts], [o["duration_s"] for o in pts], c=c, marker=m,
                        s=14, label=f"{kind} ({len(pts)})")
    for kind, c in colours.items():
        ax1.plot([], [], color=c, label=f"{kind} fault")
    ax1.set_xlabel("seconds since start")
    ax1.set_ylabel("generation time (s)")
    ax1.set_title(f"chaos: {result['faults']} faults, {result['generations']} generations, "
                  f"receipts lost {result['ledgers']['receipts_lost']}")
    ax1.legend(fontsize=7, loc="upper left")
    pairs = result["ledgers"]["pairs"]
    xs = range(len(pairs))
    ax2.bar([x - 0.2 for x in xs], [p["server_ledger_work_units"] for p in pairs], 0.4, label="server ledger")
    ax2.bar([x + 0.2 for x in xs], [p["client_ledger_work_units"] for p in pairs], 0.4, label="client ledger")
    ax2.set_xticks(list(xs), [p["server"][-6:] for p in pairs], fontsize=7)
    ax2.set_ylabel("settleable work units")
    ax2.set_xlabel("server (client: one agent)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ChaosConfig()
    ap.add_argument("--faults", type=int, default=d.faults)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--spans", type=int, default=d.spans)
    ap.add_argument("--replicas", type=int, default=d.replicas)
    ap.add_argument("--concurrency", type=int, default=d.concurrency)
    ap.add_argument("--new-tokens", type=int, default=d.new_tokens)
    ap.add_argument("--tokens-per-fault", type=int, default=d.tokens_per_fault)
    ap.add_argument("--stop-tokens", type=int, default=d.stop_tokens)
    ap.add_argument("--receipt-every", type=int, default=d.receipt_every)
    ap.add_argument("--max-s", type=float, default=d.max_s, help="bound on the fault phase")
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the seeded tiny test model)")
    ap.add_argument("--out", type=Path, default=Path("bench-out/chaos"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, ledgers)")
    args = ap.parse_args(argv)
    if args.replicas < 2:
        ap.error("--replicas must be at least 2 (a fault never takes a span's last replica)")
    cfg = ChaosConfig(faults=args.faults, seed=args.seed, spans=args.spans, replicas=args.replicas,
                      concurrency=args.concurrency, new_tokens=args.new_tokens,
                      tokens_per_fault=args.tokens_per_fault, stop_tokens=args.stop_tokens,
                      receipt_every=args.receipt_every, max_s=args.max_s, model=args.model)
    root = Path(tempfile.mkdtemp(prefix="shiza-chaos-"))
    t0 = time.monotonic()
    try:
        result = trio.run(run_chaos, cfg, root)
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result["wall_s"] = time.monotonic() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2, default=str))
    plotted = plot(result, args.out / "chaos.png")
    led = result["ledgers"]
    print(json.dumps({k: result[k] for k in ("faults", "faults_by_kind", "generations", "generations_identical",
                                              "generations_layers_lost", "generations_other",
                                              "failovers_total", "after_chaos_identical", "wall_s")}, indent=1))
    print(f"receipts countersigned by the client: {led['receipts_countersigned_by_client']}, "
          f"lost: {led['receipts_lost']}, not countersigned on the server: "
          f"{led['countersigned_by_client_but_not_on_server']}")
    for p in led["pairs"]:
        print(f"  server {p['server'][-8:]}: server ledger {p['server_ledger_work_units']} units / "
              f"client ledger {p['client_ledger_work_units']} units, match {p['match']}, "
              f"statement cosigned {p['statement_cosigned']} {p['statement_error'][:120]}, equal counting the "
              f"client's countersigned copies of server_only receipts {p['match_counting_server_only']}; "
              f"server entries {p['server_entries_by_status']}")
    print(f"wrote {args.out / 'results.json'}" + (f" and {args.out / 'chaos.png'}" if plotted else ""))
    ok = (result["generations_other"] == 0 and led["receipts_lost"] == 0 and not led["ledger_errors"]
          and led["pairs_matching"] + led["pairs_explained"] == len(led["pairs"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
