"""benchmarks/constrained.py runs end to end on the tiny model and reports every mode."""

from __future__ import annotations

import json

from benchmarks.constrained import MODES, run


def test_constrained_benchmark_writes_its_results(tiny_llama, tmp_path):
    results = run(str(tiny_llama.path), tokens=12, repeats=1, out=tmp_path)
    assert set(results["modes"]) == set(MODES)
    assert all(r["ms_per_token"] > 0 and r["tokens"] > 0 for r in results["modes"].values())
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "constrained.png").stat().st_size > 0
    assert "| json_schema |" in (tmp_path / "results.md").read_text()
