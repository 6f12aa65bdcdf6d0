"""A checkpoint's tokenizer without transformers: ``tokenizer.json`` through HF ``tokenizers``.

It reads what transformers' fast tokenizer reads from a checkpoint directory and applies it the
same way, so that token ids and text are identical with or without transformers installed
(tests/node/models/test_tokenizer.py compares the two):

- ``tokenizer.json``: the whole pipeline (normaliser, pre-tokeniser, model, post-processor with
  its special tokens, decoder). Truncation and padding saved in it are switched off, as
  transformers does for a call without ``truncation``/``padding``.
- ``tokenizer_config.json`` (and, for old checkpoints without ``added_tokens_decoder``,
  ``special_tokens_map.json``): the named special tokens (``eos_token`` ...), which are added as
  special tokens when ``tokenizer.json`` lacks them, ``split_special_tokens``,
  ``clean_up_tokenization_spaces`` and an inline ``chat_template``.
- ``chat_template.jinja`` (and ``additional_chat_templates/*.jinja``), which take priority over
  the inline template, as in transformers.

Not covered: checkpoints with only a slow (sentencepiece/vocab) tokenizer and no
``tokenizer.json``, and tokenizer classes that rebuild their pipeline in Python (remote code).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from tokenizers import AddedToken
from tokenizers import Tokenizer as Backend

from node.models.chat_template import ChatTemplateError, render_chat
from node.models.errors import ModelError

# transformers' named special tokens; model-specific ``*_token`` keys count as well.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                 "mask_token")
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{file}: unreadable: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{file}: not a JSON object")
    return data


class Tokenizer:
    """Text <-> token ids, and conversations -> prompt text through the chat template."""

    def __init__(self, backend: Backend, special_tokens: Mapping[str, str],
                 chat_templates: Mapping[str, str], *, clean_up_spaces: bool = False) -> None:
        self.backend = backend
        self.special_tokens_map: dict[str, str] = dict(special_tokens)
        self.chat_templates: dict[str, str] = dict(chat_templates)
        self._clean_up_spaces = clean_up_spaces

    @property
    def cleans_up_spaces(self) -> bool:
        """Whether ``decode`` removes spaces before punctuation (``clean_up_tokenization_spaces``):
        text decoded piece by piece then differs from the whole decoded at once."""
        return self._clean_up_spaces

    @classmethod
    def from_dir(cls, path: Path) -> "Tokenizer":
        """The tokenizer saved in a checkpoint directory (``tokenizer.json`` required)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ModelError(f"{path} has no tokenizer.json: text generation needs a fast "
                             "(tokenizers) tokenizer saved with the checkpoint")
        try:
            backend = Backend.from_file(str(tok_file))
        except Exception as e:  # noqa: BLE001 - the Rust library raises plain Exceptions
            raise ModelError(f"{tok_file}: not a tokenizers file: {e}") from None
        backend.no_truncation()
        backend.no_padding()
        cfg_file = path / "tokenizer_config.json"
        config = _read_json(cfg_file) if cfg_file.is_file() else {}
        legacy_map = path / "special_tokens_map.json"
        if "added_tokens_decoder" not in config and legacy_map.is_file():
            config = {**config, **_read_json(legacy_map)}
        special = {k: t for k, v in config.items()
                   if (k in _NAMED_TOKENS or k.endswith("_token")) and (t := _token_text(v))}
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra_texts = [t for v in (extra.values() if isinstance(extra, dict) else extra)
                       if (t := _token_text(v))]
        known = {t.content for t in backend.get_added_tokens_decoder().values()}
        missing = [t for t in dict.fromkeys([*special.values(), *extra_texts]) if t not in known]
        if missing:  # as transformers does: a named special token the file does not list
            backend.add_special_tokens([AddedToken(t, special=True) for t in missing])
        backend.encode_special_tokens = bool(config.get("split_special_tokens", False))
        # transformers skips this clean-up for BPE models: it would eat real spaces.
        clean = bool(config.get("clean_up_tokenization_spaces", False)) and (
            type(backend.model).__name__ != "BPE" or bool(config.get(
                "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")))
        return cls(backend, special, _chat_templates(path, config), clean_up_spaces=clean)

    # --- the vocabulary ---------------------------------------------------------------------

    def __len__(self) -> int:
        """Size of the vocabulary with the added tokens (token ids are below it)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.special_tokens_map.get("eos_token"))

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.special_tokens_map.get("bos_token"))

    # --- text ---------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = str(self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))
        if self._clean_up_spaces:
            for before, after in _CLEANUPS:
                text = text.replace(before, after)
        return text

    # --- conversations ------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template, or None when the checkpoint has none."""
        return self.chat_templates.get("default")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *,
                            add_generation_prompt: bool = False,
                            tokenize: Literal[False] = False,
                            tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The conversation as prompt text (tokenize it with ``add_special_tokens=False``).

        Raises ``ChatTemplateError`` when there is no template or it rejects the messages.
        """
        if tokenize:
            raise TypeError("apply_chat_template returns text here: encode it yourself")
        if self.chat_template is None:
            raise ChatTemplateError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                           special_tokens=self.special_tokens_map, tools=tools)


def _chat_templates(path: Path, config: Mapping[str, Any]) -> dict[str, str]:
    """Named templates; files take priority over the config's inline ``chat_template``."""
    files: dict[str, str] = {}
    main = path / "chat_template.jinja"
    if main.is_file():
        files["default"] = main.read_text(encoding="utf-8")
    extra_dir = path / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            files[f.stem] = f.read_text(encoding="utf-8")
    if files:
        return files
    inline = config.get("chat_template")
    if isinstance(inline, str):
        return {"default": inline}
    if isinstance(inline, list):  # the older form of several named templates
        return {str(t["name"]): str(t["template"]) for t in inline
                if isinstance(t, dict) and "name" in t and "template" in t}
    return {}
