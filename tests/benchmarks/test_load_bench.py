"""``python -m benchmarks.load`` with a small burst: every request through the one gateway
completes and no node banned (or struck) the gateway. No timing is asserted: the figures are
the benchmark's to report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_a_burst_through_one_gateway_all_completes_and_nobody_is_banned(tmp_path):
    out = tmp_path / "load"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.load", "--n", "16", "--max-tokens", "8",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    r = json.loads((out / "results.json").read_text())
    assert (r["completed"], r["errors"], r["busy_503_with_retry_after"]) == (16, 0, 0), r["error_samples"]
    assert (r["bans_total"], r["strikes_total"]) == (0, 0)
    assert r["completion_tokens"] == 16 * 8 and r["aggregate_tok_s"] > 0
    assert (out / "load.png").stat().st_size > 0 and "completed" in (out / "results.md").read_text()
