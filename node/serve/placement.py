"""Which layers this node should serve: a pure function of the swarm's records.

The swarm is only as fast as its slowest layer: every token of every session must pass through
all ``num_layers`` layers, so the per-layer total throughput (the sum over the nodes serving
that layer) is a ceiling on what the swarm can deliver there. A joining node therefore serves
the contiguous window whose weakest layer is weakest (a gap, throughput 0, first of all), like
Petals' ``block_selection.py``. A node already serving moves only when moving raises that
minimum by a clear factor (``should_move``), so nodes do not chase each other around.

Everything here takes plain numbers (no records, no I/O) so the daemon can call it with
whatever it read from the DHT and tests can state whole swarms in one line.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from typing import Any

Span = tuple[int, int]
SpanThroughput = tuple[int, int, float]  # (start, end, tokens/s) of one other online node


def layer_throughputs(num_layers: int, spans: Iterable[SpanThroughput]) -> list[float]:
    """Total throughput of each layer: the sum over the spans that cover it.

    Spans are clipped to ``[0, num_layers)``; a negative throughput counts as zero (a record
    cannot make a layer weaker than uncovered).
    """
    totals = [0.0] * num_layers
    for start, end, throughput in spans:
        for layer in range(max(0, start), min(end, num_layers)):
            totals[layer] += max(0.0, float(throughput))
    return totals


def _tiebreak(peer_id: str, start: int) -> bytes:
    # A hash, not the lowest start: two nodes that join at the same moment see the same records
    # and, with a positional tie-break, would both pick the same window and leave the next gap
    # empty until one of them moves. Hashing the peer id spreads them over the tied windows,
    # yet stays deterministic (a restarting node picks the same span; tests are reproducible).
    # The price: ties no longer favour the front of the model, and two nodes can still collide
    # (with probability about 1/ties); should_move repairs that on a later refresh.
    return hashlib.sha256(f"{peer_id}\x00{start}".encode()).digest()


def choose_span(num_layers: int, spans: list[SpanThroughput], *, max_layers: int,
                peer_id: str) -> Span:
    """The window ``[start, start + n)``, ``n = min(max_layers, num_layers)``, to serve.

    ``spans`` are the other online nodes' ``(start, end, throughput)`` for this model. Order of
    preference: the lowest minimum per-layer throughput in the window (fill the weakest layer
    first), then the lowest sum over the window (of two windows holding the same weakest layer,
    relieve the one that is weaker overall), then the window whose edges sit where the
    per-layer throughput changes (no slivers), then a hash of ``(peer_id, start)``.
    An empty swarm starts at 0: the first node of a model serves its front, whose embedding a
    client needs before anything else.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if max_layers < 1:
        raise ValueError(f"max_layers must be >= 1, got {max_layers}")
    length = min(max_layers, num_layers)
    if not spans:
        return (0, length)
    totals = layer_throughputs(num_layers, spans)

    def ragged_edges(s: int) -> int:
        # Edges of the window that fall where the per-layer throughput does not change: in a
        # 20-layer gap a 10-layer window at 12:22 ties with 10:20 on min and sum, but leaves
        # two slivers (10:12, 22:30) that need two more nodes and add hops to every chain.
        e = s + length
        return ((s > 0 and totals[s - 1] == totals[s])
                + (e < num_layers and totals[e - 1] == totals[e]))

    best_start = min(
        range(num_layers - length + 1),
        key=lambda s: (min(totals[s:s + length]), sum(totals[s:s + length]), ragged_edges(s),
                       _tiebreak(peer_id, s)),
    )
    return (best_start, best_start + length)


def should_move(num_layers: int, spans_without_me: list[SpanThroughput], my_span: Span,
                my_throughput: float, *, min_gain: float = 1.5,
                peer_id: str = "") -> Span | None:
    """A new span for this node, or None to stay (hysteresis).

    Both layouts are judged fairly, with this node in them: "stay" is the swarm with my span,
    "move" the swarm with me on ``choose_span`` of the others. Move only when the swarm's
    minimum per-layer throughput after moving is at least ``min_gain`` times (and strictly
    more than) what it is now. When both minimums are zero (the model has a gap either way)
    move only if fewer layers are left uncovered.

    No oscillation against a still swarm: the target depends only on the others' spans, so
    once this node sits there, ``choose_span`` returns the span it already has and this
    returns None. ``min_gain`` > 1 keeps nodes from trading places over small measurement noise.
    """
    if min_gain < 1.0:
        raise ValueError(f"min_gain must be >= 1, got {min_gain}")
    start, end = my_span
    target = choose_span(num_layers, spans_without_me, max_layers=end - start, peer_id=peer_id)
    if target == (start, end):
        return None
    now = layer_throughputs(num_layers, [*spans_without_me, (start, end, my_throughput)])
    after = layer_throughputs(num_layers, [*spans_without_me, (*target, my_throughput)])
    now_min, after_min = min(now), min(after)
    if now_min == 0.0 and after_min == 0.0:
        return target if after.count(0.0) < now.count(0.0) else None
    if after_min > now_min and after_min >= min_gain * now_min:
        return target
    return None


# --- sizing ---------------------------------------------------------------------------------

def layers_that_fit(memory_bytes: int, bytes_per_layer: int, kv_bytes_per_layer: int, *,
                    extra_bytes: int = 0, num_layers: int) -> int:
    """How many layers fit in ``memory_bytes``: weights plus a KV-cache budget per layer.

    ``extra_bytes`` is what the node needs besides the layers (embeddings, head, activations,
    the runtime). Always at least 1 (a node that fits nothing still serves one layer and lets
    the allocator say no) and at most ``num_layers``.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    per_layer = bytes_per_layer + kv_bytes_per_layer
    if per_layer <= 0:
        raise ValueError(f"a layer must cost some memory, got {bytes_per_layer} + "
                         f"{kv_bytes_per_layer} bytes")
    fit = (memory_bytes - extra_bytes) // per_layer
    return max(1, min(num_layers, int(fit)))


def estimate_layer_bytes(config: Mapping[str, Any], dtype_bytes: int,
                         kv_tokens: int) -> tuple[int, int]:
    """``(weight bytes, KV-cache bytes)`` of one decoder layer of a transformers config.

    Assumes the Llama family's layer: q/k/v/o projections (grouped-query: k and v have
    ``num_key_value_heads`` heads), a gated MLP of three matrices, two RMSNorm weights; q/k/v
    biases when ``attention_bias`` is set or the model is qwen2. The KV cache holds a key
    and a value vector per KV head per token: ``2 * kv_heads * head_dim * kv_tokens``.
    """
    h = int(config["hidden_size"])
    inter = int(config["intermediate_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    params = h * q + 2 * h * kv + q * h  # q, k, v, o
    if config.get("attention_bias") or config.get("model_type") == "qwen2":
        params += q + 2 * kv
    params += 3 * h * inter  # gate, up, down
    params += 2 * h  # input and post-attention norms
    return params * dtype_bytes, 2 * kv * kv_tokens * dtype_bytes
