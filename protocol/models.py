"""Content-derived model ids: ``name@digest16``.

The digest binds the model configuration and the manifest of every weight tensor (name, shape,
dtype, sha256 of its bytes), so two nodes that announce the same id serve the same weights.
A model converted to another dtype (or dequantised another way) gets another id.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .codec import canonical_pack
from .errors import InvalidMessage, ShizaError

#: Config keys that name or describe a checkpoint without changing what it computes.
IGNORED_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "_commit_hash", "use_cache"}
)
DIGEST_HEX_LEN = 16
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,127}")
_DIGEST_RE = re.compile(r"[0-9a-f]{16}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")

ManifestEntry = tuple[str, tuple[int, ...], str, str]  # (tensor name, shape, dtype, sha256 hex)


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without IGNORED_CONFIG_KEYS and without keys starting with "_" (transformers'
    private bookkeeping), at every nesting level."""
    if not isinstance(config, dict):
        raise InvalidMessage("model config must be a dict")
    out: dict[str, Any] = {}
    for key, value in config.items():
        if not isinstance(key, str):
            raise InvalidMessage("model config keys must be strings")
        if key in IGNORED_CONFIG_KEYS or key.startswith("_"):
            continue
        out[key] = normalize_config(value) if isinstance(value, dict) else value
    return out


def _check_manifest(manifest: list[ManifestEntry]) -> list[list[Any]]:
    entries: list[list[Any]] = []
    for entry in manifest:
        if not isinstance(entry, (tuple, list)) or len(entry) != 4:
            raise InvalidMessage("manifest entries are (name, shape, dtype, sha256 hex)")
        name, shape, dtype, digest = entry
        if not isinstance(name, str) or not name:
            raise InvalidMessage("manifest tensor name must be a non-empty string")
        if not isinstance(shape, (tuple, list)) or not all(type(d) is int and d >= 0 for d in shape):
            raise InvalidMessage(f"manifest shape of {name} must be non-negative integers")
        if not isinstance(dtype, str) or not dtype:
            raise InvalidMessage(f"manifest dtype of {name} must be a string")
        if not isinstance(digest, str) or not _SHA256_RE.fullmatch(digest):
            raise InvalidMessage(f"manifest digest of {name} must be 64 lowercase hex characters")
        entries.append([name, list(shape), dtype, digest])
    entries.sort(key=lambda e: e[0])
    for first, second in zip(entries, entries[1:]):
        if first[0] == second[0]:
            raise InvalidMessage(f"manifest names tensor {first[0]} twice")
    return entries


def model_digest(config: dict[str, Any], manifest: list[ManifestEntry]) -> str:
    """Full sha256 hex of canonical_pack({"config": normalized config, "manifest": entries})."""
    try:
        payload = canonical_pack({"config": normalize_config(config), "manifest": _check_manifest(manifest)})
    except ShizaError as exc:
        raise InvalidMessage(f"model config cannot be encoded canonically: {exc}") from None
    return hashlib.sha256(payload).hexdigest()


def model_id(name: str, config: dict[str, Any], manifest: list[ManifestEntry]) -> str:
    """``f"{name}@{digest[:16]}"``. The manifest may come in any order: it is sorted by name."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidMessage(f"model name {name!r} must match {_NAME_RE.pattern}")
    return f"{name}@{model_digest(config, manifest)[:DIGEST_HEX_LEN]}"


def parse_model_id(text: str) -> tuple[str, str]:
    """Split a model id into (name, 16-hex digest); InvalidMessage if it is not one."""
    if not isinstance(text, str):
        raise InvalidMessage("model id must be a string")
    name, sep, digest = text.rpartition("@")
    if not sep or not _NAME_RE.fullmatch(name) or not _DIGEST_RE.fullmatch(digest):
        raise InvalidMessage(f"{text[:200]!r} is not a model id (name@16 lowercase hex digits)")
    return name, digest
