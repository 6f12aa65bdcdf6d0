"""The span engine: serve layers [start, end) of a decoder-only model.

Importing this package does not import torch or transformers: ``SpanEngine`` and
``measure_throughput`` (which need torch) are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node.engine.errors import BadInput, CapacityExceeded, EngineError, SessionUnknown
from node.engine.registry import DEFAULT_MODEL, ModelSource, default_cache_dir, load_tokenizer, resolve_model

if TYPE_CHECKING:
    from node.engine.span import SpanEngine, measure_throughput

__all__ = [
    "DEFAULT_MODEL", "BadInput", "CapacityExceeded", "EngineError", "ModelSource",
    "SessionUnknown", "SpanEngine", "default_cache_dir", "load_tokenizer", "measure_throughput",
    "resolve_model",
]

_LAZY = {"SpanEngine": "span", "measure_throughput": "span"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
