"""What a model is, without torch: name resolution, the cache, content ids, the tokenizer.

    find_model(spec) -> ModelSource      a spec ("smollm2-135m" or a checkpoint dir) resolved by
                                         reading files only; never converts
    load_tokenizer(source) -> Tokenizer  tokenizer.json + chat template, as transformers applies
                                         them (tokenizers + jinja2, no transformers)
    source_from_dir, default_cache_dir, default_model_dir, is_prepared, safe_name
    manifest, read_safetensors_header, compute_model_id, cached_model_id   (node.models.weights)
    ModelError, ModelNotPrepared, ChatTemplateError

Importable by every role (engine, client, http, cli); imports protocol/ and node.util only, and
neither torch nor transformers. Converting the bundled GGUF needs torch, so it lives in the
engine (``node.engine.registry.resolve_model``, ``shiza model prepare``).
"""

from __future__ import annotations

from pathlib import Path

from node.models.chat_template import ChatTemplateError
from node.models.errors import ModelError, ModelNotPrepared
from node.models.source import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    ModelSource,
    default_cache_dir,
    default_model_dir,
    find_model,
    is_prepared,
    safe_name,
    source_from_dir,
)
from node.models.tokenizer import Tokenizer
from node.models.weights import cached_model_id, compute_model_id, manifest, read_safetensors_header

__all__ = [
    "COMPLETE_MARKER", "DEFAULT_MODEL", "ChatTemplateError", "ModelError", "ModelNotPrepared",
    "ModelSource", "Tokenizer", "cached_model_id", "compute_model_id", "default_cache_dir",
    "default_model_dir", "find_model", "is_prepared", "load_tokenizer", "manifest",
    "read_safetensors_header", "safe_name", "source_from_dir",
]


def load_tokenizer(source: ModelSource | Path) -> Tokenizer:
    """The tokenizer saved with a model (a ``ModelSource`` or a checkpoint directory)."""
    return Tokenizer.from_dir(source.path if isinstance(source, ModelSource) else Path(source))
