"""benchmarks/wan/discovery: spans, growth against log N, and one small run across namespaces."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from benchmarks.wan.discovery import analyse, growth, host_names, log_fit, markdown, spans_for
from node.devtools.netns import why_unavailable


@pytest.mark.parametrize("n", [1, 3, 10, 32, 33, 100])
def test_spans_serve_every_layer_and_each_peer_some(n: int) -> None:
    spans = spans_for(n, 32)
    assert len(spans) == n
    assert all(0 <= a < b <= 32 for a, b in spans)
    assert set().union(*(range(a, b) for a, b in spans)) == set(range(32))
    if n > 32:  # every layer has replicas, as evenly as the count allows
        per_layer = [sum(a <= layer < b for a, b in spans) for layer in range(32)]
        assert max(per_layer) - min(per_layer) <= 1


def test_spans_and_hosts_refuse_what_cannot_be_built() -> None:
    with pytest.raises(ValueError):
        spans_for(0)
    with pytest.raises(ValueError):
        host_names(98)  # 97 peer namespaces plus the two clients' is the harness's limit
    assert host_names(3) == ["p1", "p2", "p3"]


def test_growth_compares_a_time_with_log_n_and_n() -> None:
    g = growth([10, 30, 100], [1.0, 1.5, 2.0])
    assert g == {"from_n": 10, "to_n": 100, "time_ratio": 2.0, "log_n_ratio": 2.0, "n_ratio": 10.0}
    assert growth([10], [1.0]) is None
    assert growth([10, 100], [None, 2.0]) is None  # fewer than two measured sizes


def test_log_fit_recovers_a_log_n_law() -> None:
    ns = [10, 30, 100]
    a, b = log_fit(ns, [0.2 + 0.05 * math.log2(n) for n in ns])
    assert a == pytest.approx(0.2) and b == pytest.approx(0.05)
    assert log_fit([10, 10], [1.0, 2.0]) is None


def test_markdown_and_analysis_have_a_row_per_size_and_delay() -> None:
    rows = [{"n": n, "delay_ms": d, "full_coverage_s": 0.1 * n, "all_records_s": 0.2 * n, "fetch_all_s": 0.3,
             "find_node_s": 0.05 * math.log2(n), "find_node_requests": 12, "get_record_s": 0.1,
             "cold_start_to_coverage_s": None, "publish_s_max": 2.0, "publish_cpu_busy": 0.5}
            for d in (0.0, 25.0) for n in (10, 100)]
    md = markdown(rows, {"4": {"publish_to_coverage_s": 0.6, "lookup_s": 0.1}})
    assert md.count("\n| 25 ms |") == 2 and "| 0 ms | 100 | 2 (50%) | 10.0 |" in md
    assert "one process" in md and "| 4 | 0.6 | 0.1 |" in md
    g = analyse(rows)
    assert g["25"]["find_node_s"]["time_ratio"] == pytest.approx(2.0)
    assert g["0"]["cold_start_to_coverage_s"] is None


@pytest.mark.slow
@pytest.mark.skipif(why_unavailable() is not None, reason=f"netns harness unavailable: {why_unavailable()}")
def test_discovery_benchmark_finds_every_record_across_namespaces(tmp_path) -> None:
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "benchmarks.wan.discovery", "--sizes", "5", "--delays", "5",
                           "--hosts", "2", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    (row,) = res["rows"]
    assert row["n"] == 5 and row["delay_ms"] == 5.0
    assert row["full_coverage_s"] is not None and row["all_records_s"] is not None  # every record found
    assert row["records_seen"] == 5
    assert row["cold_full_coverage_s"] is not None  # a cold client, another namespace, finds them too
    assert row["get_record_found"] and row["find_node_requests"] > 0
    assert row["publish_cpu_s"] > 0 and row["publish_requests_median"]["put_value"] >= 1
    assert all(lk["fetch_all_records"] == 5 for lk in row["lookups"])
    assert (out / "results.md").read_text().count("| 5 ms | 5 |") == 1
