"""Nested values of messages and records: served spans and sampling parameters."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._fields import check_float, check_int, check_seq, check_str, fields_of, set_field
from .errors import InvalidMessage
from .ids import (MAX_BATCH_SIZE, MAX_GRAMMAR_BYTES, MAX_ID_LEN, MAX_LAYERS, MAX_SESSION_LENGTH,
                  MAX_LOGIT_BIAS, MAX_TEMPERATURE, MAX_TOKEN_ID, MAX_TOP_LOGPROBS, MAX_UINT64)


def span_bounds(start: int, end: int) -> None:
    check_int("start", start, 0, MAX_LAYERS - 1)
    check_int("end", end, 1, MAX_LAYERS)
    if end <= start:
        raise InvalidMessage(f"span end ({end}) must be greater than start ({start})")


@dataclass(frozen=True)
class ServedSpan:
    """Layers [start, end) of ``model_id``, a model of ``num_layers`` decoder layers."""

    model_id: str
    start: int
    end: int
    num_layers: int

    def __post_init__(self) -> None:
        check_str("model_id", self.model_id, MAX_ID_LEN, nonempty=True)
        span_bounds(self.start, self.end)
        check_int("num_layers", self.num_layers, self.end, MAX_LAYERS)

    def to_wire(self) -> dict[str, Any]:
        return {"model_id": self.model_id, "start": self.start, "end": self.end, "num_layers": self.num_layers}

    @classmethod
    def from_wire(cls, obj: Any) -> ServedSpan:
        return cls(**fields_of(obj, "span", ("model_id", "start", "end", "num_layers")))


@dataclass(frozen=True)
class SamplingParams:
    """How the last span picks the next token. temperature 0 means greedy (argmax).

    ``grammar`` (SPEC 7.1, 9.8): the last span chooses only tokens an llguidance grammar allows
    (its JSON form: ``{"grammars": [...]}``) for the tokens at positions ``grammar_start`` and
    on; ``grammar_prefix`` holds each row's tokens there that a session opened mid-generation
    (a failover) has already seen chosen. All three are left out of the wire map when unset.
    ``presence_penalty`` / ``frequency_penalty`` (SPEC 9.10, each in [-2, 2]): subtracted from
    the logit of every token the row has generated from ``grammar_start`` on (the generated
    text's start, named for its first use), once / once per time it appeared; ``grammar_prefix``
    then carries the generated tokens to a session opened mid-generation, as for a grammar.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    grammar: str | None = None
    grammar_start: int | None = None
    grammar_prefix: tuple[tuple[int, ...], ...] | None = None
    logprobs: int | None = None  # report log-probabilities, with this many top tokens (SPEC 9.9)
    logit_bias: tuple[tuple[int, float], ...] | None = None  # (token id, bias added to its logit)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty) or bool(self.frequency_penalty)

    def __post_init__(self) -> None:
        set_field(self, "temperature", check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE))
        set_field(self, "top_p", check_float("top_p", self.top_p, 0.0, 1.0))
        if self.top_p <= 0.0:
            raise InvalidMessage("top_p must be greater than 0")
        if self.seed is not None:
            check_int("seed", self.seed, 0, MAX_UINT64)
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS)
        if self.logit_bias is not None:
            pairs = []
            for entry in check_seq("logit_bias", self.logit_bias, MAX_LOGIT_BIAS):
                pair = check_seq("logit_bias entry", entry, 2)
                if len(pair) != 2:
                    raise InvalidMessage("a logit_bias entry is a pair [token id, bias]")
                pairs.append((check_int("logit_bias token", pair[0], 0, MAX_TOKEN_ID),
                              check_float("logit_bias value", pair[1], -100.0, 100.0)))
            set_field(self, "logit_bias", tuple(pairs))
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                set_field(self, name, check_float(name, getattr(self, name), -2.0, 2.0))
        if self.grammar is None and not self.penalized:
            if self.grammar_start is not None or self.grammar_prefix is not None:
                raise InvalidMessage("grammar_start and grammar_prefix need a grammar or a penalty")
            return
        if self.grammar is not None:
            check_str("grammar", self.grammar, MAX_GRAMMAR_BYTES, nonempty=True)
            if self.grammar_start is None:
                raise InvalidMessage("a grammar needs grammar_start (where the generated text starts)")
        if self.grammar_start is None:  # penalties only: the client sets it (SwarmClient.generate)
            return
        check_int("grammar_start", self.grammar_start, 1, MAX_SESSION_LENGTH)
        if self.grammar_prefix is not None:
            rows = check_seq("grammar_prefix", self.grammar_prefix, MAX_BATCH_SIZE)
            set_field(self, "grammar_prefix", tuple(
                tuple(check_int("grammar_prefix token", t, 0, MAX_TOKEN_ID)
                      for t in check_seq("grammar_prefix row", row, MAX_SESSION_LENGTH))
                for row in rows))

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        if self.logprobs is not None:
            wire["logprobs"] = self.logprobs
        if self.logit_bias is not None:
            wire["logit_bias"] = [[t, b] for t, b in self.logit_bias]
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) is not None:
                wire[name] = getattr(self, name)
        if self.grammar is not None:
            wire["grammar"] = self.grammar
        if self.grammar_start is not None:
            wire["grammar_start"] = self.grammar_start
            if self.grammar_prefix is not None:
                wire["grammar_prefix"] = [list(row) for row in self.grammar_prefix]
        return wire

    @classmethod
    def from_wire(cls, obj: Any) -> SamplingParams:
        return cls(**fields_of(obj, "sampling", (), {"temperature": 0.0, "top_p": 1.0, "seed": None,
                                                     "grammar": None, "grammar_start": None,
                                                     "grammar_prefix": None, "logprobs": None,
                                                     "logit_bias": None, "presence_penalty": None,
                                                     "frequency_penalty": None}))
