"""node.models resolves specs by reading files only: ids equal the engine's, the cache is read,
and an unprepared default model is one clear error."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from node.models import (
    COMPLETE_MARKER,
    DEFAULT_MODEL,
    ModelError,
    ModelNotPrepared,
    ModelSource,
    default_cache_dir,
    find_model,
    is_prepared,
    manifest,
    read_safetensors_header,
)
from node.models import weights
from node.models.weights import ID_CACHE


def test_checkpoint_dir_as_the_engine_resolves_it(tiny_llama: ModelSource) -> None:
    from node.engine.registry import resolve_model

    found = find_model(str(tiny_llama.path))
    assert found == resolve_model(str(tiny_llama.path)) == tiny_llama
    assert (found.num_layers, found.hidden_size, found.architecture) == (6, 64, "LlamaForCausalLM")
    assert found.config == tiny_llama.config


def test_prepared_default_model_is_read_from_the_cache(tiny_llama: ModelSource,
                                                       tmp_path: Path) -> None:
    cache = tmp_path / "models"
    assert not is_prepared(cache)
    with pytest.raises(ModelNotPrepared) as err:
        find_model(DEFAULT_MODEL, cache)
    message = str(err.value)
    assert "shiza model prepare" in message and ".[node]" in message
    assert str(cache / DEFAULT_MODEL) in message and "\n" not in message
    # A converted directory without the completion marker is an interrupted conversion.
    shutil.copytree(tiny_llama.path, cache / DEFAULT_MODEL)
    with pytest.raises(ModelNotPrepared):
        find_model(DEFAULT_MODEL, cache)
    (cache / DEFAULT_MODEL / COMPLETE_MARKER).write_text("{}")
    assert is_prepared(cache)
    found = find_model(DEFAULT_MODEL, cache)
    assert found.name == DEFAULT_MODEL and found.path == cache / DEFAULT_MODEL
    assert found.model_id.startswith(f"{DEFAULT_MODEL}@")
    # The digest is of the content alone: same weights under another name, same digest.
    assert found.model_id.split("@")[1] == tiny_llama.model_id.split("@")[1]


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=DEFAULT_MODEL):
        find_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="config.json"):
        find_model(str(tmp_path))
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 2, "hidden_size": 8}')
    with pytest.raises(ModelError, match="safetensors"):
        find_model(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"\x01")
    with pytest.raises(ModelError, match="not a safetensors file"):
        find_model(str(tmp_path))


def test_model_id_cached_by_size_and_mtime(tiny_source_factory: Callable[..., ModelSource],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = tiny_source_factory("llama", seed=5)
    assert (source.path / ID_CACHE).is_file()

    def boom(*_a: object) -> None:
        raise AssertionError("manifest recomputed although the weights did not change")

    monkeypatch.setattr(weights, "manifest", boom)
    assert find_model(str(source.path)).model_id == source.model_id
    monkeypatch.undo()
    st = (source.path / "model.safetensors").stat()
    os.utime(source.path / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    calls: list[int] = []
    real = weights.manifest
    monkeypatch.setattr(weights, "manifest", lambda p: calls.append(1) or real(p))
    assert find_model(str(source.path)).model_id == source.model_id
    assert calls == [1]


def test_model_id_is_content_derived(tiny_source_factory: Callable[..., ModelSource],
                                     tmp_path: Path) -> None:
    a = tiny_source_factory("llama", seed=0)
    b = tiny_source_factory("llama", seed=1)
    assert a.model_id.split("@")[1] != b.model_id.split("@")[1]
    # Same files in another directory of the same name: same id (the cache file is not copied).
    shutil.copytree(a.path, tmp_path / a.path.name, ignore=shutil.ignore_patterns(ID_CACHE))
    assert find_model(str(tmp_path / a.path.name)).model_id == a.model_id


def test_manifest_entries(tiny_llama: ModelSource) -> None:
    entries = manifest(tiny_llama.path)
    names = [e[0] for e in entries]
    assert names == sorted(names) and "model.embed_tokens.weight" in names
    emb = dict((e[0], e) for e in entries)["model.embed_tokens.weight"]
    assert emb[1] == (tiny_llama.config["vocab_size"], 64) and emb[2] == "float32"
    assert len(emb[3]) == 64
    offset, header = read_safetensors_header(tiny_llama.path / "model.safetensors")
    assert offset > 8 and set(header) == set(names)


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHIZA_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SHIZA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "shiza" / "models"
