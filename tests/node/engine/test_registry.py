"""Model resolution: content ids, their on-disk cache, and the one-off default-model conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node.engine import EngineError, ModelSource, resolve_model
from node.engine import registry


def test_import_does_not_pull_torch() -> None:
    code = ("import sys, node.engine, node.engine.registry, node.engine.errors; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])


def test_resolve_checkpoint_dir(tiny_llama: ModelSource) -> None:
    assert tiny_llama.num_layers == 6 and tiny_llama.hidden_size == 64
    assert tiny_llama.architecture == "LlamaForCausalLM"
    assert tiny_llama.config["model_type"] == "llama"
    name, _, digest = tiny_llama.model_id.rpartition("@")
    assert name == tiny_llama.name and len(digest) == 16


def test_model_id_is_content_derived(tiny_source_factory: Callable[..., ModelSource],
                                     tmp_path: Path) -> None:
    from node.engine.testing import make_tiny_model

    a = tiny_source_factory("llama", seed=0)
    b = tiny_source_factory("llama", seed=1)
    assert a.model_id.split("@")[1] != b.model_id.split("@")[1]
    # Same weights in another directory of the same name: same id.
    again = make_tiny_model(tmp_path / a.path.name, seed=0, arch="llama")
    assert resolve_model(str(again)).model_id == a.model_id


def test_model_id_cached_by_size_and_mtime(tiny_source_factory: Callable[..., ModelSource],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    source = tiny_source_factory("llama", seed=5)
    assert (source.path / registry._ID_CACHE).is_file()

    def boom(*_a: object) -> None:
        raise AssertionError("manifest recomputed although the weights did not change")

    monkeypatch.setattr(registry, "manifest", boom)
    assert resolve_model(str(source.path)).model_id == source.model_id
    monkeypatch.undo()
    weights = source.path / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    calls: list[int] = []
    real = registry.manifest
    monkeypatch.setattr(registry, "manifest", lambda p: calls.append(1) or real(p))
    assert resolve_model(str(source.path)).model_id == source.model_id
    assert calls == [1]


def test_manifest_entries(tiny_llama: ModelSource) -> None:
    entries = registry.manifest(tiny_llama.path)
    names = [e[0] for e in entries]
    assert names == sorted(names) and "model.embed_tokens.weight" in names
    emb = dict((e[0], e) for e in entries)["model.embed_tokens.weight"]
    assert emb[1] == (tiny_llama.config["vocab_size"], 64) and emb[2] == "float32"
    assert len(emb[3]) == 64


def test_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="smollm2-135m"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(EngineError, match="config.json"):
        resolve_model(str(tmp_path))


def test_tokenizer_loads(tiny_llama: ModelSource) -> None:
    pytest.importorskip("transformers")
    from node.engine import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    ids = tok("What is the capital of France?")["input_ids"]
    assert ids and max(ids) < tiny_llama.config["vocab_size"]


# --- conversion of the default model: locking and atomicity, with a fake converter ----------

def _fake_converter(calls: list[float], delay: float = 0.3, fail: BaseException | None = None):
    def convert(gguf: Path, out: Path, progress: bool) -> None:
        calls.append(time.monotonic())
        (out / "config.json").write_text(json.dumps({"num_hidden_layers": 1, "hidden_size": 8}))
        time.sleep(delay)
        if fail is not None:
            raise fail
        (out / "model.safetensors").write_bytes(b"x")

    return convert


@pytest.fixture
def fake_gguf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(registry, "smollm2_gguf", lambda: tmp_path / "fake.gguf")


def test_concurrent_conversion_runs_once(fake_gguf, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(registry, "_convert_gguf", _fake_converter(calls))
    root = tmp_path / "cache"
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(registry.ensure_smollm2(root)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [root / "smollm2-135m"] * 3
    assert (root / "smollm2-135m" / registry._COMPLETE).is_file()
    assert not list(root.glob(".smollm2-135m.tmp-*"))
    registry.ensure_smollm2(root)  # fast path: no conversion
    assert len(calls) == 1


def test_interrupted_conversion_leaves_nothing_trusted(fake_gguf, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    calls: list[float] = []
    monkeypatch.setattr(registry, "_convert_gguf",
                        _fake_converter(calls, delay=0, fail=KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        registry.ensure_smollm2(root)
    assert not (root / "smollm2-135m").exists()
    assert not list(root.glob(".smollm2-135m.tmp-*"))
    # A leftover from a killed process (no cleanup ran) is removed by the next conversion.
    (root / ".smollm2-135m.tmp-killed").mkdir()
    monkeypatch.setattr(registry, "_convert_gguf", _fake_converter(calls, delay=0))
    path = registry.ensure_smollm2(root)
    assert (path / "model.safetensors").is_file()
    assert not list(root.glob(".smollm2-135m.tmp-*"))


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SHIZA_CACHE", str(tmp_path))
    assert registry.default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SHIZA_CACHE")
    assert registry.default_cache_dir() == Path.home() / ".cache" / "shiza" / "models"
