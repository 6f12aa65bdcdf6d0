"""`shiza bench` in its smallest mode: the files exist and every figure has its ratio."""

from __future__ import annotations

import json
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
    assert r["pipeline"]["3"]["pipeline3_vs_monolithic_ratio"] > 0
    assert "per_hop_overhead_vs_tcp_rtt_ratio" in r["pipeline"]["3"]
    assert "monolithic_b8_vs_b1_ratio" in r["monolithic"]
    assert "libp2p_vs_tcp_rtt_ratio" in r["round_trip"]
    assert all("encode_vs_memcpy_ratio" in c for c in r["codec"].values())
    assert "commit_vs_sign_ratio" in r["receipts"]
    assert any("ratio" in k for k in r["dht"]["4"])
