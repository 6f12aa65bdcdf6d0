"""Models by Hugging Face repo id, from a hub cache laid out here (issue 21). Nothing can be
downloaded on this machine, so every test runs offline against a cache built from the tiny
checkpoint exactly as huggingface_hub lays one out (refs/<branch> -> snapshots/<commit>)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.models import ModelError, find_model
from node.models.hub import _shards_for, is_hub_id

COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHIZA = str(Path(sys.executable).with_name("shiza"))


def hub_cache(root: Path, repo: str, checkpoint: Path) -> Path:
    """A huggingface_hub cache under ``root`` holding ``checkpoint`` as ``repo`` at main."""
    folder = root / "hub" / ("models--" + repo.replace("/", "--"))
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    shutil.copytree(checkpoint, snapshot)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_llama) -> Path:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache(tmp_path / "hf", "test-org/tiny-llama", tiny_llama.path)


def test_a_cached_repo_id_resolves_to_its_snapshot(offline_hub: Path, tiny_llama) -> None:
    for spec in ("test-org/tiny-llama", "test-org/tiny-llama@main", f"test-org/tiny-llama@{COMMIT}"):
        source = find_model(spec)
        assert source.path == offline_hub and source.name == "tiny-llama"
        # The identity on the wire is the content: the same weights as the directory.
        assert source.model_id.split("@")[1] == tiny_llama.model_id.split("@")[1]
        assert (source.num_layers, source.hidden_size) == (tiny_llama.num_layers, tiny_llama.hidden_size)


def test_a_repo_neither_cached_nor_reachable_is_a_clear_error(offline_hub: Path) -> None:
    with pytest.raises(ModelError, match="not in the Hugging Face cache .* HF_HUB_OFFLINE is set"):
        find_model("test-org/not-there")
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        find_model("test-org/tiny-llama@no-such-branch")


def test_the_cli_loads_a_hub_model_offline(offline_hub: Path, tmp_path: Path, tiny_llama) -> None:
    done = subprocess.run([SHIZA, "model", "prepare", "test-org/tiny-llama"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert tiny_llama.model_id.split("@")[1] in done.stdout
    missing = subprocess.run([SHIZA, "model", "prepare", "test-org/not-there"], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: model 'test-org/not-there' is not in")


def test_a_local_directory_wins_over_a_repo_id(tmp_path: Path, tiny_llama, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_llama.path, tmp_path / "org" / "model")
    assert not is_hub_id("org/model") and find_model("org/model").path == Path("org/model")
    assert is_hub_id("someone/else@v1.0") and not is_hub_id("../x") and not is_hub_id("a/b/c")


def test_only_the_shards_of_the_layers_are_fetched(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"num_hidden_layers": 4, "tie_word_embeddings": false}')
    (tmp_path / "model.safetensors.index.json").write_text("""{"weight_map": {
        "model.embed_tokens.weight": "a.safetensors", "model.layers.0.mlp.w": "a.safetensors",
        "model.layers.1.mlp.w": "b.safetensors", "model.layers.2.mlp.w": "c.safetensors",
        "model.layers.3.mlp.w": "d.safetensors", "model.norm.weight": "d.safetensors",
        "lm_head.weight": "e.safetensors"}}""")
    assert _shards_for(tmp_path, (1, 3)) == ["b.safetensors", "c.safetensors"]
    assert _shards_for(tmp_path, (0, 2)) == ["a.safetensors", "b.safetensors"]
    assert _shards_for(tmp_path, (2, 4)) == ["c.safetensors", "d.safetensors", "e.safetensors"]
    assert _shards_for(tmp_path, None) == ["*.safetensors"]
