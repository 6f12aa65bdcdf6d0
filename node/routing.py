"""Which chain of peers a client should use: a pure function of the swarm's records.

A chain is a list of hops whose spans tile the model's layers ``[0, num_layers)`` with no gap
and no overlap: hop ``i`` ends where hop ``i + 1`` starts. Among all such chains the client
prefers the one with the lowest expected time per token, counting each hop's advertised
throughput and a fixed per-hop cost, so that fewer hops win when speeds are close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

# What one more hop costs per token, in seconds, before measured round-trip times are known.
# FACTS.md: a py-libp2p round trip between processes on loopback is about 4 ms.
DEFAULT_HOP_COST_S = 0.005


@dataclass(frozen=True)
class Candidate:
    """One peer able to serve layers ``[start, end)`` of a model."""

    peer_id: str
    start: int
    end: int
    throughput: float  # tokens/s the peer measured for this span
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()


class NoRoute(Exception):
    """No chain of candidates covers every layer."""

    def __init__(
        self, num_layers: int, missing: list[tuple[int, int]], peers_seen: list[str], detail: str = ""
    ):
        self.num_layers = num_layers
        self.missing = missing
        self.peers_seen = peers_seen
        gaps = ", ".join(f"{a}:{b}" for a, b in missing) or "none (spans do not chain)"
        seen = ", ".join(peers_seen) or "none"
        head = detail or f"no chain of peers covers layers 0:{num_layers}"
        super().__init__(
            f"{head}; missing layers: {gaps}; "
            f"peers seen: {seen}. Start a node serving the missing layers "
            f"(shiza node run --layers START:END) or bootstrap from another peer."
        )


def missing_layers(num_layers: int, spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The maximal layer ranges that no span covers."""
    covered = [False] * num_layers
    for start, end in spans:
        for layer in range(max(0, start), min(end, num_layers)):
            covered[layer] = True
    gaps: list[tuple[int, int]] = []
    layer = 0
    while layer < num_layers:
        if covered[layer]:
            layer += 1
            continue
        gap_start = layer
        while layer < num_layers and not covered[layer]:
            layer += 1
        gaps.append((gap_start, layer))
    return gaps


def hop_time(candidate: Candidate, hop_cost_s: float = DEFAULT_HOP_COST_S) -> float:
    """Expected seconds per token through this hop."""
    compute = 1.0 / candidate.throughput if candidate.throughput > 0 else 1.0
    return compute + hop_cost_s


def find_chain(
    num_layers: int,
    candidates: Iterable[Candidate],
    *,
    avoid: frozenset[str] = frozenset(),
    hop_cost_s: float = DEFAULT_HOP_COST_S,
) -> list[Hop]:
    """The fastest chain of whole spans that tiles ``[0, num_layers)``.

    Shortest path over layer boundaries (a DAG: every edge goes forward), so it is exact and
    linear in the number of candidates. Ties break on the peer id so every client picks the
    same chain from the same records.
    """
    usable = sorted(
        (c for c in candidates if c.peer_id not in avoid and 0 <= c.start < c.end <= num_layers),
        key=lambda c: (c.start, c.end, c.peer_id),
    )
    best: dict[int, tuple[float, int, list[Candidate]]] = {0: (0.0, 0, [])}
    for boundary in range(num_layers):
        if boundary not in best:
            continue
        cost, hops, path = best[boundary]
        for cand in usable:
            if cand.start != boundary:
                continue
            new = (cost + hop_time(cand, hop_cost_s), hops + 1, path + [cand])
            old = best.get(cand.end)
            if old is None or (new[0], new[1]) < (old[0], old[1]):
                best[cand.end] = new
    if num_layers not in best:
        seen = sorted({c.peer_id for c in usable})
        raise NoRoute(num_layers, missing_layers(num_layers, [(c.start, c.end) for c in usable]), seen)
    return [Hop(c.peer_id, c.start, c.end, c.addrs) for c in best[num_layers][2]]
