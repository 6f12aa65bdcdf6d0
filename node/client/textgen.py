"""Text in, text out over the swarm: tokenizer, chat template and streaming detokenisation.

Used by ``shiza generate``, the demo and agents:

    model = TextModel.load("smollm2-135m")
    async with SwarmClient.open(bootstrap=[addr]) as client:
        result = await generate_text(client, model, "What is the capital of France?",
                                     on_text=lambda s: print(s, end=""))
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from protocol.messages import SamplingParams

from node.client.swarm import SEED_BITS, GenerationResult, SwarmClient, with_fresh_seed
from node.client.routing import Hop
from node.models import ModelSource, Tokenizer, find_model, load_tokenizer


@dataclass
class TextModel:
    name: str
    model_id: str
    tokenizer: Tokenizer
    eos_token_ids: tuple[int, ...]
    num_layers: int
    # Rows of the model's output head (config ``vocab_size``): the last hop's tokens must be below
    # it (node/client/outputs.py); None when the config does not say.
    vocab_size: int | None = None

    @classmethod
    def load(cls, spec: str | ModelSource) -> "TextModel":
        """The model's content id and tokenizer, from ``smollm2-135m``, a checkpoint dir or a
        resolved source. Reads files only (no torch): the default model must have been
        prepared, else ``node.models.ModelNotPrepared``."""
        source = spec if isinstance(spec, ModelSource) else find_model(spec)
        tok = load_tokenizer(source)
        eos: set[int] = set()
        for value in (tok.eos_token_id, source.config.get("eos_token_id")):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list):
                eos.update(v for v in value if isinstance(v, int))
        vocab = source.config.get("vocab_size")
        return cls(source.name, source.model_id, tok, tuple(sorted(eos)), source.num_layers,
                   vocab if isinstance(vocab, int) and vocab > 0 else None)

    def encode(self, prompt: str, *, raw: bool = False) -> list[int]:
        if raw or not self.tokenizer.chat_template:
            return self.tokenizer.encode(prompt)
        return self.encode_chat([{"role": "user", "content": prompt}])

    def encode_chat(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """A conversation through the chat template, with the assistant's turn opened.

        Raises ``node.models.ChatTemplateError`` when the template rejects the messages.
        """
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class Detokenizer:
    """Turns a growing list of token ids into new text, never splitting a character.

    Each token costs the decoding of a few tokens, not of the whole text: the tokenizers
    library's streaming decoder (``DecodeStream``). A tokenizer that cleans up spaces after
    decoding (a transformers option for non-BPE models) is decoded whole each time instead,
    since its clean-up can change text already shown.
    """

    def __init__(self, model: TextModel, sink: Callable[[str], None]) -> None:
        self.model, self.sink = model, sink
        self.ids: list[int] = []
        self.emitted = ""
        tok = model.tokenizer
        self._stream = None
        if not getattr(tok, "cleans_up_spaces", True) and hasattr(tok, "backend"):
            from tokenizers.decoders import DecodeStream

            self._stream = DecodeStream(skip_special_tokens=True)

    def push(self, token: int) -> None:
        if token in self.model.eos_token_ids:
            return
        self.ids.append(token)
        if self._stream is not None:
            piece = self._stream.step(self.model.tokenizer.backend, token)
            if piece:
                self.emitted += piece
                self.sink(piece)
            return
        text = self.model.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the next token
            return
        if text.startswith(self.emitted) and len(text) > len(self.emitted):
            self.sink(text[len(self.emitted):])
        self.emitted = text


async def generate_text(
    client: SwarmClient,
    model: TextModel,
    prompt: str,
    *,
    raw: bool = False,
    max_new_tokens: int = 64,
    sampling: SamplingParams = SamplingParams(),
    on_text: Callable[[str], None] | None = None,
    route: list[Hop] | None = None,
) -> tuple[str, list[int], GenerationResult]:
    """Generate for one prompt; returns (text, prompt token ids, result). Sampling without a
    seed gets a fresh one (``with_fresh_seed``)."""
    prompt_ids = model.encode(prompt, raw=raw)
    detok = Detokenizer(model, on_text or (lambda s: None))
    result = await client.generate(
        model.model_id,
        [prompt_ids],
        max_new_tokens=max_new_tokens,
        sampling=with_fresh_seed(sampling),
        eos_token_ids=model.eos_token_ids,
        on_tokens=lambda toks: detok.push(toks[0]),
        route=route,
        vocab_size=model.vocab_size,
    )
    ids = [t for t in result.token_ids[0] if t not in model.eos_token_ids]
    return model.decode(ids), prompt_ids, result
