"""Engines: serve layers [start, end) of a decoder-only model behind one interface.

    base.py          the interface the serving node uses (``Engine``, ``SupervisedEngine``,
                     ``StepInput``, ``Sampling``) and the checks every engine shares; no torch
    span.py          ``SpanEngine``: transformers, any span of layers, CPU or GPU
    vllm/            ``VllmEngine``: the whole model through a managed vLLM server
    torch_engine.py  the wire <-> torch edge and the step checks both engines share
    throughput.py    ``measure_throughput``: one way for every engine
    faults.py        ``FaultyEngine``: noise and delay around any engine (tests only)
    hardware.py      what the node computes on (GPU via NVML or torch, else CPU and RAM)
    sessions.py, errors.py, tensors.py, registry.py, testing.py, reference.py

Importing this package does not import torch or transformers: ``SpanEngine`` and
``measure_throughput`` are loaded on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from node.engine.base import Engine, EngineHealth, Sampling, StepInput, SupervisedEngine
from node.engine.errors import BadInput, CapacityExceeded, EngineError, SessionUnknown
from node.engine.registry import DEFAULT_MODEL, ModelSource, default_cache_dir, load_tokenizer, resolve_model

if TYPE_CHECKING:
    from node.engine.span import SpanEngine
    from node.engine.throughput import measure_throughput

__all__ = [
    "DEFAULT_MODEL", "BadInput", "CapacityExceeded", "Engine", "EngineError", "EngineHealth",
    "ModelSource", "Sampling", "SessionUnknown", "SpanEngine", "StepInput", "SupervisedEngine",
    "default_cache_dir", "load_tokenizer", "measure_throughput", "resolve_model",
]

_LAZY = {"SpanEngine": "span", "measure_throughput": "throughput"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
