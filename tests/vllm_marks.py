"""What every test of a real vLLM (the CPU build in .venv-vllm) shares: its python, and marks
that skip, saying how to build it, when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"

VLLM_MARKS = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(),
                       reason=f"{VLLM_PYTHON} is missing: run `make .venv-vllm/.installed`"),
]
