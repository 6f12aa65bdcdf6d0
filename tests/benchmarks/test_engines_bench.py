"""benchmarks/engines.py runs end to end (a real vLLM worker from .venv-vllm on a span of
SmolLM2) and reports both engines, each batch size and the channel's cost."""

from __future__ import annotations

import json

from tests.vllm_marks import VLLM_MARKS, VLLM_PYTHON

from benchmarks.engines import main

pytestmark = VLLM_MARKS


def test_engines_benchmark_writes_its_results(tmp_path):
    assert main(["--model", "smollm2-135m", "--span", "10:12", "--batches", "1,2", "--steps", "2",
                 "--repeats", "1", "--vllm-python", str(VLLM_PYTHON), "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    assert set(r["tok_s"]) == {"transformers", "vllm"}
    assert all(r["tok_s"][e][b] > 0 for e in r["tok_s"] for b in ("1", "2"))
    assert r["ipc_us"]["1"] > 0 and r["vllm_version"] in ("0.32.0", "0.33.0")
    assert (tmp_path / "engines.png").stat().st_size > 0
    assert "| 2 |" in (tmp_path / "results.md").read_text()
