"""How the last span chooses a token from its logits, for every engine that computes logits
(the transformers span, the vLLM span): temperature and top-p sampling with the session's own
seeded generator, logit_bias, a grammar's mask (SPEC 9.8), log-probabilities (SPEC 9.9) and the
window steps of speculative decoding (SPEC 9.7).

The functions take the session's ``Chooser`` (or any object with its attributes: the
transformers span's sessions carry them directly) and float32 logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from node.engine.base import Sampling
from node.engine.errors import BadInput
from node.engine.grammar import Constraint, GrammarTokenizer

__all__ = ["FORBIDDEN_LOGPROB", "Chooser", "choose_window", "pick", "sample", "top_p_probs"]


@dataclass
class Chooser:
    """What a session that ends at the model's last layer needs to choose its tokens."""

    temperature: float = 0.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    constraint: Constraint | None = None  # a grammar on the tokens it chooses (SPEC 9.8)
    logprobs: int | None = None  # report log-probabilities with this many top tokens (SPEC 9.9)
    bias: tuple[torch.Tensor, torch.Tensor] | None = None  # logit_bias: (token ids, values)
    last_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # of its last step, until taken
    penalties: Penalties | None = None  # presence / frequency penalties (SPEC 9.10)

    @classmethod
    def of(cls, params: Sampling, batch_size: int, vocab_size: int, device: Any,
           grammar_tokenizer: GrammarTokenizer | Any) -> Chooser:
        """The chooser of ``params`` (already parsed): a generator seeded when sampling, the
        bias as tensors (BadInput for a token outside the vocabulary), the grammar compiled."""
        generator = None
        if params.temperature > 0:
            generator = torch.Generator(device=device)
            generator.manual_seed(params.seed)
        bias = None
        if params.logit_bias:
            ids = [t for t, _ in params.logit_bias]
            if max(ids) >= vocab_size:
                raise BadInput(f"logit_bias names token {max(ids)}, outside the vocabulary ({vocab_size})")
            bias = (torch.tensor(ids, device=device),
                    torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32, device=device))
        constraint = None
        if params.grammar is not None:
            constraint = Constraint(grammar_tokenizer, params.grammar, params.grammar_start,
                                    params.grammar_prefix, batch_size)
        penalties = None
        if params.penalized:
            penalties = Penalties(params.presence_penalty, params.frequency_penalty, params.grammar_start,
                                  params.grammar_prefix, batch_size, vocab_size, device)
        return cls(params.temperature, params.top_p, generator, constraint, params.logprobs, bias,
                   penalties=penalties)


class Penalties:
    """Each row's count of every token it generated from ``start`` on, tracked by position (as
    ``Constraint`` tracks its matchers), and the penalties they earn: ``presence`` once for a
    token that appeared, ``frequency`` once per time, subtracted from its logit (OpenAI's
    meaning; positive values discourage repetition)."""

    def __init__(self, presence: float, frequency: float, start: int, prefix: Any, batch: int,
                 vocab_size: int, device: Any) -> None:
        if prefix and len(prefix) != batch:
            raise BadInput(f"grammar_prefix has {len(prefix)} rows; the session has {batch}")
        self.presence, self.frequency, self.start = float(presence), float(frequency), int(start)
        self.counts = torch.zeros((batch, vocab_size), dtype=torch.float32, device=device)
        self.next_pos = [self.start] * batch
        self.history: list[list[int]] = [[] for _ in range(batch)]
        for row, tokens in enumerate(prefix or ()):
            for t in tokens:
                if not 0 <= int(t) < vocab_size:
                    raise BadInput(f"grammar_prefix token {t} is outside the vocabulary ({vocab_size})")
                self.take(row, int(t))

    def wants(self, row: int, position: int) -> bool:
        """Whether the token of ``position`` is this row's next generated one (BadInput when
        positions between were never chosen here)."""
        if position < self.next_pos[row]:
            return False
        if position > self.next_pos[row]:
            raise BadInput(f"row {row}: penalties count from position {self.start}; the token of "
                           f"position {self.next_pos[row]} comes first, not {position}")
        return True

    def apply_(self, row: int, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (V,) less the row's penalties, in place."""
        counts = self.counts[row].to(logits.device)
        width = min(int(logits.shape[-1]), int(counts.shape[0]))
        logits[:width] -= self.frequency * counts[:width] + self.presence * (counts[:width] > 0).float()
        return logits

    def take(self, row: int, token: int) -> None:
        self.counts[row, token] += 1
        self.history[row].append(token)
        self.next_pos[row] += 1

    def rollback_to(self, keep: int) -> None:
        """As ``Constraint.rollback_to``: the token of position ``keep`` stays, later ones go."""
        for row in range(len(self.history)):
            drop = self.next_pos[row] - max(self.start, keep + 1)
            for _ in range(max(0, drop)):
                self.counts[row, self.history[row].pop()] -= 1
                self.next_pos[row] -= 1


def check_next(session: Any, first: torch.Tensor) -> None:
    """Before a forward: BadInput when a row's first new position leaves a gap in what the
    session's grammar or penalties have seen (``first`` (B,): each row's position whose
    output token is the first one chosen)."""
    for tracker in (session.constraint, session.penalties):
        if tracker is not None:
            for b in range(int(first.shape[0])):
                tracker.wants(b, int(first[b]) + 1)


def rollback(session: Any, keep: int) -> None:
    """The session's cache was cut to ``keep`` positions: so are its grammar and penalties."""
    for tracker in (session.constraint, session.penalties):
        if tracker is not None:
            tracker.rollback_to(keep)


def sample(logits: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row from float32 logits (B, V): greedy at temperature 0, else top-p."""
    if temperature == 0.0 or generator is None:
        return logits.argmax(dim=-1)  # (B,)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, V) each
    # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)  # (B,)


def pick(logits: torch.Tensor, session: Any, last: torch.Tensor) -> torch.Tensor:
    """A plain step's next token per row, from float32 logits (B, V) at each row's last
    position ``last`` (B,): a grammar's mask first where it applies (``Constraint``)."""
    add_bias(logits, session)
    pen = session.penalties
    counted = [] if pen is None else [b for b in range(int(logits.shape[0])) if pen.wants(b, int(last[b]) + 1)]
    for b in counted:
        pen.apply_(b, logits[b])  # type: ignore[union-attr]
    c = session.constraint
    wants = [] if c is None else [b for b in range(int(logits.shape[0])) if c.wants(b, int(last[b]) + 1)]
    for b in wants:
        c.mask_(b, logits[b])  # type: ignore[union-attr]
    out = sample(logits, session.temperature, session.top_p, session.generator)
    for b in wants:
        c.take(b, int(out[b]))  # type: ignore[union-attr]
    for b in counted:
        pen.take(b, int(out[b]))  # type: ignore[union-attr]
    if session.logprobs is not None:
        session.last_logprobs = logprobs_of(log_softmax(logits, session.temperature), out, session.logprobs)
    return out


def add_bias(logits: torch.Tensor, session: Any) -> None:
    """``logits`` (..., V) with the session's logit_bias added, in place (OpenAI's meaning: -100
    bans a token in practice, +100 all but forces it)."""
    if session.bias is not None:
        ids, values = session.bias
        logits.index_add_(-1, ids, values.expand(*logits.shape[:-1], -1).contiguous())


#: A log-probability of a token the grammar forbids (-inf) is reported as this, as OpenAI does.
FORBIDDEN_LOGPROB = -9999.0


def log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """The distribution a token is drawn from, before top-p: the logits (a grammar's mask
    applied) at the session's temperature (1 when greedy), log-normalised."""
    return torch.log_softmax(logits / temperature if temperature > 0 else logits, dim=-1)


def logprobs_of(lp: torch.Tensor, chosen: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 (..., 1 + k): the chosen token's log-probability then the k largest; their ids)."""
    top = lp.topk(k, dim=-1) if k else None
    picked = lp.gather(-1, chosen.unsqueeze(-1))
    values = picked if top is None else torch.cat([picked, top.values], dim=-1)
    ids = chosen.new_zeros((*chosen.shape, 0)) if top is None else top.indices
    return values.float().clamp_min(FORBIDDEN_LOGPROB).contiguous(), ids.to(torch.int64).contiguous()


def choose_window(logits: torch.Tensor, draft: torch.Tensor, session: Any,
                   positions: torch.Tensor) -> torch.Tensor:
    """A window step's answer, int64 (B, T), from float32 logits (B, T, V) and the drafts
    (B, T - 1) in positions 1..T-1 (``positions`` (B, T) theirs): at position i the model's
    choice of the token after it.

    Greedy: the argmax everywhere. Sampling (speculative sampling with a deterministic draft,
    whose proposal is a point mass): at each position i < T - 1 the draft d = draft[i] is kept
    with probability p_i(d) (p_i the top-p distribution plain decoding samples from), else a
    token is drawn from p_i without d, renormalised; the last position is drawn from p_{T-1}.
    The client accepts the drafts up to the first position whose answer differs from its draft
    and takes that answer as the next token, so each token it emits has exactly the
    distribution plain decoding gives it. Positions after a rejection answer their argmax
    (never used). With a grammar (SPEC 9.8) each position's choice is made under the mask of
    the text up to it, drafts accepted so far included: a draft the grammar forbids is never kept.
    """
    temperature, top_p, generator, c = session.temperature, session.top_p, session.generator, session.constraint
    add_bias(logits, session)
    greedy = logits.argmax(dim=-1)  # (B, T)
    sampled = temperature > 0.0 and generator is not None
    lp = log_softmax(logits, temperature) if session.logprobs is not None else None
    pen = session.penalties
    if not sampled and c is None and pen is None:
        if lp is not None:
            session.last_logprobs = logprobs_of(lp, greedy, session.logprobs)  # type: ignore[arg-type]
        return greedy
    out = greedy.clone()
    batch, length = int(logits.shape[0]), int(logits.shape[1])
    for b in range(batch):
        for i in range(length):
            row = logits[b, i]
            counted = pen is not None and pen.wants(b, int(positions[b, i]) + 1)
            wants = c is not None and c.wants(b, int(positions[b, i]) + 1)
            if counted or wants:
                row = row.clone()
                if counted:
                    pen.apply_(b, row)  # type: ignore[union-attr]
                if wants:
                    c.mask_(b, row)  # type: ignore[union-attr]
                if lp is not None:
                    lp[b, i] = log_softmax(row, temperature)
            d = int(draft[b, i]) if i < length - 1 else None
            if not sampled:
                tok = int(row.argmax())
            else:
                probs = top_p_probs(row, temperature, top_p)  # (V,)
                tok = -1
                if d is not None:
                    u = float(torch.rand((), generator=generator, device=probs.device))
                    if u < float(probs[d]):
                        tok = d
                    else:
                        probs = probs.clone()
                        probs[d] = 0.0
                        if float(probs.sum()) <= 0.0:  # p_i(d) == 1 and u fell on the boundary
                            tok = d
                if tok < 0:
                    tok = int(torch.multinomial(probs, 1, generator=generator)[0])
            out[b, i] = tok
            if wants:
                c.take(b, tok)  # type: ignore[union-attr]
            if counted:
                pen.take(b, tok)  # type: ignore[union-attr]
            if tok != d:
                break  # rejected (or the last position): nothing after it is used
    if lp is not None:
        session.last_logprobs = logprobs_of(lp, out, session.logprobs)  # type: ignore[arg-type]
    return out


def top_p_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution ``sample`` draws from, over the vocabulary (V,), summing to 1."""
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    drop = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
    kept = torch.zeros_like(probs).scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return kept / kept.sum()
