"""Constrained decoding on the node that samples (SPEC 9.8): only tokens a grammar allows.

The grammar engine is llguidance (Microsoft's; the one vLLM, SGLang and llama.cpp ship): it
compiles JSON schemas, Lark grammars and regexes, computes a session's allowed-token mask in
tens of microseconds, and bounds the work a hostile grammar can cause (its parser limits), which
matters here because grammars come from strangers. The client sends llguidance's JSON grammar
form and never needs llguidance itself.

A ``Constraint`` holds one matcher per row, each tracking the tokens chosen at positions
``start`` and on: the token chosen at a step's last position P is the token of position P + 1.
A row's matcher takes it (its mask applied first) only when P + 1 is the next position it
expects; earlier positions are a replay (a failover rebuilding a cache, or the prompt's chunks)
and are chosen freely, a later one is a gap and fails the step. A ``keep`` that cuts the cache
to K positions rolls the matchers back to the token of position K, so they stay in step with the
client's accepted text. After a row's end-of-sequence token its matcher is done and the row's
later choices are free (a batch's finished rows go on until every row is done).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from node.engine.errors import BadInput, EngineError

__all__ = ["Constraint", "GrammarTokenizer"]


class GrammarTokenizer:
    """The model's tokenizer as llguidance needs it, built once per engine (lazily: only
    sessions with a grammar pay for it), from the checkpoint's ``tokenizer.json``."""

    def __init__(self, model_dir: Path, vocab_size: int, config_eos: Any) -> None:
        self.path = Path(model_dir) / "tokenizer.json"
        self.vocab_size = vocab_size
        self.config_eos = config_eos
        self.eos_ids: list[int] = []
        self._lock = threading.Lock()
        self._tokenizer: Any = None

    def get(self) -> Any:
        with self._lock:
            if self._tokenizer is None:
                try:
                    import llguidance
                except ImportError:
                    raise BadInput("this node cannot constrain output: llguidance is not installed "
                                   "(pip install 'shiza-node[node]')") from None
                if not self.path.is_file():
                    raise BadInput(f"this node cannot constrain output: its model has no "
                                   f"{self.path.name}")
                self.eos_ids = _eos_ids(self.path, self.config_eos)
                try:
                    self._tokenizer = llguidance.LLTokenizer(
                        self.path.read_text(encoding="utf-8"), n_vocab=self.vocab_size,
                        eos_token=self.eos_ids or None)
                except Exception as e:  # noqa: BLE001 - a tokenizer llguidance cannot read
                    raise EngineError(f"llguidance cannot read {self.path}: {e}") from e
            return self._tokenizer


def _eos_ids(path: Path, config_eos: Any) -> list[int]:
    """The ends of a text, as the client counts them (node/client/textgen.py): the config's
    ``eos_token_id`` (an int or a list) and the tokenizer's end-of-sequence token."""
    eos = {config_eos} if isinstance(config_eos, int) else {e for e in config_eos or () if isinstance(e, int)}
    try:
        name = json.loads((path.parent / "tokenizer_config.json").read_text(encoding="utf-8")).get("eos_token")
        name = name.get("content") if isinstance(name, dict) else name
        added = json.loads(path.read_text(encoding="utf-8")).get("added_tokens") or []
        eos.update(t["id"] for t in added if isinstance(t, dict) and t.get("content") == name
                   and isinstance(t.get("id"), int))
    except (OSError, ValueError, AttributeError):
        pass  # no tokenizer_config.json: the config's ids only
    return sorted(eos)


def check_grammar(grammar: str) -> None:
    """BadInput unless ``grammar`` is llguidance's JSON grammar form (a map with ``grammars``)."""
    try:
        spec = json.loads(grammar)
    except ValueError as e:
        raise BadInput(f"grammar is not JSON: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("grammars"), list):
        raise BadInput('grammar must be llguidance\'s JSON form: {"grammars": [...]}')


class Constraint:
    """One matcher per row of a session; see the module docstring."""

    def __init__(self, tokenizer: GrammarTokenizer, grammar: str, start: int,
                 prefix: Sequence[Sequence[int]], batch: int) -> None:
        import llguidance

        check_grammar(grammar)
        if prefix and len(prefix) != batch:
            raise BadInput(f"grammar_prefix has {len(prefix)} rows; the session has {batch}")
        tok = tokenizer.get()
        first = llguidance.LLMatcher(tok, grammar)
        if first.is_error():
            raise BadInput(f"the grammar does not compile: {first.get_error()}")
        self.vocab_size = tokenizer.vocab_size
        self.eos = set(tokenizer.eos_ids) or {int(tok.eos_token)}
        self.matchers = [first] + [first.deep_copy() for _ in range(batch - 1)]
        self.start = start
        self.next_pos = [start] * batch  # the position of the next token each matcher takes
        self.ended = [False] * batch
        self.history: list[list[int]] = [[] for _ in range(batch)]  # tokens taken, for rollback
        self._bits = torch.zeros((1, (self.vocab_size + 31) // 32), dtype=torch.int32)
        self._shifts = torch.arange(32, dtype=torch.int32)
        for row, tokens in enumerate(prefix or ()):
            for t in tokens:
                if not self.wants(row, self.next_pos[row]):
                    raise BadInput("grammar_prefix continues past the row's end-of-sequence token")
                self.take(row, int(t))

    def wants(self, row: int, position: int) -> bool:
        """Whether the token of ``position`` is this row's next under the grammar (BadInput
        when positions between were never chosen here)."""
        if self.ended[row] or position < self.next_pos[row]:
            return False
        if position > self.next_pos[row]:
            raise BadInput(f"row {row}: the grammar expects the token of position "
                           f"{self.next_pos[row]} first, not {position} (a session constrained "
                           f"from position {self.start} must see every token from there)")
        return True

    def allowed(self, row: int) -> torch.Tensor:
        """Bool (V,): the tokens the row's grammar allows next."""
        m = self.matchers[row]
        m.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        if m.is_error():
            raise BadInput(f"row {row}: the grammar failed: {m.get_error()}")
        bits = ((self._bits[0].unsqueeze(-1) >> self._shifts) & 1).reshape(-1)
        return bits[:self.vocab_size].bool()

    def mask_(self, row: int, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) with every token the grammar forbids at -inf, in place."""
        allowed = self.allowed(row).to(logits.device)
        width = min(int(logits.shape[-1]), int(allowed.shape[0]))
        logits[:width].masked_fill_(~allowed[:width], float("-inf"))
        logits[width:] = float("-inf")
        return logits

    def take(self, row: int, token: int) -> None:
        """The row's next token is ``token`` (chosen under the mask, or replayed)."""
        m = self.matchers[row]
        if token in self.eos and (m.is_accepting() or m.is_stopped()):
            self.ended[row] = True
        elif not m.consume_token(token) or m.is_error():
            raise BadInput(f"row {row}: token {token} is not allowed by the grammar here: "
                           f"{m.get_error() or 'rejected'}")
        self.history[row].append(token)
        self.next_pos[row] += 1

    def rollback_to(self, keep: int) -> None:
        """The cache was cut to ``keep`` positions: the token of position ``keep`` (the next
        input) stays taken, every later one is undone."""
        for row in range(len(self.matchers)):
            drop = self.next_pos[row] - max(self.start, keep + 1)
            if drop <= 0:
                continue
            ended = self.ended[row]
            undone = drop - 1 if ended else drop  # an end token never reached the matcher
            if ended:
                self.ended[row] = False
            if undone and not self.matchers[row].rollback(undone):
                raise BadInput(f"row {row}: the grammar cannot roll back {undone} tokens")
            del self.history[row][-drop:]
            self.next_pos[row] -= drop
