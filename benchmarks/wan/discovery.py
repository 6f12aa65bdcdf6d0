"""Discovery at scale: how long a client takes to find a model's full coverage as the swarm grows.

    sudo .venv/bin/python -m benchmarks.wan.discovery [--sizes 10,30,100] [--delays 0,25]
        [--hosts 20] [--in-process 10,30] [--out DIR]

For each one-way delay (every link between two namespaces) and each swarm size N, it starts N
lightweight DHT peers (benchmarks/wan/dht_peer.py: a real libp2p host and the swarm's DHT, no
model) as separate processes spread round-robin over ``--hosts`` namespaces, each peer saying it
serves a span of a 32-layer model (N spans covering the model, overlapping when N > 32), and a
client in a namespace of its own. Peer 1 is everyone's bootstrap peer; the others join
``--join-batch`` (10) at a time, each batch once the one before has joined. Then:

1. all peers publish at once (a signed capacity record, stored at the closest peers, and a
   provider announcement: what a node's Announcer does); the client, already bootstrapped, asks
   the network (fetch_records) until every layer is served ("full coverage") and until all N
   records are seen, timed from the moment the peers were told to publish;
2. the client, warm, times one fetch of every record, one Kademlia lookup of a random key
   (FIND_NODE) and one DHT lookup of a single peer's record (the lookup, then GET_VALUE at the
   closest peers), counting the requests each sent;
3. a second client starts cold in another namespace, bootstrapping from a peer in the middle of
   the swarm, and times its bootstrap and its own time to full coverage.

``--in-process`` also runs the loopback benchmark of benchmarks/measure.py (every peer a host in
one process, on one event loop) at those sizes, for comparison in the same run. results.json,
results.md and discovery.png (times against N, log-scale N, with Kademlia's log N shape beside
them) go to ``--out``. Root only (network namespaces); peers within one namespace reach each
other without the delay (with 20 namespaces, 4% of the pairs at N = 100).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from benchmarks.wan.pipeline import spans_of
from node.devtools.netns import MAX_HOSTS, Network, why_unavailable

MODEL = "bench-model@0123456789abcdef"
LAYERS = 32
CLIENT, COLD = "client", "cold"
READY_S = 120.0  # a peer process reports ready within this (imports, bootstrap)
ANSWER_S = 180.0  # a command is answered within this
STOP_S = 20.0
LOOKUPS = 3  # warm lookups per size; the median is reported


def spans_for(n: int, layers: int = LAYERS) -> list[tuple[int, int]]:
    """N spans that together serve every layer: contiguous slices when N <= layers, otherwise
    one layer each, round-robin (so every layer has N / layers replicas)."""
    if n < 1:
        raise ValueError("need at least one peer")
    if n <= layers:
        return spans_of(layers, n)
    return [(i % layers, i % layers + 1) for i in range(n)]


def host_names(hosts: int) -> list[str]:
    if not 1 <= hosts <= MAX_HOSTS - 2:
        raise ValueError(f"--hosts must be 1..{MAX_HOSTS - 2}")
    return [f"p{i}" for i in range(1, hosts + 1)]


def log_fit(ns: Sequence[int], ts: Sequence[float]) -> tuple[float, float] | None:
    """Least squares t = a + b log2 N; None with fewer than two distinct sizes."""
    pts = [(math.log2(n), t) for n, t in zip(ns, ts) if t is not None]
    if len({x for x, _ in pts}) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    b = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - b * mx, b


def growth(ns: Sequence[int], ts: Sequence[float | None]) -> dict[str, float] | None:
    """How a time grew from the smallest to the largest N, against log N and N."""
    pts = [(n, t) for n, t in zip(ns, ts) if t is not None]
    if len(pts) < 2 or pts[0][1] <= 0:
        return None
    (n0, t0), (n1, t1) = pts[0], pts[-1]
    return {"from_n": n0, "to_n": n1, "time_ratio": round(t1 / t0, 3),
            "log_n_ratio": round(math.log2(n1) / math.log2(n0), 3) if n0 > 1 else float("inf"),
            "n_ratio": round(n1 / n0, 3)}


class Proc:
    """A dht_peer process: one command a line in, one JSON line out, read with a deadline."""

    def __init__(self, popen: subprocess.Popen[bytes], name: str) -> None:
        self.popen, self.name, self._buf = popen, name, b""
        self.t_start = time.time()

    def send(self, line: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(line.encode() + b"\n")
        self.popen.stdin.flush()

    def recv(self, timeout_s: float) -> dict:
        assert self.popen.stdout is not None
        fd = self.popen.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout_s:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited ({self.popen.poll()}) before answering")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def stop(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            try:
                self.popen.stdin.close()  # end of input: the process leaves its DHT and exits
            except BrokenPipeError:
                pass


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a running process, from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_all(procs: Sequence[Proc]) -> None:
    for p in procs:
        p.stop()
    deadline = time.monotonic() + STOP_S
    for p in procs:
        try:
            p.popen.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.popen.kill()
            p.popen.wait(10)


def _start(net: Network, host: str, name: str, role: str, work: Path, *extra: str) -> Proc:
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(work / f"{name}.log", "ab")  # noqa: SIM115 - the child holds it
    try:
        popen = net.popen(host, [sys.executable, "-m", "benchmarks.wan.dht_peer", role, "--model", MODEL,
                                 "--layers", str(LAYERS), *extra],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, bufsize=0)
    finally:
        log.close()
    return Proc(popen, name)


def measure_size(net: Network, hosts: Sequence[str], n: int, delay_ms: float, work: Path,
                 say: Any = print, join_batch: int = 10) -> dict[str, Any]:
    spans = spans_for(n)
    procs: list[Proc] = []
    out: dict[str, Any] = {"n": n, "delay_ms": delay_ms}
    try:
        t_setup = time.time()
        first = _start(net, hosts[0], "peer-0", "peer", work, "--span", "%d:%d" % spans[0])
        procs.append(first)
        ready = [first.recv(READY_S)]
        boot = ready[0]["addrs"][0]
        peers = [first]
        for lo in range(1, n, join_batch):  # a swarm grows a few nodes at a time
            batch = [_start(net, hosts[i % len(hosts)], f"peer-{i}", "peer", work,
                            "--span", "%d:%d" % spans[i], "--bootstrap", boot)
                     for i in range(lo, min(n, lo + join_batch))]
            peers += batch
            procs += batch
            ready += [p.recv(READY_S) for p in batch]
        out["setup_s"] = round(time.time() - t_setup, 3)
        out["peer_bootstrap_s_median"] = round(statistics.median(r["bootstrap_s"] for r in ready), 3)
        out["peer_routing_table_median"] = statistics.median(r["routing_table"] for r in ready)
        say(f"  {n} peers ready in {out['setup_s']:.1f} s (median bootstrap "
            f"{out['peer_bootstrap_s_median']:.2f} s, routing table {out['peer_routing_table_median']})")

        client = _start(net, CLIENT, "client", "client", work, "--bootstrap", boot)
        procs.append(client)
        c_ready = client.recv(READY_S)
        out["client_bootstrap_s"] = c_ready["bootstrap_s"]

        cpu0 = sum(cpu_seconds(p.popen.pid) for p in procs)
        t0 = time.time()
        for p in peers:
            p.send("publish")
        client.send(f"coverage {t0} {n} {ANSWER_S - 30}")
        answers = [p.recv(ANSWER_S) for p in peers]
        published = [a["published"] - t0 for a in answers]
        wall = max(published)
        cpu = sum(cpu_seconds(p.popen.pid) for p in procs) - cpu0
        cov = client.recv(ANSWER_S)
        out["publish_s_median"] = round(statistics.median(published), 3)
        out["publish_s_max"] = round(wall, 3)
        # CPU the peers and the client used while the peers published, over what the machine's
        # cores could give in that time: near 1, publishing waited for CPU, not for the network
        out["publish_cpu_s"] = round(cpu, 2)
        out["publish_cpu_busy"] = round(cpu / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None
        kinds = sorted({k for a in answers for k in a.get("requests", {})})
        out["publish_requests_median"] = {k: statistics.median(a.get("requests", {}).get(k, 0) for a in answers)
                                          for k in kinds}
        out.update(full_coverage_s=cov["full_coverage_s"], all_records_s=cov["all_records_s"],
                   records_seen=cov["records_seen"], coverage_polls=cov["polls"])
        say(f"  published (median {out['publish_s_median']:.2f} s, last {out['publish_s_max']:.2f} s, "
            f"{out['publish_cpu_s']:.1f} CPU s = {out['publish_cpu_busy']:.0%} of the cores; requests a peer "
            f"{out['publish_requests_median']}); "
            f"full coverage at {cov['full_coverage_s']} s, all {n} records at {cov['all_records_s']} s")

        looks = []
        for k in range(LOOKUPS):
            client.send(f"lookup {ready[(k + 1) * n // (LOOKUPS + 1)]['peer_id']}")
            looks.append(client.recv(ANSWER_S))
        for key in ("fetch_all_s", "find_node_s", "get_record_s"):
            out[key] = round(statistics.median(lk[key] for lk in looks), 4)
        out["lookups"] = looks
        out["find_node_requests"] = statistics.median(lk["find_node_requests"].get("find_node", 0) for lk in looks)
        out["get_record_found"] = all(lk["get_record_found"] for lk in looks)
        say(f"  warm: fetch every record {out['fetch_all_s']:.3f} s, FIND_NODE lookup {out['find_node_s']:.3f} s "
            f"({out['find_node_requests']:g} requests), one record {out['get_record_s']:.3f} s")

        cold = _start(net, COLD, "cold", "client", work, "--bootstrap", ready[n // 2]["addrs"][0])
        procs.append(cold)
        k_ready = cold.recv(READY_S)
        cold.send(f"coverage 0 {n} {ANSWER_S - 30}")
        k_cov = cold.recv(ANSWER_S)
        out["cold_bootstrap_s"] = k_ready["bootstrap_s"]
        out["cold_full_coverage_s"] = k_cov["full_coverage_s"]
        out["cold_all_records_s"] = k_cov["all_records_s"]
        out["cold_start_to_coverage_s"] = (round(k_ready["bootstrap_s"] + k_cov["full_coverage_s"], 4)
                                           if k_cov["full_coverage_s"] is not None else None)
        say(f"  cold client: bootstrap {k_ready['bootstrap_s']:.2f} s, then full coverage in "
            f"{k_cov['full_coverage_s']} s")
    finally:
        stop_all(procs)
    return out


def run(sizes: Sequence[int], delays: Sequence[float], n_hosts: int, work: Path,
        say: Any = print, join_batch: int = 10) -> list[dict[str, Any]]:
    hosts = host_names(n_hosts)
    rows = []
    total, done = len(sizes) * len(delays), 0
    for delay in delays:
        with Network([*hosts, CLIENT, COLD], delay_ms=delay, log_dir=work) as net:
            for n in sizes:
                done += 1
                say(f"[{done}/{total}] {n} peers over {len(hosts)} namespaces, {delay:g} ms one way per link")
                rows.append(measure_size(net, hosts, n, delay, work, say, join_batch))
    return rows


def analyse(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per delay: each time's growth from the smallest N to the largest, against log N and N."""
    out: dict[str, Any] = {}
    for delay in dict.fromkeys(r["delay_ms"] for r in rows):
        mine = sorted((r for r in rows if r["delay_ms"] == delay), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        out[f"{delay:g}"] = {key: growth(ns, [r.get(key) for r in mine])
                             for key in ("full_coverage_s", "find_node_s", "get_record_s", "fetch_all_s",
                                         "cold_start_to_coverage_s")}
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if v < 10 else f"{v:.1f}"
    return str(v)


def markdown(rows: Sequence[dict[str, Any]], in_process: dict[str, Any] | None = None) -> str:
    lines = ["| one-way delay | DHT peers | all publish: last done s (cores busy) | publish to full coverage s | "
             "to all N records s | warm: fetch all records s | one FIND_NODE lookup s (requests) | "
             "one record lookup s | cold client: bootstrap + full coverage s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        busy = r.get("publish_cpu_busy")
        lines.append(f"| {r['delay_ms']:g} ms | {r['n']} | {_fmt(r.get('publish_s_max'))}"
                     f"{f' ({busy:.0%})' if busy is not None else ''} | "
                     f"{_fmt(r['full_coverage_s'])} | {_fmt(r['all_records_s'])} | "
                     f"{_fmt(r['fetch_all_s'])} | {_fmt(r['find_node_s'])} ({_fmt(r['find_node_requests'])}) | "
                     f"{_fmt(r['get_record_s'])} | {_fmt(r['cold_start_to_coverage_s'])} |")
    if in_process:
        lines += ["", "All peers in one process on loopback (benchmarks/measure.py, the same run):", "",
                  "| DHT peers | publish to full coverage s | one lookup s |", "| --- | --- | --- |"]
        for n, d in sorted(in_process.items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {n} | {_fmt(d['publish_to_coverage_s'])} | {_fmt(d['lookup_s'])} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], in_process: dict[str, Any] | None, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    colors = ["#27a", "#c44", "#2a2", "#a72", "#72a"]
    for i, delay in enumerate(dict.fromkeys(r["delay_ms"] for r in rows)):
        mine = sorted((r for r in rows if r["delay_ms"] == delay), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        c = colors[i % len(colors)]
        left.plot(ns, [r["full_coverage_s"] for r in mine], "o-", color=c, label=f"{delay:g} ms: publish to full coverage")
        left.plot(ns, [r["cold_start_to_coverage_s"] for r in mine], "s--", color=c, alpha=0.7,
                  label=f"{delay:g} ms: cold client to full coverage")
        right.plot(ns, [r["find_node_s"] for r in mine], "o-", color=c, label=f"{delay:g} ms: FIND_NODE lookup")
        right.plot(ns, [r["get_record_s"] for r in mine], "^--", color=c, alpha=0.7, label=f"{delay:g} ms: one record")
        fit = log_fit(ns, [r["find_node_s"] for r in mine])
        if fit:
            grid = [ns[0] * (ns[-1] / ns[0]) ** (j / 50) for j in range(51)]
            right.plot(grid, [fit[0] + fit[1] * math.log2(g) for g in grid], ":", color=c, alpha=0.6,
                       label=f"{delay:g} ms: a + b log2 N fit")
    if in_process:
        ns = sorted(int(n) for n in in_process)
        left.plot(ns, [in_process[str(n)]["publish_to_coverage_s"] for n in ns], "x:", color="#555",
                  label="one process, loopback: publish to full coverage")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("DHT peers (log)")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    left.set_title("finding a model's full coverage")
    right.set_title("one lookup (warm client)")
    fig.suptitle(f"discovery: peers as processes across namespaces, {LAYERS}-layer model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _ints(text: str, what: str) -> list[int]:
    try:
        vals = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what}: comma-separated whole numbers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise argparse.ArgumentTypeError(f"{what}: at least one number, each at least 1")
    return sorted(set(vals))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.wan.discovery", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=lambda t: _ints(t, "--sizes"), default=[10, 30, 100])
    p.add_argument("--delays", default="0,25", help="one-way delays per link, ms, comma-separated")
    p.add_argument("--hosts", type=int, default=20, help="namespaces the peers are spread over")
    p.add_argument("--join-batch", type=int, default=10,
                   help="peers started at once; the next batch starts when these have joined")
    p.add_argument("--in-process", type=lambda t: _ints(t, "--in-process"), default=[],
                   help="also run the one-process loopback benchmark at these sizes")
    p.add_argument("--out", type=Path, default=Path("bench-discovery"))
    args = p.parse_args(argv)
    if args.join_batch < 1:
        p.error("--join-batch must be at least 1")
    try:
        delays = [float(d) for d in args.delays.split(",") if d.strip()]
        host_names(args.hosts)
    except ValueError as exc:
        p.error(str(exc))
    reason = why_unavailable()
    if reason is not None:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="shiza-discovery-") as tmp:
        print(f"work dir {tmp} (peer logs under it)", file=sys.stderr, flush=True)
        rows = run(args.sizes, delays, args.hosts, Path(tmp), say=lambda s: print(s, flush=True),
                   join_batch=args.join_batch)
    in_process = None
    if args.in_process:
        from benchmarks import measure

        print(f"one process on loopback, sizes {args.in_process}", flush=True)
        in_process = measure.dht(args.in_process)
    table = markdown(rows, in_process)
    print(table)
    (args.out / "results.json").write_text(json.dumps(
        {"model_layers": LAYERS, "hosts": args.hosts, "join_batch": args.join_batch, "sizes": args.sizes, "delays_ms": delays, "rows": rows,
         "growth": analyse(rows), "in_process": in_process, "wall_s": round(time.monotonic() - t0, 1)},
        indent=2))
    (args.out / "results.md").write_text(table + "\n")
    plotted = plot(rows, in_process, args.out / "discovery.png")
    print(f"wrote {args.out}/results.json, results.md" + (", discovery.png" if plotted else " (no matplotlib: no PNG)"),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
