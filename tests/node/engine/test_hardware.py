"""Hardware detection (issue 21): a container's memory limit, and every GPU, not only the first.

The cgroup trees are laid out here as the kernel shows them (v2, v1, and v1 with v2 beside it);
the GPUs come from a stand-in for nvidia-ml-py's ``pynvml`` module (no GPU on this machine; the
real library is exercised by tests/gpu/ on a lent GPU machine)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from node.engine.hardware import cgroup_memory, detect_hardware

GiB = 1 << 30
HOST_RAM = 256 * GiB


def fake_proc(tmp_path: Path, cgroup: str) -> Path:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "meminfo").write_text(f"MemTotal: {HOST_RAM // 1024} kB\nMemAvailable: {HOST_RAM // 2048} kB\n")
    (proc / "cpuinfo").write_text("model name\t: Test CPU\n")
    return proc


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_limit_bounds_the_memory_a_node_reports(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/docker/abc\n")
    root = tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory\n")
    write(root / "docker" / "abc" / "memory.max", f"{8 * GiB}\n")
    write(root / "docker" / "abc" / "memory.current", f"{3 * GiB}\n")
    write(root / "docker" / "memory.max", "max\n")
    assert cgroup_memory(proc, root) == (8 * GiB, 3 * GiB)
    hw = detect_hardware("cpu", proc=proc, cgroup_root=root)
    assert (hw.memory_total, hw.memory_free) == (8 * GiB, 5 * GiB)  # not the host's 256 GiB


def test_cgroup_v1_and_a_parent_limit(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4:memory:/kubepods/pod1/ctr\n1:cpu:/\n")
    root = tmp_path / "cgroup"
    write(root / "memory" / "kubepods" / "pod1" / "ctr" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(root / "memory" / "kubepods" / "pod1" / "memory.limit_in_bytes", f"{4 * GiB}\n")
    write(root / "memory" / "kubepods" / "pod1" / "memory.usage_in_bytes", f"{1 * GiB}\n")
    hw = detect_hardware("cpu", proc=proc, cgroup_root=root)
    assert (hw.memory_total, hw.memory_free) == (4 * GiB, 3 * GiB)


def test_no_limit_reports_the_host(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "4:memory:/\n0::/\n")
    root = tmp_path / "cgroup"
    write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    write(root / "unified" / "memory.max", "max\n")
    assert cgroup_memory(proc, root) is None
    hw = detect_hardware("cpu", proc=proc, cgroup_root=root)
    assert (hw.memory_total, hw.memory_free, hw.device_name.startswith("Test CPU")) == (HOST_RAM, HOST_RAM // 2, True)


@pytest.fixture
def two_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    gpus = [("NVIDIA A100-SXM4-80GB", 80 * GiB, 70 * GiB, (8, 0)), ("Tesla V100", 16 * GiB, 15 * GiB, (7, 0))]
    mem = types.SimpleNamespace
    fake = types.ModuleType("pynvml")
    fake.nvmlInit = lambda: None
    fake.nvmlShutdown = lambda: None
    fake.nvmlDeviceGetCount = lambda: len(gpus)
    fake.nvmlDeviceGetHandleByIndex = lambda i: i
    fake.nvmlDeviceGetName = lambda i: gpus[i][0].encode()
    fake.nvmlDeviceGetMemoryInfo = lambda i: mem(total=gpus[i][1], free=gpus[i][2])
    fake.nvmlDeviceGetCudaComputeCapability = lambda i: gpus[i][3]
    monkeypatch.setitem(sys.modules, "pynvml", fake)


def test_every_gpu_is_reported_the_used_one_first(two_gpus: None) -> None:
    hw = detect_hardware("cuda")
    assert hw.device_kind == "cuda" and hw.memory_total == 80 * GiB and hw.memory_free == 70 * GiB
    assert hw.device_name == "NVIDIA A100-SXM4-80GB (1 of 2 GPUs)"
    assert [(g.name, g.compute_capability, g.bf16) for g in hw.gpus] == [
        ("NVIDIA A100-SXM4-80GB", "8.0", True), ("Tesla V100", "7.0", False)]
    second = detect_hardware("cuda:1")
    assert second.memory_total == 16 * GiB and second.gpus[0].name == "Tesla V100" and len(second.gpus) == 2
