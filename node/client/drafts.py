"""Draft sources for speculative decoding across the swarm (SPEC.md 9.7), and the adaptive window.

A generation that speculates sends the pipeline, in one pass, its next token and up to k drafts
of the tokens after it; the last hop answers its own choice at every position and the client
keeps the drafts up to the first that differs (node/client/swarm.py). Where the drafts come from
is a ``Drafter``, chosen per generation by name (``make_drafter``):

    off     no drafts: plain decoding, one token per pass
    ngram   prompt lookup: the tokens that followed the latest earlier occurrence of the text's
            last n tokens (n = 3, then 2; one token alone is too weak a clue, and its drafts
            cost windows that are not kept). Needs no model and no torch, so every client
            has it; strong when the answer reuses the input (editing, extraction, summaries, code)

A drafter's proposals must be a deterministic function of the text so far: the last hop's
acceptance rule treats a draft as a point-mass proposal, which keeps sampled output exactly
distributed as plain decoding's (node/engine/span.py, ``_choose_window``).

``Window`` picks k per pass for the most expected tokens per second, from the passes it has
timed and how far the generation's drafts have been kept; where no window pays it stops
drafting for a few passes (1, 2, 4 ... 32, reset by any acceptance), so a generation with
nothing to draft runs almost exactly as plain decoding does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, Union

__all__ = ["DRAFTERS", "DraftSpec", "Drafter", "PromptLookup", "Window", "make_drafter"]


class Drafter(Protocol):
    """Where drafts come from: it sees every accepted token, in order (the prompt first)."""

    name: str

    def extend(self, tokens: Sequence[int]) -> None:
        """The text grew by ``tokens`` (accepted, or the prompt)."""
        ...

    def propose(self, k: int) -> list[int]:
        """Up to ``k`` tokens likely to follow the text so far (none: nothing to draft)."""
        ...


class PromptLookup:
    """n-gram drafts from the text itself (prompt and output so far).

    For each n in [min_ngram, max_ngram] it keeps, per n-gram, where the token after its latest
    occurrence is (an occurrence counts once a token follows it), so each extend and each
    proposal costs O(max_ngram), whatever the length."""

    name = "ngram"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._next: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]

    def extend(self, tokens: Sequence[int]) -> None:
        for tok in tokens:
            j = len(self.tokens)  # where tok goes: every n-gram ending at j - 1 is now followed
            for n in range(self.min_ngram, self.max_ngram + 1):
                if j >= n:
                    self._next[n][tuple(self.tokens[j - n:j])] = j
            self.tokens.append(int(tok))

    def propose(self, k: int) -> list[int]:
        if k < 1:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            at = self._next[n].get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at:at + k]
        return []


DRAFTERS = ("off", "ngram")
#: What a client speculates with: a name of DRAFTERS, or a factory of fresh drafters (one per
#: generation), e.g. node/engine/draft.py's draft model, which only callers with torch can build.
DraftSpec = Union[str, Callable[[], Drafter]]


def make_drafter(spec: DraftSpec) -> Drafter | None:
    """A fresh drafter for ``spec`` (None for ``off``); ValueError naming the choices for an
    unknown name. A drafter with ``blocking = True`` computes in ``propose`` (the client runs it
    in a worker thread); one with a ``close()`` is closed after its generation."""
    if callable(spec):
        return spec()
    if spec == "off":
        return None
    if spec == "ngram":
        return PromptLookup()
    raise ValueError(f"unknown draft source {spec!r}; choose one of {', '.join(DRAFTERS)}")


@dataclass
class Window:
    """How many drafts the next pass carries (see the module docstring).

    It sizes each window for the most expected tokens per second, from what this generation
    has seen so far:

    - the cost of a pass, timed: plain passes (one position) on their own, window passes as
      seconds = a + b x positions (least squares), because a window leaves the one-row path of
      the matrix products and costs a step more than a plain pass, then a little per position;
    - how far drafts are kept: for each j, the share of the windows that reached their j-th
      draft (every draft before it kept) and kept it too, shrunk toward ``p0`` by ``prior``
      windows' weight; S(j), the product of those shares up to j, is the chance that a window's
      first j drafts are kept, so a window of k drafts is expected to give 1 + S(1) + ... + S(k)
      tokens. Acceptance comes in runs (a passage being copied), which this keeps and a single
      average rate would not.

    Over a slow link a pass costs about the same for 1 position or 16 and long windows pay; on
    loopback a window costs about twice a plain pass and pays only when its drafts are likely
    kept. Until ``cost`` has a fit it follows the drafts' luck (doubling after a whole window
    kept, one past what was kept otherwise), from ``k``."""

    k: int = 4
    k_min: int = 1
    k_max: int = 16
    max_rest: int = 32  # the longest pause in drafting after fruitless windows
    rest: int = 0  # passes left without drafts
    p0: float = 0.8  # the prior chance that a draft is kept when those before it were ...
    prior: float = 2.0  # ... worth this many windows of evidence
    memory: int = 32  # passes (and windows) remembered
    _pause: int = field(default=1, repr=False)  # the next pause's length
    _plain: list[float] = field(default_factory=list, repr=False)  # seconds of plain passes
    _timed: list[tuple[int, float]] = field(default_factory=list, repr=False)  # windows' (positions, seconds)
    _windows: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (drafted, accepted)

    def size(self) -> int:
        """Drafts to ask for this pass (0 while resting)."""
        if self.rest > 0:
            self.rest -= 1
            return 0
        k = self.paying()
        if k is None:
            return self.k
        if k == 0:  # not worth drafting now: probe with the smallest window, then pause longer
            self.rest, self._pause = self._pause, min(self.max_rest, self._pause * 2)
            return self.k_min
        return k

    def kept(self) -> list[float]:
        """S(1..k_max): the estimated chance that a window's first j drafts are all kept."""
        s, out = 1.0, []
        for j in range(1, self.k_max + 1):
            reached = sum(1 for k, a in self._windows if k >= j and a >= j - 1)
            kept = sum(1 for _, a in self._windows if a >= j)
            s *= (kept + self.prior * self.p0) / (reached + self.prior)
            out.append(s)
        return out

    def paying(self) -> int | None:
        """The window size with the most expected tokens per second (0: a plain pass does
        better); None until ``cost`` has a fit."""
        fit = self.cost()
        if fit is None:
            return None
        plain, a, b = fit
        best, best_rate = 0, 1.0 / max(plain, 1e-6)
        expected = 1.0
        for k, s in enumerate(self.kept(), start=1):
            expected += s
            rate = expected / max(a + b * (k + 1), 1e-6)
            if rate > best_rate * 1.02:  # a longer window must pay a little more than noise
                best, best_rate = k, rate
        return best

    def cost(self) -> tuple[float, float, float] | None:
        """(plain, a, b): seconds of a window of n positions a + b x n (least squares over the
        windows timed; b = 0 while one size was), and of a plain pass (the median of those
        timed, or the line's value at one position while none was); None until a window and a
        plain pass were timed, or windows of two sizes."""
        plain = sorted(self._plain)
        pts = self._timed
        if not pts:
            return None
        mx = sum(n for n, _ in pts) / len(pts)
        my = sum(t for _, t in pts) / len(pts)
        var = sum((n - mx) ** 2 for n, _ in pts)
        if not plain and var == 0:
            return None
        b = max(0.0, sum((n - mx) * (t - my) for n, t in pts) / var) if var > 0 else 0.0
        a = max(0.0, my - b * mx)
        return (plain[len(plain) // 2] if plain else a + b), a, b

    def update(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """A pass carried ``drafted`` drafts, ``accepted`` of which were kept, in ``seconds``."""
        if seconds is not None and drafted == 0:
            self._plain = [*self._plain[1 - self.memory:], seconds]
        elif seconds is not None:
            self._timed = [*self._timed[1 - self.memory:], (drafted + 1, seconds)]
        if drafted == 0:
            return
        self._windows = [*self._windows[1 - self.memory:], (drafted, accepted)]
        if accepted == drafted:
            self.k = min(self.k_max, max(self.k, drafted) * 2)
        else:
            self.k = max(self.k_min, accepted + 1)
        if accepted > 0:
            self._pause = 1
        elif drafted <= self.k_min:
            self.rest, self._pause = self._pause, min(self.max_rest, self._pause * 2)
