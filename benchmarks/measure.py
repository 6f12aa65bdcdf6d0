"""The measurements of ``shiza bench`` (benchmarks/suite.py runs them and writes the report).

Each function returns a plain dict of numbers (seconds, tokens/s, GB/s) so results.json is
just their union. Everything runs on loopback; pipelines use real node processes.
"""

from __future__ import annotations

import socket
import tempfile
import time
import urllib.request
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import trio

from benchmarks import roundtrip

PROMPT = [1, 504, 3458, 282, 4649, 314, 5140, 30, 9690, 198, 28, 7]


def _spans(num_layers: int, hops: int) -> list[tuple[int, int]]:
    cuts = [round(i * num_layers / hops) for i in range(hops + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


# ---- 1. the monolithic baseline -------------------------------------------------------------

def monolithic(model: str, new_tokens: int) -> dict[str, Any]:
    """Whole model in this process: greedy batch 1 (tok/s, TTFT) and batch 8 decode tok/s."""
    from node.engine.registry import resolve_model
    from node.engine.span import SpanEngine, measure_throughput

    from benchmarks.baseline import monolithic_greedy

    monolithic_greedy(model, PROMPT, 3)  # warm-up (lazy imports, first-call allocations)
    b1 = monolithic_greedy(model, PROMPT, new_tokens)
    source = resolve_model(model, progress=False)
    engine = SpanEngine.load(source, 0, source.num_layers)
    b8 = measure_throughput(engine, steps=max(4, new_tokens // 2), prompt_length=len(PROMPT),
                            batch_size=8)
    return {"monolithic_b1_tok_s": b1.tokens_per_s, "monolithic_ttft_s": b1.ttft_s,
            "monolithic_b8_tok_s": b8,
            "monolithic_b8_vs_b1_ratio": b8 / b1.tokens_per_s if b1.tokens_per_s else None}


# ---- 2. pipelines of real node processes -----------------------------------------------------

def pipeline(model: str, hops: int, new_tokens: int, concurrency: list[int],
             root: Path, libp2p_single: bool = False) -> dict[str, Any]:
    """Start ``hops`` nodes splitting the model, then one session and c concurrent ones.

    Sessions use direct activation channels (the client's default). Each node serves its
    Prometheus metrics, so the single session's engine time is known; with ``libp2p_single``
    one more single session runs with ``direct=False`` (frames on the libp2p streams)."""
    from node.engine.registry import resolve_model
    from node.devtools.localswarm import start_chain, stop_all

    source = resolve_model(model, progress=False)
    ports = [_free_port() for _ in range(hops)]
    nodes = start_chain(root / f"pipeline{hops}", _spans(source.num_layers, hops), model=model,
                        timeout_s=300, metrics_ports=ports)
    try:
        return trio.run(_drive, nodes[0].addr, source.model_id, source.num_layers, new_tokens,
                        concurrency, ports, libp2p_single)
    finally:
        stop_all(nodes)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _decode_engine_s(ports: list[int]) -> list[tuple[float, float]]:
    """Per node, (sum, count) of its ``shiza_step_duration_seconds`` decode observations."""
    from prometheus_client.parser import text_string_to_metric_families

    out = []
    for port in ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        total = {"_sum": 0.0, "_count": 0.0}
        for fam in text_string_to_metric_families(text):
            if fam.name == "shiza_step_duration_seconds":
                for s in fam.samples:
                    suffix = s.name[len(fam.name):]
                    if suffix in total and s.labels.get("phase") == "decode":
                        total[suffix] += s.value
        out.append((total["_sum"], total["_count"]))
    return out


async def _timed_single(client: Any, model_id: str, route: Any, new_tokens: int,
                        ports: list[int]) -> tuple[Any, float | None]:
    """One session, and the engine time per decode token summed over the nodes (mean of
    each node's decode steps during that session, from its metrics; None if unreadable)."""
    try:
        before = await trio.to_thread.run_sync(_decode_engine_s, ports)
    except OSError:
        before = None
    one = await client.generate(model_id, [PROMPT], max_new_tokens=new_tokens, route=route)
    try:
        after = await trio.to_thread.run_sync(_decode_engine_s, ports)
    except OSError:
        return one, None
    if before is None or any(a[1] <= b[1] for a, b in zip(after, before)):
        return one, None
    return one, sum((a[0] - b[0]) / (a[1] - b[1]) for a, b in zip(after, before))


def _decode_step_s(result: Any) -> float | None:
    """The client's wall time per decode step of one generation (None with a single step)."""
    return result.decode_s / (result.steps - 1) if result.steps > 1 else None


async def _drive(addr: str, model_id: str, num_layers: int, new_tokens: int,
                 concurrency: list[int], ports: list[int], libp2p_single: bool) -> dict[str, Any]:
    from node.client.swarm import SwarmClient

    out: dict[str, Any] = {}
    async with SwarmClient.open([addr]) as client:
        route = await client.wait_for_route(model_id, 120, num_layers=num_layers)
        await client.generate(model_id, [PROMPT], max_new_tokens=3, route=route)  # warm-up
        one, compute = await _timed_single(client, model_id, route, new_tokens, ports)
        out["single_tok_s"] = one.tokens_per_s
        out["ttft_s"] = one.ttft_s
        # Client wall time per decode token (each a step through every hop), and the part of
        # it the nodes' engines spent computing: the rest is protocol and transport.
        out["client_step_s"] = _decode_step_s(one)
        out["node_compute_per_token_s"] = compute
        out["direct_fallbacks"] = len(client.direct_failed)  # hops that fell back to libp2p
        out["pushed_steps"] = one.pushed_steps  # node-to-node flow (SPEC 9.6), the default
        # The same session driven by the client at every hop (the mode before SPEC 9.6).
        out.update(await _single_with(addr, model_id, num_layers, new_tokens, ports, "client_driven", push=False))
        if libp2p_single:
            out.update(await _single_with(addr, model_id, num_layers, new_tokens, ports, "libp2p", direct=False,
                                          push=False))  # every activation on the client's streams
        out["aggregate_tok_s"] = {}
        # Nodes cap open sessions per peer (8): many sessions come from several client peers.
        clients = [client]
        async with AsyncExitStack() as stack:
            for _ in range((max(concurrency) - 1) // SESSIONS_PER_CLIENT):
                clients.append(await stack.enter_async_context(SwarmClient.open([addr])))
            for c in concurrency:
                await _concurrent(clients, model_id, route, new_tokens, c, out)
    return out


async def _single_with(addr: str, model_id: str, num_layers: int, new_tokens: int, ports: list[int],
                       suffix: str, **options: Any) -> dict[str, Any]:
    """One timed session from a client opened with ``options``; its keys end in ``_suffix``."""
    from node.client.swarm import SwarmClient

    async with SwarmClient.open([addr], **options) as client:
        route = await client.wait_for_route(model_id, 120, num_layers=num_layers)
        await client.generate(model_id, [PROMPT], max_new_tokens=3, route=route)  # warm-up
        one, compute = await _timed_single(client, model_id, route, new_tokens, ports)
    return {f"single_tok_s_{suffix}": one.tokens_per_s, f"client_step_s_{suffix}": _decode_step_s(one),
            f"node_compute_per_token_s_{suffix}": compute}


SESSIONS_PER_CLIENT = 8


async def _concurrent(clients: list[Any], model_id: str, route: Any, new_tokens: int, c: int,
                      out: dict[str, Any]) -> None:
    """Aggregate tokens/s of ``c`` sessions at once: every new token over the wall time
    (prefills included)."""
    total = 0

    async def gen(i: int) -> None:
        nonlocal total
        prompt = PROMPT[: 4 + i % 8] + [100 + i]  # different lengths
        r = await clients[i % len(clients)].generate(
            model_id, [prompt], max_new_tokens=new_tokens, route=route)
        total += len(r.token_ids[0])

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for i in range(c):
            nursery.start_soon(gen, i)
    out["aggregate_tok_s"][str(c)] = total / (time.perf_counter() - t0)


# ---- 3. one decode hop: round trips (benchmarks/roundtrip.py) and the step's own costs ------

round_trips = roundtrip.round_trips


def step_profile(model: str, rounds: int) -> dict[str, float]:
    """Client-to-node costs of one decode step besides the wire: codec, scheduler, engine."""
    import torch

    from node.engine.registry import resolve_model
    from node.engine.span import SpanEngine
    from node.engine.tensors import from_torch, to_torch
    from node.serve.scheduler import StepScheduler
    from protocol.codec import unpack
    from protocol.messages import Step, decode_message, encode_message
    from node.net.wire import int64_tensor

    source = resolve_model(model, progress=False)
    h = source.hidden_size
    x = torch.randn(1, 1, h)
    pos, mask = int64_tensor([[5]]), int64_tensor([[1]])

    def timed(fn: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            fn()
        return (time.perf_counter() - t0) / rounds

    frame = encode_message(Step(1, from_torch(x), pos, mask))
    enc = timed(lambda: encode_message(Step(1, from_torch(x), pos, mask)))
    dec = timed(lambda: to_torch(decode_message(unpack(frame[4:])).input))
    engine = SpanEngine.load(source, 1, 2)  # one middle layer: the scheduler's overhead shows
    engine.open_session("p", 1, rounds * 2 + 8)
    xs = torch.randn(1, 4, h)
    engine.step("p", xs, torch.arange(4)[None])
    n = [4]

    def direct() -> None:
        engine.step("p", x, torch.tensor([[n[0]]]))
        n[0] += 1

    direct_s = timed(direct)
    sched = StepScheduler()
    wx = from_torch(x)  # the scheduler takes wire tensors; the engine converts them (as served)

    async def via() -> float:
        t0 = time.perf_counter()
        for _ in range(rounds):
            await sched.step(engine, "p", wx, int64_tensor([[n[0]]]), None)
            n[0] += 1
        return (time.perf_counter() - t0) / rounds

    sched_s = trio.run(via)
    return {"encode_step_s": enc, "decode_step_s": dec, "frame_bytes": len(frame),
            "one_layer_step_direct_s": direct_s, "one_layer_step_scheduled_s": sched_s,
            "scheduler_overhead_s": sched_s - direct_s}


# ---- 4. the codec -----------------------------------------------------------------------------

def codec(hidden: int, sizes: list[int], rounds: int) -> dict[str, Any]:
    """Encode and decode GB/s of Step messages carrying (1, T, hidden) fp32, beside memcpy."""
    import torch

    from node.engine.tensors import from_torch, to_torch
    from node.net.wire import int64_tensor
    from protocol.codec import unpack
    from protocol.messages import Step, decode_message, encode_message

    out: dict[str, Any] = {}
    for t in sizes:
        x = torch.randn(1, t, hidden)
        nbytes = x.numel() * 4
        pos = int64_tensor([list(range(t))])

        def rate(fn: Any) -> float:
            fn()
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn()
            return nbytes * rounds / (time.perf_counter() - t0) / 1e9

        frame = encode_message(Step(0, from_torch(x), pos, None))
        raw = x.numpy().tobytes()
        out[f"T{t}"] = {
            "bytes": nbytes,
            "encode_gb_s": rate(lambda: encode_message(Step(0, from_torch(x), pos, None))),
            "decode_gb_s": rate(lambda: to_torch(decode_message(unpack(frame[4:])).input)),
            "memcpy_gb_s": rate(lambda: bytearray(raw)),
        }
        row = out[f"T{t}"]
        row["encode_vs_memcpy_ratio"] = row["encode_gb_s"] / row["memcpy_gb_s"]
        row["decode_vs_memcpy_ratio"] = row["decode_gb_s"] / row["memcpy_gb_s"]
    return out


# ---- 5. receipts --------------------------------------------------------------------------------

def receipts(n: int) -> dict[str, float]:
    """Receipts signed, verified and committed to a durable ledger, per second."""
    from node.ledger.accounting import store
    from node.ledger.store import Ledger
    from protocol import Identity, sign_receipt, verify_receipt

    from benchmarks.receipts_bench import _receipts

    server, client = Identity.generate(), Identity.generate()
    unsigned = _receipts(server, client, n)
    t0 = time.perf_counter()
    signed = [sign_receipt(server, r) for r in unsigned]
    sign_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for r in signed:
        verify_receipt(r)
    verify_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        ledger = Ledger.open(Path(d) / "ledger.sqlite", server)
        t0 = time.perf_counter()
        for r in signed:
            store(ledger, r, "server_only", "")
        commit_s = time.perf_counter() - t0
        ledger.close()
    return {"sign_per_s": n / sign_s, "verify_per_s": n / verify_s, "commit_per_s": n / commit_s}


# ---- 6. the DHT ---------------------------------------------------------------------------------

DHT_MODEL = "bench-model@0123456789abcdef"
DHT_LAYERS = 32


async def _dht_coverage(n: int, timeout_s: float) -> dict[str, float | None]:
    from node.net.records import DHT_SELECTORS, DHT_VALIDATORS, fetch_records
    from node.serve.announce import Announcer, RecordState
    from node.net.dht import open_dht
    from node.net.host import open_host
    from protocol.identity import Identity
    from protocol.messages import ServedSpan
    from protocol.records import Hardware

    t_setup = time.perf_counter()
    async with AsyncExitStack() as stack:
        hosts, dhts, ids = [], [], []
        for _ in range(n + 1):  # n serving peers and one client
            ident = Identity.generate()
            host = await stack.enter_async_context(open_host(ident.seed))
            boot = [hosts[0].addrs[0]] if hosts else []
            dhts.append(await stack.enter_async_context(
                open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, boot)))
            hosts.append(host)
            ids.append(ident)
        setup_s = time.perf_counter() - t_setup
        nursery = await stack.enter_async_context(trio.open_nursery())
        t0 = time.perf_counter()
        for i, (a, b) in enumerate(_spans(DHT_LAYERS, n)):
            state = RecordState(addrs=tuple(hosts[i + 1].addrs),
                                spans=(ServedSpan(DHT_MODEL, a, b, DHT_LAYERS),),
                                hardware=Hardware("cpu", "bench", 8 << 30, 4 << 30),
                                throughput=10.0, cache_tokens_left=4096)
            ann = Announcer(ids[i + 1], dhts[i + 1], state, ttl_s=300, provide_keys=(DHT_MODEL,))
            nursery.start_soon(ann.serve)
        found_s = None
        with trio.move_on_after(timeout_s):
            while True:
                records = await fetch_records(dhts[0], DHT_MODEL)
                covered = set()
                for r in records:
                    for s in r.spans:
                        covered.update(range(s.start, s.end))
                if len(covered) == DHT_LAYERS:
                    found_s = time.perf_counter() - t0
                    break
                await trio.sleep(0.2)
        t1 = time.perf_counter()
        await fetch_records(dhts[0], DHT_MODEL)  # a lookup once everything is published
        lookup_s = time.perf_counter() - t1
        nursery.cancel_scope.cancel()
    return {"setup_s": setup_s, "publish_to_coverage_s": found_s, "lookup_s": lookup_s}


def dht(sizes: list[int], timeout_s: float = 120.0) -> dict[str, Any]:
    return {str(n): trio.run(_dht_coverage, n, timeout_s) for n in sizes}
