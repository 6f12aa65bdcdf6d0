"""Models named by their Hugging Face repo id (``org/name`` or ``org/name@revision``).

A repo id is resolved through the huggingface_hub cache (``HF_HOME``, ``HF_HUB_CACHE``; both read
when called, not at import): what is cached is used without the network, and with
``HF_HUB_OFFLINE=1`` nothing else is tried. Online, only what a node needs is fetched: the
config, tokenizer and index files, and of the safetensors shards only those holding the layers
asked for (all of them when no layers are given). The checkpoint's content-derived model id
(node/models/weights.py) stays its identity on the wire; the repo id only finds the files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from node.models.errors import ModelError

__all__ = ["HUB_ID", "hub_cache_dir", "is_hub_id", "hub_snapshot"]

# org/name, optionally @revision (a branch, tag or commit); what the hub accepts as repo ids.
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95})(?:@(?P<rev>[\w./-]{1,128}))?$")
# Everything of a checkpoint but its weights.
_META = ["config.json", "generation_config.json", "*.safetensors.index.json", "tokenizer*", "special_tokens_map.json",
         "*.jinja", "chat_template.json", "vocab.*", "merges.txt", "*.model"]


def is_hub_id(spec: str) -> bool:
    return HUB_ID.match(spec) is not None and not Path(spec).expanduser().exists()


def hub_cache_dir() -> Path:
    """The hub cache as huggingface_hub would use it, from the environment now."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    return Path(home) / "hub"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_snapshot(spec: str, layers: tuple[int, int] | None = None) -> Path:
    """The local snapshot directory of the repo id ``spec``; ModelError when it cannot be had."""
    match = HUB_ID.match(spec)
    if match is None:
        raise ModelError(f"{spec!r} is not a Hugging Face repo id (org/name[@revision])")
    repo, revision = match["repo"], match["rev"]
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - a declared dependency
        raise ModelError("models by repo id need huggingface_hub (pip install huggingface-hub)") from None
    cache = hub_cache_dir()
    try:  # the cache first: a node restarting offline finds what it fetched before
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError:
        if _offline():
            raise ModelError(
                f"model {spec!r} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: "
                f"fetch it where the hub is reachable (`huggingface-cli download {repo}`) and copy the "
                "cache here, or pass a local checkpoint directory") from None
    try:
        meta = Path(snapshot_download(repo, revision=revision, cache_dir=cache, allow_patterns=_META))
        shards = _shards_for(meta, layers)
        return Path(snapshot_download(repo, revision=revision, cache_dir=cache,
                                      allow_patterns=_META + shards))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise ModelError(
            f"model {spec!r} is neither in the Hugging Face cache {cache} nor reachable on the hub "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:300]}); check the repo id and the "
            "network, or pass a local checkpoint directory") from None


def _shards_for(snapshot: Path, layers: tuple[int, int] | None) -> list[str]:
    """The safetensors files to fetch: with an index, those holding ``layers`` plus the
    embeddings on the first span (and the last, when the head is tied to them) and the final
    norm and head on the last; without one (or without layers), every safetensors file."""
    indexes = sorted(snapshot.glob("*.safetensors.index.json"))
    if layers is None or not indexes:
        return ["*.safetensors"]
    config = json.loads((snapshot / "config.json").read_text())
    weight_map = json.loads(indexes[0].read_text()).get("weight_map", {})
    start, end = layers
    last = end >= int(config.get("num_hidden_layers", end))
    tied = bool(config.get("tie_word_embeddings", False))
    wanted = set()
    for tensor, shard in weight_map.items():
        m = re.search(r"\.layers\.(\d+)\.", tensor)
        if m is not None:
            keep = start <= int(m.group(1)) < end
        elif "embed_tokens" in tensor:
            keep = start == 0 or (last and tied)
        else:  # the final norm, the head, anything else outside the layers
            keep = last
        if keep:
            wanted.add(shard)
    return sorted(wanted) or ["*.safetensors"]
