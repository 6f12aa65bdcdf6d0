"""What this node computes on: the GPU (NVML, else torch) or the CPU and its RAM.

In the engine package because the CUDA fallback asks torch; torch is imported only for a
``cuda`` device without NVML.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HardwareInfo:
    device_kind: str  # "cpu" or "cuda"
    device_name: str
    memory_total: int  # bytes
    memory_free: int  # bytes


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _ram() -> tuple[int, int]:
    total = free = 0
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        total = int(fields["MemTotal"].split()[0]) * 1024
        free = int(fields.get("MemAvailable", fields["MemFree"]).split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
        total = free = pages * os.sysconf("SC_PAGE_SIZE") if pages else 0
    return total, free


def _nvml(index: int = 0) -> HardwareInfo | None:
    """The GPU through NVIDIA's management library, when it and a driver are present."""
    try:
        import pynvml  # type: ignore[import-not-found]  # nvidia-ml-py, optional
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            if isinstance(name, bytes):
                name = name.decode()
            return HardwareInfo("cuda", str(name), int(mem.total), int(mem.free))
        finally:
            pynvml.nvmlShutdown()
    except Exception as exc:  # noqa: BLE001 - any NVML failure means "no usable GPU info"
        log.debug("NVML unavailable: %s", exc)
        return None


def detect_hardware(device: str = "cpu") -> HardwareInfo:
    """What this node runs on: the GPU for ``cuda`` (NVML, else torch), else the CPU and RAM."""
    if device.startswith("cuda"):
        info = _nvml()
        if info is not None:
            return info
        try:
            import torch

            free, total = torch.cuda.mem_get_info()
            return HardwareInfo("cuda", torch.cuda.get_device_name(), int(total), int(free))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not read GPU memory: %s", exc)
    total, free = _ram()
    return HardwareInfo("cpu", f"{_cpu_name()} x{os.cpu_count() or 1}", total, free)
