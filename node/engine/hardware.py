"""What this node computes on: its GPUs (NVML, else torch) or the CPU and its RAM (within the
container's memory cgroup limit).

In the engine package because the CUDA fallback asks torch; torch is imported only for a
``cuda`` device without NVML.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuInfo:
    name: str
    memory_total: int  # bytes
    memory_free: int  # bytes
    compute_capability: str  # "8.0"
    bf16: bool  # compute capability 8.0 or newer


@dataclass(frozen=True)
class HardwareInfo:
    device_kind: str  # "cpu" or "cuda"
    device_name: str
    memory_total: int  # bytes: of the device the node computes on (a container's limit on CPU)
    memory_free: int  # bytes
    gpus: tuple[GpuInfo, ...] = ()  # every GPU this process sees, the one it computes on first


def _cpu_name(proc: Path = Path("/proc")) -> str:
    try:
        with open(proc / "cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _ram(proc: Path = Path("/proc")) -> tuple[int, int]:
    total = free = 0
    try:
        with open(proc / "meminfo", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int((fields.get("MemAvailable") or fields["MemFree"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        total = free = pages * os.sysconf("SC_PAGE_SIZE") if pages else 0
    return total, free


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_memory(proc: Path = Path("/proc"), root: Path = Path("/sys/fs/cgroup")) -> tuple[int, int] | None:
    """(limit, usage) in bytes of the tightest memory cgroup this process is in (v2 or v1),
    walking up to the mount's root; None where no limit is set (or cgroups are not readable)."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[int, int]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2: one unified hierarchy
            mount, limit_file, usage_file = root, "memory.max", "memory.current"
            if not (root / "cgroup.controllers").exists() and (root / "unified").is_dir():
                mount = root / "unified"  # v1 with v2 beside it ("hybrid")
        elif "memory" in controllers.split(","):
            mount, limit_file, usage_file = root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        rel = Path(path.lstrip("/"))
        for folder in [mount / rel, *[mount / p for p in rel.parents]]:  # the group, then its parents
            limit = _read_int(folder / limit_file)
            if limit is not None and limit < _UNLIMITED:
                usage = _read_int(folder / usage_file)
                found.append((limit, usage if usage is not None else 0))
    return min(found) if found else None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _nvml_gpus() -> tuple[GpuInfo, ...]:
    """Every GPU through NVIDIA's management library (nvidia-ml-py), when it and a driver are
    present; () otherwise."""
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py: the gpu extra
    except ImportError:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no usable GPU info"
        log.debug("NVML unavailable: %s", exc)
        return ()
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(name.decode() if isinstance(name, bytes) else str(name), int(mem.total),
                                int(mem.free), f"{major}.{minor}", major >= 8))
        return tuple(gpus)
    except Exception as exc:  # noqa: BLE001
        log.debug("NVML query failed: %s", exc)
        return ()
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # noqa: BLE001
            pass


def _torch_gpus() -> tuple[GpuInfo, ...]:
    try:
        import torch

        gpus = []
        for index in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(index)
            major, minor = torch.cuda.get_device_capability(index)
            gpus.append(GpuInfo(torch.cuda.get_device_name(index), int(total), int(free), f"{major}.{minor}",
                                major >= 8))
        return tuple(gpus)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read GPU memory: %s", exc)
        return ()


def _cuda_index(device: str) -> int:
    """The GPU a ``cuda`` or ``cuda:N`` device computes on."""
    _, _, index = device.partition(":")
    return int(index) if index.isdigit() else 0


def detect_hardware(device: str = "cpu", *, proc: Path = Path("/proc"),
                    cgroup_root: Path = Path("/sys/fs/cgroup")) -> HardwareInfo:
    """What this node runs on. For ``cuda[:N]``: every GPU (NVML, else torch), the memory of the
    one it computes on. Else the CPU and its RAM, bounded by the container's memory cgroup limit
    (a container with 8 GiB on a 256 GiB host has 8 GiB)."""
    if device.startswith("cuda"):
        gpus = _nvml_gpus() or _torch_gpus()
        index = _cuda_index(device)
        if 0 <= index < len(gpus):
            ordered = (gpus[index], *gpus[:index], *gpus[index + 1:])
            used = ordered[0]
            name = used.name if len(gpus) == 1 else f"{used.name} (1 of {len(gpus)} GPUs)"
            return HardwareInfo("cuda", name, used.memory_total, used.memory_free, ordered)
        log.warning("no GPU %d visible (%d found); reporting the CPU", index, len(gpus))
    total, free = _ram(proc)
    limit = cgroup_memory(proc, cgroup_root)
    if limit is not None:
        cap, used = limit
        total, free = min(total, cap), max(0, min(free, cap - used))
    return HardwareInfo("cpu", f"{_cpu_name(proc)} x{os.cpu_count() or 1}", total, free)
