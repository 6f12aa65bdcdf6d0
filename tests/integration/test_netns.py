"""Hosts as network namespaces, with latency dialled in (node/devtools/netns.py, latency.py).

Root only: skipped with the reason otherwise. Every namespace, link and process made here is
removed when the test ends, failed or not (the Network context manager; checked below).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from node.devtools.localswarm import stop_all
from node.devtools.netns import Link, Network, leftovers, start_node, tcp_round_trips, why_unavailable
from node.engine.reference import reference_greedy
from node.engine.registry import resolve_model

REASON = why_unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"netns harness unavailable: {REASON}")


def rtt_ms(net: Network, a: str, b: str, n: int = 20) -> float:
    """The shortest of n round trips, as ping's min or BBR's min_rtt: what the path itself costs.
    Waiting for a busy CPU at either end only ever adds to a round trip (the suite's other
    processes share this machine's two cores), while a wrong delay in the injector moves every
    one of them, the shortest included."""
    return min(tcp_round_trips(net, a, b, n=n)) * 1000


@pytest.mark.parametrize("delay_ms", [10.0, 25.0, 50.0])
def test_tcp_round_trip_is_twice_the_one_way_delay(delay_ms: float) -> None:
    # The acceptance check of the injector: a plain TCP round trip measures 2D within 10%.
    with Network(["h1", "h2"], delay_ms=delay_ms) as net:
        trips = [t * 1000 for t in tcp_round_trips(net, "h1", "h2", n=20)]
    rtt = min(trips)
    assert abs(rtt - 2 * delay_ms) <= 0.1 * 2 * delay_ms, (
        f"round trip {rtt:.2f} ms at best, {statistics.median(trips):.2f} ms median, at {delay_ms} ms one way")


def test_per_link_delays_lay_out_peers_and_a_distant_client() -> None:
    # "three peers 25 ms apart, client 40 ms away"
    links = [Link("c", p, 40.0) for p in ("p1", "p2", "p3")]
    with Network(["p1", "p2", "p3", "c"], delay_ms=25.0, links=links) as net:
        between_peers = rtt_ms(net, "p1", "p3", n=10)
        to_client = rtt_ms(net, "c", "p2", n=10)
    assert abs(between_peers - 50.0) <= 5.0, between_peers
    assert abs(to_client - 80.0) <= 8.0, to_client


def test_rate_limit_paces_a_bulk_transfer() -> None:
    # 1 MB echoed at 20 Mbit/s each way: at least 0.4 s per direction, pipelined
    with Network(["h1", "h2"], delay_ms=1.0, rate_mbit=20.0) as net:
        [seconds] = tcp_round_trips(net, "h1", "h2", n=1, size=1_000_000)
    assert 0.4 <= seconds <= 3.0, seconds


def test_everything_is_removed_even_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with Network(["h1", "h2"], nat="h2") as net:
            assert len(leftovers(net.pid, net.tag)) >= 4  # three namespaces, their outer links
            raise RuntimeError("boom")
    assert leftovers(os.getpid()) == []


def test_two_networks_of_one_process_are_separate() -> None:
    with Network(["a", "b"], delay_ms=10.0) as one:
        with Network(["a", "b"]) as two:
            assert one.ns("a") != two.ns("a")
        assert leftovers(two.pid, two.tag) == []
        assert 15.0 <= rtt_ms(one, "a", "b", n=5) <= 60.0  # the first one still runs, with its delay


def test_nat_lets_connections_out_and_none_in() -> None:
    with Network(["pub", "home"], delay_ms=5.0, nat="home") as net:
        out = rtt_ms(net, "home", "pub", n=5)
        assert 9.0 <= out <= 12.0, out  # 5 ms each way, through the router
        with pytest.raises(Exception):  # noqa: B017, PT011 - nothing answers: refused or unreachable
            tcp_round_trips(net, "pub", "home", n=1, timeout_s=3)


def test_generation_through_nodes_in_different_namespaces_equals_reference(tiny_model: Path, tmp_path: Path) -> None:
    spans = [(0, 2), (2, 4), (4, 6)]
    source = resolve_model(str(tiny_model))
    with Network(["n1", "n2", "n3", "c"], delay_ms=5.0, log_dir=tmp_path) as net:
        nodes = []
        try:
            first = start_node(net, "n1", tmp_path / "n1", model=str(tiny_model), layers=spans[0])
            nodes.append(first)
            info = first.wait_ready(120)
            # listening on 0.0.0.0, the node advertises its namespace's address, nothing else
            assert [a.split("/")[2] for a in info["addrs"]] == [net.ip("n1")], info["addrs"]
            for host, span in zip(("n2", "n3"), spans[1:]):
                nodes.append(start_node(net, host, tmp_path / host, model=str(tiny_model), layers=span,
                                        bootstrap=[first.addr]))
            for n in nodes[1:]:
                n.wait_ready(120)
            done = net.run("c", [sys.executable, "-m", "node", "generate", "--model", str(tiny_model), "--raw",
                                 "--json", "--max-new-tokens", "8", "--wait", "60",
                                 "--data-dir", str(tmp_path / "client"),
                                 "--bootstrap", nodes[2].addr, "The capital of France is"],
                           check=False, timeout=240)
            assert done.returncode == 0, done.stderr[-3000:]
            out = json.loads(done.stdout.strip().splitlines()[-1])
            assert out["token_ids"] == reference_greedy(source, out["prompt_token_ids"], 8)
            assert [(r["start"], r["end"]) for r in out["route"]] == spans
            assert {r["peer"] for r in out["route"]} == {n.peer_id for n in nodes}
        finally:
            stop_all(nodes)
    assert leftovers(os.getpid()) == []


def test_generation_through_a_node_behind_a_nat_served_over_a_relay(tiny_model: Path, tmp_path: Path) -> None:
    # n1 relays (--relay-service); "home" sits behind a NAT (no inbound), reserves a slot on n1
    # and advertises <n1>/p2p-circuit; the client in c reaches it only through the relay.
    spans = [(0, 2), (2, 4), (4, 6)]
    source = resolve_model(str(tiny_model))
    with Network(["n1", "n2", "home", "c"], delay_ms=5.0, nat="home", log_dir=tmp_path) as net:
        nodes = []
        try:
            relay = start_node(net, "n1", tmp_path / "n1", model=str(tiny_model), layers=spans[0],
                               extra_args=["--relay-service"])
            nodes.append(relay)
            relay.wait_ready(120)
            nodes.append(start_node(net, "n2", tmp_path / "n2", model=str(tiny_model), layers=spans[1],
                                    bootstrap=[relay.addr]))
            home = start_node(net, "home", tmp_path / "home", model=str(tiny_model), layers=spans[2],
                              bootstrap=[relay.addr], extra_args=["--relay", relay.addr])
            nodes.append(home)
            for n in nodes[1:]:
                n.wait_ready(120)
            # only the relayed address: its private one cannot be dialed from outside the NAT
            assert home.info["addrs"] == [f"{relay.addr}/p2p-circuit/p2p/{home.peer_id}"], home.info["addrs"]
            done = net.run("c", [sys.executable, "-m", "node", "-v", "generate", "--model", str(tiny_model), "--raw",
                                 "--json", "--max-new-tokens", "8", "--wait", "60",
                                 "--data-dir", str(tmp_path / "client"),
                                 "--bootstrap", nodes[1].addr, "The capital of France is"],
                           check=False, timeout=240)
            assert done.returncode == 0, done.stderr[-3000:]
            out = json.loads(done.stdout.strip().splitlines()[-1])
            assert out["token_ids"] == reference_greedy(source, out["prompt_token_ids"], 8)
            assert [r["peer"] for r in out["route"]] == [n.peer_id for n in nodes]
        finally:
            stop_all(nodes)
    assert leftovers(os.getpid()) == []


def test_cleanup_command_removes_only_its_own_run(tmp_path: Path) -> None:
    # A run that was killed leaves its namespaces; the cleanup command removes them by pid.
    code = ("import os, sys; from node.devtools.netns import Network; n = Network(['a']); n.__enter__(); "
            "print(n.pid, flush=True); os._exit(0)")
    with Network(["keep"]) as mine:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        pid = int(done.stdout.split()[0])
        try:
            assert leftovers(pid), done.stderr
            out = subprocess.run([sys.executable, "-m", "node.devtools.netns", "cleanup", "--pid", str(pid)],
                                 capture_output=True, text=True, timeout=60)
            assert out.returncode == 0 and "removed" in out.stdout
            assert leftovers(pid) == []
            assert len(leftovers(mine.pid, mine.tag)) == 2  # the other run's namespace and link are untouched
        finally:
            subprocess.run([sys.executable, "-m", "node.devtools.netns", "cleanup", "--pid", str(pid)],
                           capture_output=True, timeout=60)
