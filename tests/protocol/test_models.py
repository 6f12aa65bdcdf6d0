from __future__ import annotations

import re

import pytest

from protocol import InvalidMessage, model_id, parse_model_id, model_provider_key, capacity_key

CONFIG = {"architectures": ["LlamaForCausalLM"], "hidden_size": 576, "num_hidden_layers": 30, "rms_norm_eps": 1e-5,
          "rope_scaling": None, "_name_or_path": "/tmp/x", "transformers_version": "5.19.0", "torch_dtype": "float32"}
MANIFEST = [
    ("model.norm.weight", (576,), "float32", "a" * 64),
    ("model.embed_tokens.weight", (49152, 576), "float32", "b" * 64),
]


def test_model_id_shape_and_determinism() -> None:
    mid = model_id("SmolLM2-135M-Instruct", CONFIG, MANIFEST)
    assert re.fullmatch(r"SmolLM2-135M-Instruct@[0-9a-f]{16}", mid)
    assert model_id("SmolLM2-135M-Instruct", CONFIG, list(reversed(MANIFEST))) == mid
    assert parse_model_id(mid) == ("SmolLM2-135M-Instruct", mid.split("@")[1])


def test_irrelevant_config_keys_ignored_relevant_ones_not() -> None:
    mid = model_id("m", CONFIG, MANIFEST)
    trimmed = {k: v for k, v in CONFIG.items() if not k.startswith("_") and k not in ("transformers_version", "torch_dtype")}
    assert model_id("m", trimmed, MANIFEST) == mid
    assert model_id("m", {**CONFIG, "dtype": "bfloat16"}, MANIFEST) == mid
    assert model_id("m", {**CONFIG, "rms_norm_eps": 1e-6}, MANIFEST) != mid
    assert model_id("m", {**CONFIG, "architectures": ["X"]}, MANIFEST) != mid
    changed = [MANIFEST[0], ("model.embed_tokens.weight", (49152, 576), "float32", "c" * 64)]
    assert model_id("m", CONFIG, changed) != mid
    bf16 = [(n, s, "bfloat16", d) for n, s, _, d in MANIFEST]
    assert model_id("m", CONFIG, bf16) != mid


@pytest.mark.parametrize(
    "manifest",
    [
        [("a", (1,), "float32", "A" * 64)],
        [("a", (1,), "float32", "a" * 63)],
        [("a", (-1,), "float32", "a" * 64)],
        [("a", (1,), "float32", "a" * 64), ("a", (1,), "float32", "b" * 64)],
        [("a", (1,), "float32")],
    ],
)
def test_bad_manifests(manifest: list) -> None:
    with pytest.raises(InvalidMessage):
        model_id("m", CONFIG, manifest)


@pytest.mark.parametrize("bad", ["", "name", "name@", "@0123456789abcdef", "n@0123456789ABCDEF", "n@0123", "n m@0123456789abcdef"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(InvalidMessage):
        parse_model_id(bad)


def test_dht_keys() -> None:
    assert capacity_key("12D3KooWabc") == "/shiza-cap/12D3KooWabc"
    import hashlib

    assert model_provider_key("m@0123456789abcdef") == hashlib.sha256(b"shiza/model/m@0123456789abcdef").digest()
