"""The torch-free tokenizer gives the ids and text that transformers gives, on SmolLM2's
tokenizer and its real chat template (the tiny model ships both), and on tokenizer settings
that change what transformers does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.client.textgen import TextModel, Detokenizer
from node.models import ModelSource, Tokenizer, load_tokenizer

pytest.importorskip("transformers")

PROMPTS = [
    "What is the capital of France?",
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnew\n\nlines\r\n",
    "héllo wörld, naïve café: ünïcödé",
    "日本語のテキストと中文",
    "emoji 🦙🚀 and a ZWJ family 👨‍👩‍👧",
    "<|im_start|>user\nspecial tokens typed by the user<|im_end|>",
    "<|endoftext|> in the middle <|im_end|>",
    "don't , stop . here ? yes ! 're 've",
    "code: def f(x):\n    return x ** 2  # ok",
    "a" * 500,
]


def _reference(source: ModelSource | Path) -> Any:
    from node.engine.registry import load_tokenizer as transformers_tokenizer

    path = source.path if isinstance(source, ModelSource) else Path(source)
    return transformers_tokenizer(ModelSource("t", path, {}, 1, 1, "t@0", ""))


@pytest.fixture(scope="module")
def pair(tiny_llama: ModelSource) -> tuple[Tokenizer, Any]:
    return load_tokenizer(tiny_llama), _reference(tiny_llama)


def test_vocabulary_and_special_tokens(pair: tuple[Tokenizer, Any]) -> None:
    mine, ref = pair
    assert len(mine) == len(ref) == 49152
    assert (mine.eos_token_id, mine.bos_token_id) == (ref.eos_token_id, ref.bos_token_id)
    assert mine.special_tokens_map == ref.special_tokens_map
    assert mine.chat_template == ref.chat_template and "<|im_start|>" in mine.chat_template


@pytest.mark.parametrize("prompt", PROMPTS)
def test_encode_and_decode_equal_transformers(pair: tuple[Tokenizer, Any], prompt: str) -> None:
    mine, ref = pair
    for special in (True, False):
        ids = mine.encode(prompt, add_special_tokens=special)
        assert ids == ref.encode(prompt, add_special_tokens=special)
        for skip in (True, False):
            assert mine.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_prompt_equals_transformers(pair: tuple[Tokenizer, Any], prompt: str) -> None:
    mine, ref = pair
    for conv in ([{"role": "user", "content": prompt}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt},
                  {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "More."}]):
        for gen in (True, False):
            text = mine.apply_chat_template(conv, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)


def test_text_model_prompt_ids_equal_the_transformers_path(tiny_llama: ModelSource,
                                                            pair: tuple[Tokenizer, Any]) -> None:
    """TextModel.encode as it was written on transformers: template text, then ids without
    special tokens; raw prompts with them."""
    _, ref = pair
    model = TextModel.load(tiny_llama)
    assert model.eos_token_ids == (2,)
    for prompt in PROMPTS:
        text = ref.apply_chat_template([{"role": "user", "content": prompt}],
                                       add_generation_prompt=True, tokenize=False)
        assert model.encode(prompt) == list(ref.encode(text, add_special_tokens=False))
        assert model.encode(prompt, raw=True) == list(ref.encode(prompt))


def _pieces(model: TextModel, ids: list[int]) -> list[str]:
    out: list[str] = []
    detok = Detokenizer(model, out.append)
    for t in ids:
        detok.push(t)
    return out


def test_streamed_pieces_equal_transformers(tiny_llama: ModelSource,
                                            pair: tuple[Tokenizer, Any]) -> None:
    _, ref = pair
    mine = TextModel.load(tiny_llama)
    theirs = TextModel(mine.name, mine.model_id, ref, mine.eos_token_ids, mine.num_layers)
    for prompt in PROMPTS:
        # Byte-level BPE splits emoji and CJK characters over several tokens: the pieces must
        # wait for whole characters the same way.
        ids = mine.tokenizer.encode(prompt) + [2]
        pieces = _pieces(mine, ids)
        assert pieces == _pieces(theirs, ids)
        assert "".join(pieces) == ref.decode(ids, skip_special_tokens=True)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=80), ids=st.lists(st.integers(0, 49151), max_size=24))
def test_any_text_and_any_ids_equal_transformers(pair: tuple[Tokenizer, Any], text: str,
                                                 ids: list[int]) -> None:
    mine, ref = pair
    assert mine.encode(text) == ref.encode(text)
    assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


# --- settings of tokenizer_config.json that change what transformers does -------------------

def _variant(tiny_llama: ModelSource, tmp_path: Path, **config: Any) -> Path:
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy2(tiny_llama.path / "tokenizer.json", d / "tokenizer.json")
    base = json.loads((tiny_llama.path / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**base, **config}))
    return d


@pytest.mark.parametrize("config", [
    {"eos_token": "<|shiza_eos|>"},  # a named special token the tokenizer.json lacks
    {"split_special_tokens": True},
    {"clean_up_tokenization_spaces": True},  # ignored for byte-level BPE, as in transformers
    {"extra_special_tokens": ["<|tool|>", "<|im_start|>"]},
], ids=["added-eos", "split-special", "clean-up", "extra-special"])
def test_config_settings_equal_transformers(tiny_llama: ModelSource, tmp_path: Path,
                                            config: dict[str, Any]) -> None:
    d = _variant(tiny_llama, tmp_path, **config)
    mine, ref = Tokenizer.from_dir(d), _reference(d)
    assert len(mine) == len(ref) and mine.eos_token_id == ref.eos_token_id
    for prompt in [*PROMPTS, "a <|shiza_eos|> b <|tool|> c"]:
        ids = mine.encode(prompt)
        assert ids == ref.encode(prompt)
        assert mine.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_no_tokenizer_json_is_a_clear_error(tmp_path: Path) -> None:
    from node.models import ModelError

    with pytest.raises(ModelError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.slow
def test_real_smollm2_tokenizer_equals_transformers(smollm2: ModelSource) -> None:
    mine, ref = load_tokenizer(smollm2), _reference(smollm2)
    assert mine.chat_template == ref.chat_template
    for prompt in PROMPTS:
        text = mine.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        assert text == ref.apply_chat_template([{"role": "user", "content": prompt}],
                                               add_generation_prompt=True, tokenize=False)
        assert mine.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
