"""Hardware detection and the node's throughput self-measurement (cached per model, span, device)."""

from __future__ import annotations

import json
import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from node.util.atomic import write_atomic

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


def cached_throughput(
    cache_file: Path, key: dict[str, object], measure: Callable[[], float]
) -> float:
    """Tokens/s for ``key`` from the cache file, measuring (and saving atomically) on a miss."""
    name = json.dumps(key, sort_keys=True)
    cache: dict[str, float] = {}
    try:
        loaded = json.loads(cache_file.read_text())
        if isinstance(loaded, dict):
            cache = {k: float(v) for k, v in loaded.items() if isinstance(v, (int, float))}
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable throughput cache %s: %s", cache_file, exc)
    if name in cache and cache[name] > 0:
        return cache[name]
    value = float(measure())
    cache[name] = value
    write_atomic(cache_file, json.dumps(cache, indent=1, sort_keys=True).encode())
    return value
