"""A vLLM logits processor that gives the whole-model vLLM engine grammars and penalties.

It runs inside vLLM's engine core (loaded with ``--logits-processors
shiza_logits:ShizaLogitsProcessor``, this directory on ``PYTHONPATH``), under vLLM's python,
which has torch, vLLM and llguidance but not the node's packages: so it imports nothing of
``node`` and repeats, in a few lines, the two rules the node's engines follow
(node/engine/grammar.py ``Constraint.take``, node/engine/sampling.py ``Penalties.apply_``).

The node (node/engine/vllm/engine.py) sends a row's state with each completion request, in
``vllm_xargs`` (``SamplingParams.extra_args``), because a request is a restart point (a replay,
a failover's replacement, a token the client chose) and vLLM keeps no state between them:

* ``shiza_grammar``: llguidance's JSON grammar form ("" for none); ``shiza_taken``: the tokens
  its matcher has taken so far; ``shiza_ended``: 1 when the row's grammar already ended (an
  end-of-sequence token once it accepted); ``shiza_eos``: the end-of-sequence ids.
* ``shiza_presence``, ``shiza_frequency``: the penalties (SPEC 9.10); ``shiza_counted``: the
  generated tokens they count so far.

Each call, the row's function takes the tokens vLLM produced since the last call (the matcher
and the counts advance), subtracts ``frequency x count + presence x (count > 0)`` and masks what
the grammar forbids. vLLM runs it with the other processors that can change an argmax (its own
``logit_bias`` among them: both only add or mask, so their order does not matter), before
temperature and top-p. Nothing may escape into vLLM (an exception there ends the engine core
and every session on the node): a failure is logged and leaves the logits as they are; the
node takes every constrained token through its own matcher and fails the session when one
breaks the grammar.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from typing import Any

import torch

from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

log = logging.getLogger("shiza_logits")

KEYS = ("shiza_grammar", "shiza_presence", "shiza_frequency")
_GRAMMARS = 16  # compiled grammars kept (a fresh matcher is a deep copy of one)
_SHIFTS = torch.arange(32, dtype=torch.int32)


class _Row:
    """One request's grammar matcher and penalty counts."""

    def __init__(self, matcher: Any, ended: bool, eos: set[int], presence: float,
                 frequency: float, counted: list[int], taken: list[int]) -> None:
        self.matcher, self.ended, self.eos = matcher, ended, eos
        self.presence, self.frequency = presence, frequency
        self.counts: dict[int, int] = {}
        for t in counted:
            self.counts[t] = self.counts.get(t, 0) + 1
        self.seen = 0  # output tokens taken so far
        self.broken = False
        self.bits: torch.Tensor | None = None
        if matcher is not None and not ended:
            for t in taken:
                self._match(t)

    def _match(self, token: int) -> None:
        m = self.matcher
        if self.ended:
            return
        if token in self.eos and (m.is_accepting() or m.is_stopped()):
            self.ended = True
        elif not m.consume_token(token) or m.is_error():
            raise ValueError(f"token {token} breaks the grammar: {m.get_error() or 'rejected'}")

    def __call__(self, output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        if self.broken:
            return logits
        try:
            for t in output_ids[self.seen:]:
                t = int(t)
                if self.matcher is not None:
                    self._match(t)
                if self.presence or self.frequency:
                    self.counts[t] = self.counts.get(t, 0) + 1
            self.seen = len(output_ids)
            if self.counts and (self.presence or self.frequency):
                ids = torch.tensor(list(self.counts), dtype=torch.int64, device=logits.device)
                n = torch.tensor(list(self.counts.values()), dtype=logits.dtype, device=logits.device)
                logits[ids] -= self.frequency * n + self.presence
            if self.matcher is not None and not self.ended:
                self._mask(logits)
        except Exception:  # noqa: BLE001 - never into vLLM's engine core (see the module docstring)
            log.exception("shiza logits processor failed; this request goes on unconstrained")
            self.broken = True
        return logits

    def _mask(self, logits: torch.Tensor) -> None:
        vocab = int(logits.shape[-1])
        if self.bits is None:
            self.bits = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        self.matcher.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        if self.matcher.is_error():
            raise ValueError(f"the grammar failed: {self.matcher.get_error()}")
        allowed = ((self.bits.unsqueeze(-1) >> _SHIFTS) & 1).reshape(-1)[:vocab].bool()
        logits.masked_fill_(~allowed.to(logits.device), float("-inf"))


class ShizaLogitsProcessor(AdapterLogitsProcessor):
    """vLLM's per-request adapter around ``_Row``s (see the module docstring)."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        self._model_dir = str(vllm_config.model_config.model)
        self._vocab = int(vllm_config.model_config.get_vocab_size())
        self._lock = threading.Lock()
        self._tokenizers: dict[tuple[int, ...], Any] = {}
        self._grammars: OrderedDict[tuple[tuple[int, ...], str], Any] = OrderedDict()

    def is_argmax_invariant(self) -> bool:
        return False  # a mask or a penalty changes the argmax

    def _tokenizer(self, eos: tuple[int, ...]) -> Any:
        import llguidance

        tok = self._tokenizers.get(eos)
        if tok is None:
            with open(os.path.join(self._model_dir, "tokenizer.json"), encoding="utf-8") as f:
                text = f.read()
            tok = llguidance.LLTokenizer(text, n_vocab=self._vocab, eos_token=list(eos) or None)
            self._tokenizers[eos] = tok
        return tok

    def _matcher(self, grammar: str, eos: tuple[int, ...]) -> Any:
        import llguidance

        with self._lock:
            key = (eos, grammar)
            base = self._grammars.get(key)
            if base is None:
                base = llguidance.LLMatcher(self._tokenizer(eos), grammar)
                if base.is_error():
                    raise ValueError(f"the grammar does not compile: {base.get_error()}")
                self._grammars[key] = base
                while len(self._grammars) > _GRAMMARS:
                    self._grammars.popitem(last=False)
            self._grammars.move_to_end(key)
            return base.deep_copy()

    def new_req_logits_processor(self, params: Any) -> Any:
        extra = getattr(params, "extra_args", None) or {}
        if not any(k in extra for k in KEYS):
            return None
        try:
            eos = tuple(sorted(int(t) for t in extra.get("shiza_eos") or ()))
            grammar = str(extra.get("shiza_grammar") or "")
            ended = bool(int(extra.get("shiza_ended") or 0))
            matcher = self._matcher(grammar, eos) if grammar and not ended else None
            taken = [int(t) for t in extra.get("shiza_taken") or ()]
            counted = [int(t) for t in extra.get("shiza_counted") or ()]
            return _Row(matcher, ended, set(eos), float(extra.get("shiza_presence") or 0.0),
                        float(extra.get("shiza_frequency") or 0.0), counted, taken)
        except Exception:  # noqa: BLE001 - see the module docstring
            log.exception("shiza logits processor cannot take request state %s",
                          json.dumps({k: str(v)[:200] for k, v in extra.items()}))
            return None
