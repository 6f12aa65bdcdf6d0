"""Which chain of peers a client should use: a pure function of the swarm's records.

A chain is a list of hops whose layer ranges tile the model's layers ``[0, num_layers)`` with
no gap and no overlap: hop ``i`` ends where hop ``i + 1`` starts. Among all such chains the
client prefers the one with the lowest expected time per token: each hop costs its share of
the peer's compute (``1 / throughput`` for the whole span, pro rata for part of it) plus one
network round trip (measured if known, else ``DEFAULT_HOP_COST_S``, or ``relayed_hop_cost`` for a
peer reached only through a relay), so fewer hops win when speeds are close, and a direct peer
wins over a relayed one of the same speed until round trips are measured.

With ``allow_partial`` a hop may run only a sub-range ``[a, b)`` of a peer's span, so
overlapping spans chain (``0:10`` on A, then ``10:30`` on B which serves ``5:30``). The search
stays exact: per-hop cost is linear in the layers used, so where two spans overlap the best
place to cross is at an end of the overlap, i.e. at some candidate's start or end; those (and
0 and ``num_layers``) are the only boundaries the shortest path needs to consider.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from protocol.records import CapacityRecord

from node.client.errors import NoRoute

__all__ = ["DEFAULT_HOP_COST_S", "RELAY_FORWARD_S", "Candidate", "Hop", "NoRoute", "candidates_from", "eligible",
           "find_chain", "find_chain_between", "hop_time", "missing_layers", "num_layers_of", "relayed_hop_cost",
           "relayed_only"]

# What one more hop costs per token, in seconds, before measured round-trip times are known.
# FACTS.md: a py-libp2p round trip between processes on loopback is about 4 ms.
DEFAULT_HOP_COST_S = 0.005
# What a relay adds to a round trip besides the second pair of legs: py-libp2p's circuit relay
# forwards every frame through the relay's yamux and Noise in Python (benchmarks/wan/relay_probe.py).
RELAY_FORWARD_S = 0.01


def relayed_only(addrs: Iterable[str]) -> bool:
    """Whether a peer with these addresses is reached only through relays (SPEC 2.7): every
    address is a ``/p2p-circuit`` one. No address at all is not relayed (the peer is unknown)."""
    addrs = list(addrs)
    return bool(addrs) and all("/p2p-circuit" in a for a in addrs)


def relayed_hop_cost(hop_cost_s: float = DEFAULT_HOP_COST_S) -> float:
    """The round trip assumed for a relayed peer before one is measured: client to relay to peer
    and back is two direct round trips, plus the relay's own forwarding."""
    return 2 * hop_cost_s + RELAY_FORWARD_S


@dataclass(frozen=True)
class Candidate:
    """One peer able to serve layers ``[start, end)`` of a model."""

    peer_id: str
    start: int
    end: int
    throughput: float  # tokens/s the peer measured for this span
    addrs: tuple[str, ...] = ()
    rtt_s: float | None = None  # measured round trip to the peer; None: not measured yet
    cache_tokens_left: int | None = None  # KV-cache room the peer advertised; None: unknown

    @property
    def relayed(self) -> bool:
        return relayed_only(self.addrs)


@dataclass(frozen=True)
class Hop:
    """Run layers ``[start, end)`` on ``peer_id``.

    ``span`` is None when that is the peer's whole span; otherwise it is the peer's whole span
    and ``start:end`` a sub-range of it (the chain crosses overlapping spans): the session on
    that peer must be opened for the sub-range only (the engine's ``layers=``).
    """

    peer_id: str
    start: int
    end: int
    addrs: tuple[str, ...] = ()
    span: tuple[int, int] | None = None  # the peer's whole span when start:end is a part of it

    @property
    def partial(self) -> bool:
        return self.span is not None and self.span != (self.start, self.end)


def candidates_from(records: Sequence[CapacityRecord], model_id: str) -> list[Candidate]:
    """One candidate per span of ``model_id`` that the records advertise."""
    out = []
    for r in records:
        for span in r.spans:
            if span.model_id == model_id:
                out.append(Candidate(r.peer_id, span.start, span.end, r.throughput, tuple(r.addrs),
                                     cache_tokens_left=r.cache_tokens_left))
    return out


def num_layers_of(records: Sequence[CapacityRecord], model_id: str) -> int | None:
    """How many layers ``model_id`` has, as its records say (None: no record of it)."""
    for r in records:
        for span in r.spans:
            if span.model_id == model_id:
                return span.num_layers
    return None


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


def hop_time(candidate: Candidate, hop_cost_s: float = DEFAULT_HOP_COST_S,
             layers: tuple[int, int] | None = None) -> float:
    """Expected seconds per token through this hop, running ``layers`` (default: its span).

    The peer's throughput is for its whole span; part of it costs pro rata. The network part
    is the measured round trip when there is one (through the relay, for a relayed peer), else
    ``hop_cost_s``, or ``relayed_hop_cost(hop_cost_s)`` for a peer reached only through relays.
    """
    compute = 1.0 / candidate.throughput if candidate.throughput > 0 else 1.0
    if layers is not None:
        compute *= (layers[1] - layers[0]) / (candidate.end - candidate.start)
    if candidate.rtt_s is not None:
        network = candidate.rtt_s
    else:
        network = relayed_hop_cost(hop_cost_s) if candidate.relayed else hop_cost_s
    return compute + network


def eligible(candidate: Candidate, *, avoid: frozenset[str] = frozenset(), need_tokens: int = 0) -> bool:
    """Whether routing may use ``candidate`` for a session reserving ``need_tokens``: not
    avoided, and room for it when the peer advertised its room (spot checks' witnesses too)."""
    return candidate.peer_id not in avoid and (
        candidate.cache_tokens_left is None or candidate.cache_tokens_left >= need_tokens)


def find_chain(
    num_layers: int,
    candidates: Iterable[Candidate],
    *,
    avoid: frozenset[str] = frozenset(),
    hop_cost_s: float = DEFAULT_HOP_COST_S,
    need_tokens: int = 0,
    allow_partial: bool = False,
) -> list[Hop]:
    """The fastest chain that tiles ``[0, num_layers)``.

    Skips avoided peers and peers whose ``cache_tokens_left`` is known and below
    ``need_tokens`` (what the session will reserve: batch size times max length). Without
    ``allow_partial`` every hop runs a peer's whole span; with it a hop may run a sub-range
    (see the module docstring), which a server must accept before clients turn it on.

    Shortest path over layer boundaries (a DAG: every edge goes forward), exact. Ties break on
    fewer hops, then on the peers' ids and ranges in chain order, so every client picks the
    same chain from the same records whatever order they arrive in.
    """
    in_model = [c for c in candidates if 0 <= c.start < c.end <= num_layers]
    skipped = sorted({c.peer_id for c in in_model if not eligible(c, avoid=avoid, need_tokens=need_tokens)})
    usable = sorted(
        (c for c in in_model if eligible(c, avoid=avoid, need_tokens=need_tokens)),
        key=lambda c: (c.start, c.end, c.peer_id, c.throughput, c.rtt_s or 0.0),
    )
    if allow_partial:
        points = sorted({0, num_layers, *(c.start for c in usable), *(c.end for c in usable)})
    else:
        points = sorted({0, num_layers, *(c.end for c in usable)})
    # best[b] = (seconds per token, hops, path of (candidate, a, b)) to reach boundary b.
    Step = tuple[Candidate, int, int]
    best: dict[int, tuple[float, int, tuple[tuple[str, int, int], ...], list[Step]]] = {
        0: (0.0, 0, (), [])}
    for a in points:
        if a not in best or a >= num_layers:
            continue
        cost, hops, key, path = best[a]
        for cand in usable:
            if allow_partial:
                if not cand.start <= a < cand.end:
                    continue
                ends = [b for b in points if a < b <= cand.end]
            else:
                if cand.start != a:
                    continue
                ends = [cand.end]
            for b in ends:
                layers = None if (a, b) == (cand.start, cand.end) else (a, b)
                new = (cost + hop_time(cand, hop_cost_s, layers), hops + 1,
                       key + ((cand.peer_id, a, b),), path + [(cand, a, b)])
                old = best.get(b)
                # Rounded so that chains equal on paper but summed in another order tie.
                if old is None or (round(new[0], 12), *new[1:3]) < (round(old[0], 12), *old[1:3]):
                    best[b] = new
    if num_layers not in best:
        seen = sorted({c.peer_id for c in usable})
        detail = ""
        if skipped:
            detail = (f"no chain of peers covers layers 0:{num_layers} (skipped as avoided "
                      f"or short of {need_tokens} cache tokens: {', '.join(skipped)})")
        raise NoRoute(num_layers, missing_layers(num_layers, [(c.start, c.end) for c in usable]),
                      seen, detail)
    return [Hop(c.peer_id, a, b, c.addrs, None if (a, b) == (c.start, c.end) else (c.start, c.end))
            for c, a, b in best[num_layers][3]]


def find_chain_between(
    start: int,
    end: int,
    candidates: Iterable[Candidate],
    **kwargs: object,
) -> list[Hop]:
    """The fastest chain for layers ``[start, end)`` only (failover replaces part of a chain).

    Candidates are clipped to the range (their throughput scaled to the layers they keep), so
    hops may be sub-ranges of a peer's span; ``Hop.span`` then names the peer's whole span.
    """
    clipped: list[Candidate] = []
    spans: dict[tuple[str, int, int], tuple[int, int]] = {}
    for c in candidates:
        a, b = max(c.start, start), min(c.end, end)
        if a >= b:
            continue
        scale = (c.end - c.start) / (b - a)
        clipped.append(replace(c, start=a - start, end=b - start, throughput=c.throughput * scale))
        spans[(c.peer_id, a - start, b - start)] = (c.start, c.end)
    try:
        chain = find_chain(end - start, clipped, allow_partial=True, **kwargs)  # type: ignore[arg-type]
    except NoRoute as exc:
        missing = [(a + start, b + start) for a, b in exc.missing]
        raise NoRoute(end, missing, exc.peers_seen, detail=f"no peer can take over layers {start}:{end}") from None
    hops = []
    for h in chain:
        full = spans[(h.peer_id, h.span[0] if h.span else h.start, h.span[1] if h.span else h.end)]
        a, b = h.start + start, h.end + start
        hops.append(Hop(h.peer_id, a, b, h.addrs, None if full == (a, b) else full))
    return hops
