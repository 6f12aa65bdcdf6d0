"""`shiza bench` in its smallest mode: the files exist and every figure has its ratio."""

from __future__ import annotations

import json
import math
import subprocess
import sys


def test_bench_smoke_writes_results_with_ratios(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "node", "bench", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "results.md", "throughput.png", "hops.png"):
        assert (out / name).stat().st_size > 0, name
    r = json.loads((out / "results.json").read_text())
    p3 = r["pipeline"]["3"]
    assert p3["pipeline3_vs_monolithic_ratio"] > 0
    assert p3["direct_fallbacks"] == 0  # the sessions really ran on direct channels
    for key in ("client_step_s", "node_compute_per_token_s", "single_tok_s_libp2p",
                "direct_vs_libp2p_single_session_ratio"):
        assert _positive(p3[key]), key
    for key in ("per_hop_overhead_s", "per_hop_split_cost_s", "per_hop_overhead_vs_tcp_rtt_ratio",
                "per_hop_overhead_vs_direct_rtt_ratio", "per_hop_overhead_vs_libp2p_rtt_ratio",
                "per_hop_split_cost_vs_tcp_rtt_ratio"):
        assert _number(p3[key]), key  # a difference: on a noisy machine it may come out negative
    assert "monolithic_b8_vs_b1_ratio" in r["monolithic"]
    rt = r["round_trip"]
    for key in ("tcp_rtt_s", "direct_rtt_s", "libp2p_rtt_s", "libp2p_vs_tcp_rtt_ratio",
                "direct_vs_tcp_rtt_ratio", "libp2p_vs_direct_rtt_ratio"):
        assert _positive(rt[key]), key
    assert all("encode_vs_memcpy_ratio" in c for c in r["codec"].values())
    assert "commit_vs_sign_ratio" in r["receipts"]
    assert any("ratio" in k for k in r["dht"]["4"])


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v: object) -> bool:
    return _number(v) and v > 0  # type: ignore[operator]
