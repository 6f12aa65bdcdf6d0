"""Draft sources for speculative decoding across the swarm (SPEC.md 9.7), and the adaptive window.

A generation that speculates sends the pipeline, in one pass, its next token and up to k drafts
of the tokens after it; the last hop answers its own choice at every position and the client
keeps the drafts up to the first that differs (node/client/swarm.py). Where the drafts come from
is a ``Drafter``, chosen per generation by name (``make_drafter``):

    off     no drafts: plain decoding, one token per pass
    ngram   prompt lookup: the tokens that followed the latest earlier occurrence of the text's
            last n tokens (n = 3, then 2, then 1). Needs no model and no torch, so every client
            has it; strong when the answer reuses the input (editing, extraction, summaries, code)

A drafter's proposals must be a deterministic function of the text so far: the last hop's
acceptance rule treats a draft as a point-mass proposal, which keeps sampled output exactly
distributed as plain decoding's (node/engine/span.py, ``_choose_window``).

``Window`` picks k per pass: it doubles while whole windows are accepted, falls back to one past
what was accepted when a window is not, and after a window with nothing accepted at its
smallest size stops drafting for a few passes (1, 2, 4 ... 32, reset by any acceptance), so a
generation with nothing to draft runs almost exactly as plain decoding does.
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

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1) -> None:
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

    The size follows the drafts' luck (doubling after a whole window kept, one past what was
    kept otherwise) and is capped by what pays: from the passes it has timed it fits
    seconds per pass = a + b x positions, from the windows it has seen the share of drafts kept
    (alpha, a moving average), and takes the k that maximises expected tokens per second,
    (1 - alpha^(k+1)) / (1 - alpha) / (a + b (k + 1)). Over a slow link a pass costs the same
    for 1 position or 16 (b is small next to a) and long windows pay; on loopback each position
    costs about as much as the pass itself, so only windows likely to be kept are sent."""

    k: int = 4
    k_min: int = 1
    k_max: int = 16
    max_rest: int = 32  # the longest pause in drafting after fruitless windows
    rest: int = 0  # passes left without drafts
    alpha: float = 0.5  # moving average of the share of drafts kept
    _pause: int = field(default=1, repr=False)  # the next pause's length
    _timed: list[tuple[int, float]] = field(default_factory=list, repr=False)  # (positions, seconds)

    def size(self) -> int:
        """Drafts to ask for this pass (0 while resting)."""
        if self.rest > 0:
            self.rest -= 1
            return 0
        k = min(self.k, self.paying())
        if k == 0:  # not worth drafting now: probe with the smallest window, then pause longer
            self.rest, self._pause = self._pause, min(self.max_rest, self._pause * 2)
            return self.k_min
        return k

    def paying(self) -> int:
        """The window size with the most expected tokens per second under the fitted cost."""
        fit = self.cost()
        if fit is None:
            return self.k_max
        a, b = fit
        best, best_rate = 0, 0.0
        for k in range(self.k_max + 1):
            expected = float(k + 1) if self.alpha >= 1.0 else (1 - self.alpha ** (k + 1)) / (1 - self.alpha)
            rate = expected / max(a + b * (k + 1), 1e-6)
            if rate > best_rate * 1.02:  # a longer window must pay a little more than noise
                best, best_rate = k, rate
        return max(best, self.k_min) if best > 0 else 0

    def cost(self) -> tuple[float, float] | None:
        """(a, b) of seconds per pass = a + b x positions, least squares over the last passes
        timed; None until two different sizes were timed."""
        pts = self._timed
        if len({n for n, _ in pts}) < 2:
            return None
        mx = sum(n for n, _ in pts) / len(pts)
        my = sum(t for _, t in pts) / len(pts)
        var = sum((n - mx) ** 2 for n, _ in pts)
        b = max(0.0, sum((n - mx) * (t - my) for n, t in pts) / var)
        return max(0.0, my - b * mx), b

    def update(self, drafted: int, accepted: int, seconds: float | None = None) -> None:
        """A pass carried ``drafted`` drafts, ``accepted`` of which were kept, in ``seconds``."""
        if seconds is not None:
            self._timed = [*self._timed[-23:], (drafted + 1, seconds)]
        if drafted == 0:
            return
        self.alpha = 0.7 * self.alpha + 0.3 * (accepted / drafted)
        if accepted == drafted:
            self.k = min(self.k_max, max(self.k, drafted) * 2)
        else:
            self.k = max(self.k_min, accepted + 1)
        if accepted > 0:
            self._pause = 1
        elif drafted <= self.k_min:
            self.rest, self._pause = self._pause, min(self.max_rest, self._pause * 2)
