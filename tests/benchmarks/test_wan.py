"""benchmarks/wan: the cost model, and one small run across namespaces (root only)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from benchmarks.wan.pipeline import client_driven_s_per_token, spans_of
from node.devtools.netns import why_unavailable


def test_client_driven_cost_model_counts_two_legs_per_hop() -> None:
    # the figure: 13.5 tok/s at 0 ms, 25 ms one way over 3 hops -> about 4.6 tok/s
    compute = 1 / 13.5
    assert client_driven_s_per_token(compute, 3, 0.0) == pytest.approx(compute)
    assert 1 / client_driven_s_per_token(compute, 3, 0.025) == pytest.approx(4.46, abs=0.05)


def test_spans_cover_the_model_in_order() -> None:
    assert spans_of(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert spans_of(6, 3) == [(0, 2), (2, 4), (4, 6)]


@pytest.mark.slow
@pytest.mark.skipif(why_unavailable() is not None, reason=f"netns harness unavailable: {why_unavailable()}")
def test_wan_benchmark_runs_and_reports_the_model_beside_the_measurement(tmp_path) -> None:
    out = tmp_path / "wan"
    done = subprocess.run([sys.executable, "-m", "benchmarks.wan", "--delays", "0,10", "--tokens", "8",
                           "--repeats", "1", "--out", str(out)], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert [p["delay_ms"] for p in r["points"]] == [0.0, 10.0]
    for p in r["points"]:
        assert p["tokens_per_s"] > 0 and p["predicted_tokens_per_s"] > 0 and p["measured_vs_predicted_ratio"] > 0
    assert "predicted tok/s" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.skipif(why_unavailable() is not None, reason=f"netns harness unavailable: {why_unavailable()}")
def test_relay_probe_reaches_a_node_behind_the_nat() -> None:
    # py-libp2p's circuit relay v2, across namespaces: the NATed end reserves, a far peer dials in.
    done = subprocess.run([sys.executable, "-m", "benchmarks.wan.relay_probe"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "reserved True" in done.stdout and "stream open + echo" in done.stdout
