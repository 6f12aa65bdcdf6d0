"""Spot checks: verify a random sample of a node's steps against independent witnesses.

For a sampled step of a hop, the client opens sessions for the same layers on up to
``witnesses`` other nodes serving them, replays that hop's whole input history there (the
output of a step depends on the KV cache built by every earlier step) and compares the last
outputs. Hidden states agree when ``max|a - b| <= tolerance * max(1, max|b|)``; token ids
(the last span) must be equal. The node is *accused* when the witnesses agree with each other
and not with it. Then the client:

* signs a ``DisputeRecord`` (protocol/disputes.py) naming the node, the witnesses, the step and
  both output digests, and keeps it in ``SpotChecker.disputes``;
* marks the hop's receipts disputed (its next receipt is refused with the reason);
* avoids the node (``PeerHealth.distrust``) and fails the hop over, replaying its history to a
  replacement; the step goes on with the witnesses' output.

A single witness that disagrees proves nothing about who lied: with only one witness, a
mismatch is logged and counted (``inconclusive``) but accuses nobody.

Tolerance: the same model id means byte-identical weights; the same span on the same kind of
device and dtype then gives bit-identical outputs (measured: max difference 0.0 between CPU
fp32 nodes). The default tolerance 1e-2 (relative to the largest magnitude) absorbs kernel
differences between devices and bf16 rounding; a node that adds noise of 1 % of the output's
scale exceeds it. Client-side only: no torch.
"""

from __future__ import annotations

import hashlib
import logging
import random
import struct
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from protocol.codec import Tensor, canonical_pack, itemsize
from protocol.disputes import DisputeRecord, output_digest, sign_dispute
from protocol.ids import DEFAULT_SWARM_ID

from node.client.routing import Hop

if TYPE_CHECKING:
    from node.client.swarm import SwarmClient

__all__ = ["SpotChecker", "max_abs_diff", "outputs_agree"]

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-2
DISTRUST_S = 3600.0  # how long a client avoids a node it caught


def _floats(t: Tensor) -> list[float]:
    data = bytes(t.data)
    if t.dtype == "float32":
        out = array("f")
        out.frombytes(data)
        return list(out)
    if t.dtype == "float16":
        return list(struct.unpack(f"<{len(data) // 2}e", data))
    if t.dtype == "bfloat16":
        halves = struct.unpack(f"<{len(data) // 2}H", data)
        return list(struct.unpack(f"<{len(halves)}f", struct.pack(f"<{len(halves)}I", *(h << 16 for h in halves))))
    return [float(v) for v in struct.unpack(f"<{len(data) // itemsize(t.dtype)}{'q' if t.dtype == 'int64' else 'i'}", data)]


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """Largest element-wise difference; infinity when dtypes or shapes differ."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return float("inf")
    return max((abs(x - y) for x, y in zip(_floats(a), _floats(b))), default=0.0)


def outputs_agree(a: Tensor, b: Tensor, tolerance: float) -> tuple[bool, float]:
    diff = max_abs_diff(a, b)
    if a.dtype in ("int64", "int32"):
        return diff == 0.0, diff
    scale = max([1.0] + [abs(v) for v in _floats(b)])
    return diff <= tolerance * scale, diff


@dataclass
class SpotChecker:
    """Attach to ``SwarmClient.spot_checker``; see the module docstring."""

    rate: float = 0.05  # share of steps checked, per hop
    tolerance: float = DEFAULT_TOLERANCE
    witnesses: int = 2
    rng: random.Random = field(default_factory=random.Random)
    checks: int = 0
    inconclusive: int = 0
    disputes: list[DisputeRecord] = field(default_factory=list)
    checked_peers: dict[str, int] = field(default_factory=dict)
    agreeing_diffs: list[float] = field(default_factory=list)  # measured tolerance headroom

    async def check(self, client: "SwarmClient", chain: Any, index: int, output: Tensor) -> Tensor:
        """Maybe check hop ``index``'s latest step; returns the output to go on with."""
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return output
        h = chain.hops[index]
        witness_hops = self._witness_hops(client, chain.model_id, h.hop)
        if not witness_hops:
            return output
        self.checks += 1
        self.checked_peers[h.hop.peer_id] = self.checked_peers.get(h.hop.peer_id, 0) + 1
        outs: list[tuple[Hop, Tensor]] = []
        for wh in witness_hops:
            got = await self._replay(client, chain, wh, h.history)
            if got is not None:
                outs.append((wh, got))
        if not outs:
            return output
        ref_hop, ref = outs[0]
        agree, diff = outputs_agree(output, ref, self.tolerance)
        if agree:
            self.agreeing_diffs.append(diff)
            return output
        witnesses_agree = len(outs) >= 2 and all(outputs_agree(o, ref, self.tolerance)[0] for _, o in outs[1:])
        if not witnesses_agree:
            self.inconclusive += 1
            log.warning("spot check of %s step %d inconclusive (diff %.3g, %d witnesses)",
                        h.hop.peer_id, h.steps - 1, diff, len(outs))
            return output
        payload, pos, mask = h.history[-1]
        step_map = {"v": 0, "t": "step", "step": h.steps - 1, "input": payload.to_wire(),
                    "positions": pos.to_wire(), "mask": mask.to_wire() if mask is not None else None}
        record = sign_dispute(client.identity, DisputeRecord(
            swarm_id=getattr(client, "swarm_id", DEFAULT_SWARM_ID), model_id=chain.model_id,
            start=h.hop.start, end=h.hop.end, step=h.steps - 1, session_id=h.session_id,
            accused=h.hop.peer_id, witnesses=tuple(w.peer_id for w, _ in outs), reporter=client.identity.peer_id,
            input_digest=hashlib.sha256(canonical_pack(step_map)).digest(),
            accused_digest=output_digest(output), witness_digest=output_digest(ref),
            max_abs_diff=min(diff, 1e300), tolerance=self.tolerance, created_at=time.time(),
        ))
        self.disputes.append(record)
        log.warning("spot check: %s (layers %d:%d) step %d differs from %d witnesses by %.3g; disputed",
                    h.hop.peer_id, h.hop.start, h.hop.end, record.step, len(outs), diff)
        h.account.disputed_reason = f"spot check failed at step {record.step}: max diff {diff:.3g}"
        client.health.distrust(h.hop.peer_id, time.monotonic(), DISTRUST_S)
        from node.client.swarm import HopFailed

        await client._fail_over(chain, index, HopFailed(h.hop, "spot check: output disagrees with witnesses"))
        return ref

    def _witness_hops(self, client: "SwarmClient", model_id: str, hop: Hop) -> list[Hop]:
        avoid = client.health.avoided(time.monotonic()) | {hop.peer_id, client.identity.peer_id}
        found: list[Hop] = []
        records = list(client.known_records(model_id))
        self.rng.shuffle(records)
        for r in records:
            if r.peer_id in avoid or r.state != "online":
                continue
            for s in r.spans:
                if s.model_id == model_id and s.start <= hop.start and hop.end <= s.end:
                    whole = (s.start, s.end) == (hop.start, hop.end)
                    found.append(Hop(r.peer_id, hop.start, hop.end, tuple(r.addrs), None if whole else (s.start, s.end)))
                    break
            if len(found) >= self.witnesses:
                break
        return found

    async def _replay(self, client: "SwarmClient", chain: Any, hop: Hop, history: list) -> Tensor | None:
        from node.client.swarm import HopFailed

        try:
            wh = await client._open_hop(chain, hop)
        except HopFailed as exc:
            log.info("witness %s unavailable: %s", hop.peer_id, exc.reason)
            return None
        try:
            out = None
            for payload, pos, mask in history:
                out = await client._run(wh, payload, pos, mask)
            return out
        except HopFailed as exc:
            log.info("witness %s failed: %s", hop.peer_id, exc.reason)
            return None
        finally:
            await client._close_hop(wh)
