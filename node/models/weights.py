"""The weight manifest of a safetensors checkpoint and the content-derived model id.

Only json, struct and hashlib: a safetensors file is an 8-byte little-endian header length, a
JSON header naming each tensor's dtype, shape and byte range, then the raw bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from pathlib import Path
from typing import Any

from protocol.models import model_id

from node.models.errors import ModelError
from node.util.atomic import write_atomic

ID_CACHE = ".shiza-model-id.json"
_ID_CACHE_VERSION = 1
_MAX_HEADER_BYTES = 100 * 1024 * 1024
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


def weight_files(path: Path) -> list[Path]:
    """The checkpoint's ``*.safetensors`` files, by name."""
    return sorted(p for p in Path(path).glob("*.safetensors") if p.is_file())


def read_safetensors_header(file: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header dict without ``__metadata__``)."""
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ModelError(f"{file}: not a safetensors file (shorter than its header length)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER_BYTES:
            raise ModelError(f"{file}: implausible safetensors header of {n} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ModelError(f"{file}: unreadable safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{file}: the safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    return 8 + n, header


def manifest(path: Path) -> list[ManifestEntry]:
    """(name, shape, dtype, sha256 of the raw little-endian bytes) of every tensor, by name."""
    entries: list[ManifestEntry] = []
    for file in weight_files(path):
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
                        raise ModelError(f"{file}: truncated tensor {tname}")
                    h.update(chunk)
                    left -= len(chunk)
                dtype = _ST_DTYPES.get(info["dtype"], info["dtype"].lower())
                entries.append((tname, tuple(int(d) for d in info["shape"]), dtype, h.hexdigest()))
    entries.sort(key=lambda e: e[0])
    names = [e[0] for e in entries]
    if len(set(names)) != len(names):
        raise ModelError(f"{path}: a tensor name appears in two safetensors files")
    return entries


def _id_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}


def compute_model_id(path: Path, name: str, config: dict[str, Any]) -> str:
    """``name@digest`` of the config (less writer-specific keys) and the weight manifest."""
    return model_id(name, _id_config(config), manifest(path))


def cached_model_id(path: Path, name: str, config: dict[str, Any]) -> str:
    """``compute_model_id`` memoised in a file next to the weights, keyed by their size+mtime."""
    key = {
        "version": _ID_CACHE_VERSION,
        "name": name,
        "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weight_files(path)],
        "config_sha256": hashlib.sha256(
            json.dumps(_id_config(config), sort_keys=True).encode()).hexdigest(),
    }
    cache = Path(path) / ID_CACHE
    with contextlib.suppress(OSError, ValueError):
        stored = json.loads(cache.read_text())
        if stored.get("key") == key and isinstance(stored.get("model_id"), str):
            return str(stored["model_id"])
    mid = compute_model_id(path, name, config)
    with contextlib.suppress(OSError):  # a read-only checkpoint just recomputes next time
        write_atomic(cache, json.dumps({"key": key, "model_id": mid}).encode())
    return mid
