"""benchmarks/wan: the cost model, and one small run across namespaces (root only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.wan.concurrent import clients_for, summarize
from benchmarks.wan.pipeline import (Aggregate, Join, Point, aggregate_from, apply_models, apply_single_ratios,
                                     check_pushed, client_driven_s_per_token, legs, markdown, markdown_joins,
                                     markdown_sessions, node_to_node_s_per_token, plot_sessions, push_vs_client,
                                     session_counts, spans_of)
from node.devtools.netns import nat_unavailable, why_unavailable


def test_client_driven_cost_model_counts_two_legs_per_hop() -> None:
    # the figure: 13.5 tok/s at 0 ms, 25 ms one way over 3 hops -> about 4.6 tok/s
    compute = 1 / 13.5
    assert client_driven_s_per_token(compute, 3, 0.0) == pytest.approx(compute)
    assert 1 / client_driven_s_per_token(compute, 3, 0.025) == pytest.approx(4.46, abs=0.05)
    assert legs("client", 3) == 6


def test_node_to_node_cost_model_counts_hops_plus_one_legs() -> None:
    # SPEC 9.6: client -> hop 1 -> hop 2 -> hop 3 -> client, 4 legs a token instead of 6
    compute = 1 / 13.5
    assert node_to_node_s_per_token(compute, 3, 0.0) == pytest.approx(compute)
    assert node_to_node_s_per_token(compute, 3, 0.025) == pytest.approx(compute + 0.1)
    assert 1 / node_to_node_s_per_token(compute, 3, 0.025) == pytest.approx(5.74, abs=0.05)
    assert legs("push", 3) == 4
    # one hop: the same 2 legs either way
    assert node_to_node_s_per_token(compute, 1, 0.025) == pytest.approx(client_driven_s_per_token(compute, 1, 0.025))


def test_a_relayed_last_hop_adds_two_legs_in_both_modes() -> None:
    # the leg into the NATed last hop and the leg out of it each cross the relay
    assert legs("client", 3, relayed=True) == 8 and legs("push", 3, relayed=True) == 6
    compute = 0.1
    assert client_driven_s_per_token(compute, 3, 0.025, 2) == pytest.approx(0.1 + 8 * 0.025)
    assert node_to_node_s_per_token(compute, 3, 0.025, 2) == pytest.approx(0.1 + 6 * 0.025)
    pts = [Point("push", 0.0, 0.1, 10.0, 0.2, 100.0, 64), Point("push", 25.0, 50.0, 4.0, 0.5, 250.0, 64)]
    apply_models(pts, 3, relayed=True)
    assert pts[1].predicted_tokens_per_s == pytest.approx(1 / 0.25, abs=0.01)  # 0.1 + 6 x 0.025
    assert "t_compute + 6 x one-way delay" in markdown(pts, 3, relayed=True)


def test_joins_are_tabled_per_delay() -> None:
    table = markdown_joins([Join(0.0, 7.0, 11.0, 4.0, 0.2, 0.05, True), Join(25.0, 8.6, 15.1, 6.5, 1.0, 0.7, False)])
    assert "| 0 | 7.0 | 11.0 | 4.0 | 0.2 | 0.05 | yes |" in table
    assert "| 25 | 8.6 | 15.1 | 6.5 | 1.0 | 0.7 | NO |" in table


def test_models_take_t_compute_per_mode_and_report_the_ratio() -> None:
    pts = [Point("client", 0.0, 0.1, 10.0, 0.2, 100.0, 0), Point("push", 0.0, 0.1, 8.0, 0.2, 125.0, 64),
           Point("client", 25.0, 50.0, 4.0, 0.5, 250.0, 0), Point("push", 25.0, 50.0, 4.4, 0.4, 227.3, 64)]
    compute = apply_models(pts, 3)
    assert compute == {"client": pytest.approx(0.1), "push": pytest.approx(0.125)}
    assert pts[2].predicted_tokens_per_s == pytest.approx(1 / 0.25, abs=0.01)  # 0.1 + 6 x 0.025
    assert pts[3].predicted_tokens_per_s == pytest.approx(1 / 0.225, abs=0.01)  # 0.125 + 4 x 0.025
    assert pts[0].measured_vs_predicted_ratio == pytest.approx(1.0)
    assert push_vs_client(pts) == {0.0: 0.8, 25.0: 1.1}
    table = markdown(pts, 3)
    assert "push/client tok/s" in table and "| 25 |" in table and "predicted tok/s" in table


def test_pushed_steps_are_checked_per_mode() -> None:
    assert check_pushed("push", 64) is None and check_pushed("client", 0) is None
    assert "0 pushed" in check_pushed("push", 0)
    assert check_pushed("client", 3) is not None and check_pushed("push", None) is not None


def test_spans_cover_the_model_in_order() -> None:
    assert spans_of(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert spans_of(6, 3) == [(0, 2), (2, 4), (4, 6)]


def test_sessions_spread_over_clients_of_at_most_eight() -> None:
    assert [clients_for(n) for n in (1, 8, 9, 16, 17)] == [1, 1, 2, 2, 3]
    assert clients_for(16, per_client=4) == 4
    with pytest.raises(ValueError):
        clients_for(4, per_client=0)


def test_session_counts_put_the_baseline_first() -> None:
    assert session_counts("1,16") == [1, 16]
    assert session_counts("16,4,16") == [1, 16, 4]
    assert session_counts("1") == [1]
    with pytest.raises(ValueError):
        session_counts("0,4")


def test_aggregate_is_all_tokens_over_first_start_to_last_finish() -> None:
    runs = [{"start": 10.0, "end": 12.0, "tokens": 32, "tokens_per_s": 16.0, "ttft_s": 0.2, "pushed_steps": 90},
            {"start": 10.5, "end": 14.0, "tokens": 20, "tokens_per_s": 6.0, "ttft_s": 0.4, "pushed_steps": 60},
            {"start": 10.2, "end": 13.0, "tokens": 32, "tokens_per_s": 12.0, "ttft_s": 0.3, "pushed_steps": 90},
            {"start": 9.0, "end": 9.5, "error": "session 3: Busy"}]
    s = summarize(runs, clients=1)
    assert s["tokens_total"] == 84 and s["finished"] == 3 and s["sessions"] == 4
    assert s["wall_s"] == pytest.approx(5.0)  # the failed session opened the window at 9.0
    assert s["aggregate_tokens_per_s"] == pytest.approx(84 / 5.0, abs=0.01)
    assert s["median_session_tokens_per_s"] == 12.0 and s["median_ttft_s"] == 0.3
    assert s["errors"] == ["session 3: Busy"]
    assert s["session_start_s"] == [1.0, 1.5, 1.2] and s["session_end_s"] == [3.0, 5.0, 4.0]
    empty = summarize([{"start": 0.0, "end": 1.0, "error": "x"}], clients=1)
    assert empty["aggregate_tokens_per_s"] == 0.0 and empty["finished"] == 0


def test_aggregates_report_the_ratio_to_one_session_and_the_target(tmp_path) -> None:
    def summary(n: int, tok_s: float, pushed: int = 64, finished: int | None = None) -> dict:
        return {"sessions": n, "clients": clients_for(n), "finished": n if finished is None else finished,
                "tokens_total": 32 * n, "wall_s": 1.0, "aggregate_tokens_per_s": tok_s,
                "median_session_tokens_per_s": tok_s / n, "median_ttft_s": 0.3, "pushed_steps": [pushed] * n,
                "tokens_per_session": [32] * n, "session_tokens_per_s": [tok_s / n] * n,
                "session_end_s": [1.0] * n, "errors": []}
    aggs = [aggregate_from("push", 25.0, summary(1, 6.0)), aggregate_from("push", 25.0, summary(16, 66.0)),
            aggregate_from("client", 25.0, summary(1, 4.0, pushed=0)),
            aggregate_from("client", 25.0, summary(16, 20.0, pushed=0, finished=15))]
    apply_single_ratios(aggs)
    assert [a.ratio_vs_single for a in aggs] == [1.0, 11.0, 1.0, 5.0]
    assert aggs[1].session_tokens_per_s == [66.0 / 16] * 16 and aggs[1].session_end_s == [1.0] * 16
    assert aggs[1].warning is None and "1 of 16 sessions failed" in aggs[3].warning
    assert aggregate_from("push", 0.0, summary(2, 9.0, pushed=0)).warning.startswith("0 pushed")
    md = markdown_sessions(aggs)
    assert "| 25 | push | 16 | 2 | 16 | 512 | 1.0 | 66.0 | 4.125 | 0.3 | 11.0x | 64 |" in md
    assert "11.0x, met" in md and "(!)" in md
    aggs[1].aggregate_tokens_per_s = 30.0
    apply_single_ratios(aggs)
    assert "5.0x, NOT met" in markdown_sessions(aggs)
    assert "Target" not in markdown_sessions([Aggregate("push", 10.0, 16, ratio_vs_single=3.0)])
    pytest.importorskip("matplotlib")
    assert plot_sessions(aggs, tmp_path / "s.png", "t") and (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.skipif(why_unavailable() is not None, reason=f"netns harness unavailable: {why_unavailable()}")
def test_wan_benchmark_runs_and_reports_the_model_beside_the_measurement(tmp_path) -> None:
    out = tmp_path / "wan"
    done = subprocess.run([sys.executable, "-m", "benchmarks.wan", "--delays", "0,10", "--tokens", "8",
                           "--repeats", "1", "--sessions", "1,2", "--out", str(out)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert [(p["delay_ms"], p["mode"]) for p in r["points"]] == [(0.0, "client"), (0.0, "push"),
                                                                 (10.0, "client"), (10.0, "push")]
    for p in r["points"]:
        assert p["tokens_per_s"] > 0 and p["predicted_tokens_per_s"] > 0 and p["measured_vs_predicted_ratio"] > 0
        assert (p["pushed_steps"] > 0) if p["mode"] == "push" else (p["pushed_steps"] == 0)
    assert [q["delay_ms"] for q in r["push_vs_client_tokens_per_s"]] == [0.0, 10.0]
    assert all(q["ratio"] > 0 for q in r["push_vs_client_tokens_per_s"])
    md = (out / "results.md").read_text()
    assert "predicted tok/s" in md and "push/client tok/s" in md
    assert (out / "results.png").stat().st_size > 0
    # concurrent sessions: a 1-session baseline and 2 at once, per delay and mode
    assert [(a["delay_ms"], a["mode"], a["sessions"]) for a in r["sessions"]] == [
        (d, m, n) for d in (0.0, 10.0) for m in ("client", "push") for n in (1, 2)]
    for a in r["sessions"]:
        assert a["finished"] == a["sessions"] and a["aggregate_tokens_per_s"] > 0 and a["ratio_vs_single"] > 0
        assert a["tokens_total"] == 8 * a["sessions"]
    assert "aggregate tok/s" in md and (out / "sessions.png").stat().st_size > 0
    # a fresh node replaced the last span's at each delay and served the next generation
    assert [j["delay_ms"] for j in r["joins"]] == [0.0, 10.0]
    for j in r["joins"]:
        assert j["served_by_new_node"] and 0 < j["ready_s"] < j["first_served_s"] and j["coverage_s"] > 0
    assert "A node joining" in md
    assert all(p["coverage_s"] > 0 for p in r["points"])


@pytest.mark.slow
@pytest.mark.skipif(why_unavailable() is not None, reason=f"netns harness unavailable: {why_unavailable()}")
@pytest.mark.skipif(nat_unavailable() is not None, reason=f"no NAT: {nat_unavailable()}")
def test_wan_benchmark_through_a_relayed_last_node(tmp_path) -> None:
    out = tmp_path / "wan-relayed"
    done = subprocess.run([sys.executable, "-m", "benchmarks.wan", "--delays", "0", "--tokens", "6",
                           "--repeats", "1", "--sessions", "1", "--relayed", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert r["relayed"] is True and r["legs_per_token"] == {"client": 8, "push": 6}
    assert r["joins"] == []
    for p in r["points"]:  # every run's last hop was the NATed node (else a warning)
        assert p["tokens_per_s"] > 0 and p["warning"] is None, p
    assert "behind a NAT" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(why_unavailable() is not None, reason=f"netns harness unavailable: {why_unavailable()}")
def test_relay_probe_reaches_a_node_behind_the_nat() -> None:
    # py-libp2p's circuit relay v2, across namespaces: the NATed end reserves, a far peer dials in.
    done = subprocess.run([sys.executable, "-m", "benchmarks.wan.relay_probe"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "reserved True" in done.stdout and "stream open + echo" in done.stdout
