"""The node's throughput self-measurement, cached per model, span and device.

(Hardware detection, which may ask torch about CUDA, is the engine's: node/engine/hardware.py.)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

from node.util.atomic import write_atomic

log = logging.getLogger(__name__)


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
