"""On a GPU machine with vLLM's CUDA build in .venv-vllm (`make .venv-vllm/.installed VLLM=gpu`):
three vLLM spans 0:10, 10:20, 20:30 of SmolLM2 in bf16 on CUDA against transformers' spans on
the same device and dtype, and the engine comparison (benchmarks/engines.py) on CUDA. Run with
-s to see the figures. Where vLLM is not installed (the lent GPU machine reaches no registry) it
skips, saying so; tests/gpu/test_span_cuda.py covers the transformers side there.

Agreement is checked on the first ``AGREE`` greedy tokens, as in test_span_cuda.py: bf16 kernels
differ between the engines, and after a near-tie flips the continuations part."""

from __future__ import annotations

import json
import subprocess

import pytest

torch = pytest.importorskip("torch")

from tests.vllm_marks import VLLM_PYTHON  # noqa: E402

AGREE = 8


def _vllm_on_cuda() -> bool:
    if not VLLM_PYTHON.exists():
        return False
    probe = subprocess.run([str(VLLM_PYTHON), "-c", "import torch, vllm; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=300)
    return probe.stdout.strip().endswith("True")


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


@pytest.fixture(scope="module")
def vllm_cuda():
    if not _vllm_on_cuda():
        pytest.skip(f"no CUDA build of vLLM at {VLLM_PYTHON}: `make .venv-vllm/.installed VLLM=gpu` "
                    "(this machine may reach no registry)")


def test_vllm_spans_on_cuda_agree_with_transformers(vllm_cuda):
    from node.engine.registry import resolve_model
    from node.engine.span import SpanEngine
    from node.engine.vllm.span import VllmSpanEngine

    source = resolve_model("smollm2-135m")
    spans = ((0, 10), (10, 20), (20, 30))
    vllm = [VllmSpanEngine.load(source, a, b, vllm_python=str(VLLM_PYTHON), device="cuda",
                                dtype="bfloat16", max_model_len=256) for a, b in spans]
    hf = [SpanEngine.load(source, a, b, device="cuda", dtype="bfloat16") for a, b in spans]
    ids = [1, 504, 3458, 282, 4649, 314, 5140]
    try:
        outs = []
        for route in (vllm, hf):
            for e in route:
                e.open_session("g", 1, 64)
            x, pos, toks = torch.tensor([ids]), torch.arange(len(ids))[None], []
            for _ in range(12):
                h = x
                for e in route:
                    h = e.step("g", h, pos)
                toks.append(int(h[0]))
                x, pos = torch.tensor([[toks[-1]]]), pos[:, -1:] + 1
            for e in route:
                e.close_session("g")
            outs.append(toks)
        print(f"vLLM {outs[0]}\ntransformers {outs[1]}")
        assert outs[0][:AGREE] == outs[1][:AGREE]
    finally:
        for e in vllm:
            e.close()


def test_engine_comparison_on_cuda(vllm_cuda, tmp_path):
    from benchmarks.engines import main

    assert main(["--model", "smollm2-135m", "--span", "10:20", "--batches", "1,16", "--steps", "32",
                 "--repeats", "2", "--device", "cuda", "--dtype", "bfloat16",
                 "--vllm-python", str(VLLM_PYTHON), "--out", str(tmp_path)]) == 0
    r = json.loads((tmp_path / "results.json").read_text())
    print(json.dumps({k: r[k] for k in ("tok_s", "ipc_us", "agreement")}, indent=1))
    assert r["tok_s"]["vllm"]["1"] > 0
