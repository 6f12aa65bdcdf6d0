"""The Makefile's install steps (issue 21): torch never becomes a multi-GB CUDA build unless
asked, and `make demo` installs nothing outside .venv (system tools only for `make test`)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def dry_run(*args: str) -> str:
    done = subprocess.run(["make", "-n", "-B", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_torch_is_the_local_wheel_else_the_cpu_build_unless_cuda_is_asked_for() -> None:
    cpu = dry_run(".venv/.installed")
    assert "pip install -q --no-index --no-deps torch==2.13.0" in cpu  # a wheel on this machine first
    # else the CPU build: +cpu exists only on PyTorch's CPU index, so PyPI's CUDA wheel cannot match
    assert "torch==2.13.0+cpu --index-url https://download.pytorch.org/whl/cpu" in cpu
    cuda = dry_run(".venv/.installed", "TORCH=cuda")
    assert "|| .venv/bin/pip install -q torch==2.13.0\n" in cuda and "+cpu" not in cuda


def test_make_demo_installs_nothing_system_wide() -> None:
    demo = dry_run("demo")
    assert "apt-get" not in demo and "shiza demo" in demo
    assert "apt-get install" in dry_run("test")  # the test target may (Chromium, nftables)
