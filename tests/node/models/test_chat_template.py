"""Chat templates render as transformers renders them: the sandbox, whitespace control, the
extra filter, globals and block, the template variables, and where templates are stored."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from node.models import ChatTemplateError, ModelSource, Tokenizer
from node.models.chat_template import render_chat

pytest.importorskip("transformers")

# Each exercises something a plain jinja2 Environment renders differently.
TEMPLATES = {
    "trim-and-lstrip": (
        "{% for m in messages %}\n    {% if m.role == 'system' %}\n<<{{ m.content }}>>\n"
        "    {% else %}\n[{{ m.role }}] {{ m.content }}\n    {% endif %}\n{% endfor %}\n"
        "{% if add_generation_prompt %}[assistant]{% endif %}"),
    "tojson-without-html-escaping": "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}",
    "special-token-variables": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}"
                               "{% endfor %}{{ pad_token }}{{ unk_token }}",
    "loop-controls": "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}"
                     "{% if m.role == 'system' %}{% continue %}{% endif %}{{ m.content }};{% endfor %}",
    "generation-block": "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}"
                        "{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
                        "{% endfor %}",
    "tools-and-documents-are-none": "{{ tools is none }} {{ documents is none }} {{ messages | length }}",
}
CONVERSATION = [
    {"role": "system", "content": "Use <b>tags</b> & \"quotes\"."},
    {"role": "user", "content": "héllo 🦙"},
    {"role": "assistant", "content": "ok"},
    {"role": "user", "content": "again"},
]


def _tokenizer_dir(tiny_llama: ModelSource, tmp_path: Path, *, template: str | None = None,
                   config: dict[str, Any] | None = None) -> Path:
    d = tmp_path / "tok"
    d.mkdir()
    shutil.copy2(tiny_llama.path / "tokenizer.json", d / "tokenizer.json")
    base = json.loads((tiny_llama.path / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**base, **(config or {})}))
    if template is not None:
        (d / "chat_template.jinja").write_text(template)
    return d


def _transformers(d: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d), local_files_only=True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_template_renders_as_in_transformers(tiny_llama: ModelSource, tmp_path: Path, name: str) -> None:
    d = _tokenizer_dir(tiny_llama, tmp_path, template=TEMPLATES[name])
    mine, ref = Tokenizer.from_dir(d), _transformers(d)
    for gen in (True, False):
        got = mine.apply_chat_template(CONVERSATION, add_generation_prompt=gen)
        assert got == ref.apply_chat_template(CONVERSATION, add_generation_prompt=gen, tokenize=False)


def test_raise_exception_rejects_as_in_transformers(tiny_llama: ModelSource, tmp_path: Path) -> None:
    template = ("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}"
                "{% endif %}{{ messages[0].content }}")
    d = _tokenizer_dir(tiny_llama, tmp_path, template=template)
    mine, ref = Tokenizer.from_dir(d), _transformers(d)
    with pytest.raises(ChatTemplateError, match="first must be user"):
        mine.apply_chat_template(CONVERSATION)
    with pytest.raises(Exception, match="first must be user"):
        ref.apply_chat_template(CONVERSATION, tokenize=False)
    assert mine.apply_chat_template(CONVERSATION[1:]) == "héllo 🦙"


def test_the_sandbox_refuses_what_transformers_refuses() -> None:
    # An immutable sandbox: no attribute tricks, no mutating the caller's messages.
    with pytest.raises(ChatTemplateError):
        render_chat("{{ ''.__class__.__mro__ }}", [], add_generation_prompt=False, special_tokens={})
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.append(1) }}", [], add_generation_prompt=False, special_tokens={})
    with pytest.raises(ChatTemplateError, match="does not compile"):
        render_chat("{% for %}", [], add_generation_prompt=False, special_tokens={})


@pytest.mark.parametrize("where", ["inline-string", "inline-named-list", "file-over-inline",
                                   "additional-file"])
def test_where_templates_are_stored(tiny_llama: ModelSource, tmp_path: Path, where: str) -> None:
    config: dict[str, Any] = {}
    template = None
    if where == "inline-string":
        config["chat_template"] = "inline:{{ messages[0].content }}"
    elif where == "inline-named-list":
        config["chat_template"] = [{"name": "default", "template": "named:{{ messages[0].content }}"},
                                   {"name": "tool_use", "template": "tool:{{ messages[0].content }}"}]
    elif where == "file-over-inline":
        config["chat_template"] = "inline:{{ messages[0].content }}"
        template = "file:{{ messages[0].content }}"
    d = _tokenizer_dir(tiny_llama, tmp_path, template=template, config=config)
    if where == "additional-file":
        (d / "chat_template.jinja").write_text("main:{{ messages[0].content }}")
        (d / "additional_chat_templates").mkdir()
        (d / "additional_chat_templates" / "rag.jinja").write_text("rag:{{ messages[0].content }}")
    mine, ref = Tokenizer.from_dir(d), _transformers(d)
    conv = [{"role": "user", "content": "x"}]
    assert mine.apply_chat_template(conv) == ref.apply_chat_template(conv, tokenize=False)
    if where == "additional-file":
        assert mine.chat_templates == {"default": "main:{{ messages[0].content }}",
                                       "rag": "rag:{{ messages[0].content }}"}


def test_no_template(tiny_llama: ModelSource, tmp_path: Path) -> None:
    d = _tokenizer_dir(tiny_llama, tmp_path)
    mine = Tokenizer.from_dir(d)
    assert mine.chat_template is None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        mine.apply_chat_template([{"role": "user", "content": "x"}])
