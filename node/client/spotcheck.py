"""Spot checks: verify a random sample of a node's steps against independent witnesses.

For a sampled step of a hop, ``SpotChecker.check`` picks up to ``witnesses`` other nodes serving
the same layers, has the client replay that hop's whole input history there (the output of a
step depends on the KV cache built by every earlier step) and compares the last outputs. Hidden
states agree when ``max|a - b| <= tolerance * max(1, max|b|)``; token ids (the last span) must be
equal. The node is *accused* when the witnesses agree with each other and not with it.

The checker only judges. It reaches the network through the narrow ``CheckContext`` its client
gives it (the records it knows, the peers it avoids, a way to replay a history on a witness,
the identity that signs) and returns a ``Verdict``: skipped, agree, inconclusive, or disagree
with a signed ``DisputeRecord`` (protocol/disputes.py) naming the node, the witnesses, the step
and both output digests. The client decides what follows (node/client/swarm.py): it refuses the
hop's receipts, fails the hop over, avoids the node and publishes the dispute; the step goes on
with the witnesses' output.

A single witness that disagrees proves nothing about who lied: with only one witness, a
mismatch is logged and counted (``inconclusive``) but accuses nobody. Any NaN or infinite value
is disagreement (never agreement), and a witness that answers one is no witness.

Witnesses must be peers routing could pick for this session (``routing.eligible``: not avoided
or excluded by disputes, room for the session's KV reservation ``need_tokens``, online, serving
the checked layers), independent of each other and of the accused (no two share a listening
address: identities behind one address are one operator), and are drawn at random weighted by
history: ``1 + countersigned receipts`` the client holds with each (``CheckContext.history``).

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from protocol.codec import FLOAT_DTYPES, Tensor, canonical_pack, itemsize
from protocol.disputes import DisputeRecord, output_digest, sign_dispute
from protocol.identity import Identity
from protocol.records import CapacityRecord

from node.client.outputs import all_finite, float_values
from node.client.routing import Hop, candidates_from, eligible

__all__ = ["CheckContext", "CheckedStep", "SpotChecker", "Verdict", "max_abs_diff", "outputs_agree"]

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-2

StepInputs = tuple[Tensor, Tensor, Tensor]  # (input, positions, mask) of one step


@dataclass(frozen=True)
class CheckedStep:
    """The step a hop just answered, as the checker sees it."""

    model_id: str
    hop: Hop
    session_id: str
    step: int  # its number within the hop's session
    history: Sequence[StepInputs]  # every input the hop got, this step's last
    output: Tensor  # what the hop answered
    need_tokens: int = 0  # the session's KV reservation (batch x max length): a witness needs the room


class CheckContext(Protocol):
    """What a spot check needs from its client, and nothing more."""

    @property
    def identity(self) -> Identity:
        """Who reports: signs the dispute records, is never a witness."""
        ...

    @property
    def swarm_id(self) -> str: ...

    def known_records(self, model_id: str) -> Sequence[CapacityRecord]:
        """Unexpired records the client knows (no network): where witnesses come from."""
        ...

    def avoided(self) -> frozenset[str]:
        """Peers the client does not use now, backed off or excluded by disputes (never witnesses)."""
        ...

    def history(self, peer_id: str) -> int:
        """Receipts of ``peer_id`` the client has countersigned (how much it has worked with it)."""
        ...

    async def replay(self, witness: Hop, history: Sequence[StepInputs]) -> Tensor | None:
        """Open a session on ``witness``, send it ``history``, close it: the last output, or
        None when the witness failed or could not be reached."""
        ...


@dataclass(frozen=True)
class Verdict:
    """What a check found; ``output`` is what the generation should go on with."""

    outcome: str  # "skipped" (not sampled, no witness), "agree", "inconclusive", "disagree"
    output: Tensor
    diff: float = 0.0
    witnesses: tuple[str, ...] = ()  # peers whose outputs were compared
    dispute: DisputeRecord | None = None  # signed; set exactly when outcome == "disagree"

    @property
    def accused(self) -> str | None:
        return self.dispute.accused if self.dispute is not None else None


def _floats(t: Tensor) -> Sequence[float]:
    if t.dtype in FLOAT_DTYPES:
        return float_values(t)
    data = bytes(t.data)
    return [float(v) for v in struct.unpack(f"<{len(data) // itemsize(t.dtype)}{'q' if t.dtype == 'int64' else 'i'}", data)]


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    """Largest element-wise difference; infinity when dtypes or shapes differ or either has a
    NaN or infinite value (``max`` would skip a NaN difference: NaN compares as nothing)."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) or not (all_finite(a) and all_finite(b)):
        return float("inf")
    return max((abs(x - y) for x, y in zip(_floats(a), _floats(b))), default=0.0)


def outputs_agree(a: Tensor, b: Tensor, tolerance: float) -> tuple[bool, float]:
    """Whether ``a`` matches the reference ``b`` (see the module docstring), and by how much
    it differs; never True when either has a non-finite value."""
    diff = max_abs_diff(a, b)
    if diff == float("inf"):  # also what a scale of infinity would call agreement
        return False, diff
    if a.dtype in ("int64", "int32"):
        return diff == 0.0, diff
    scale = max([1.0] + [abs(v) for v in _floats(b)])
    return diff <= tolerance * scale, diff


@dataclass
class SpotChecker:
    """Checks a sampled share of steps; see the module docstring. Give it to the client
    (``SwarmClient(spot_checker=...)``); its counters tell what it found."""

    rate: float = 0.05  # share of steps checked, per hop
    tolerance: float = DEFAULT_TOLERANCE
    witnesses: int = 2
    rng: random.Random = field(default_factory=random.Random)
    checks: int = 0
    inconclusive: int = 0
    disputes: list[DisputeRecord] = field(default_factory=list)
    checked_peers: dict[str, int] = field(default_factory=dict)
    agreeing_diffs: list[float] = field(default_factory=list)  # measured tolerance headroom

    async def check(self, ctx: CheckContext, step: CheckedStep) -> Verdict:
        """Maybe check ``step`` (with probability ``rate``) against witnesses."""
        skipped = Verdict("skipped", step.output)
        if self.rate <= 0 or self.rng.random() >= self.rate:
            return skipped
        hop = step.hop
        witness_hops = self._witness_hops(ctx, step.model_id, hop, step.need_tokens)
        if not witness_hops:
            return skipped
        self.checks += 1
        self.checked_peers[hop.peer_id] = self.checked_peers.get(hop.peer_id, 0) + 1
        outs: list[tuple[Hop, Tensor]] = []
        for wh in witness_hops:
            got = await ctx.replay(wh, step.history)
            if got is not None and all_finite(got):  # a NaN answer witnesses nothing
                outs.append((wh, got))
        if not outs:
            return skipped
        witnesses = tuple(w.peer_id for w, _ in outs)
        ref = outs[0][1]
        agree, diff = outputs_agree(step.output, ref, self.tolerance)
        if agree:
            self.agreeing_diffs.append(diff)
            return Verdict("agree", step.output, diff, witnesses)
        witnesses_agree = len(outs) >= 2 and all(outputs_agree(o, ref, self.tolerance)[0] for _, o in outs[1:])
        if not witnesses_agree:
            self.inconclusive += 1
            log.warning("spot check of %s step %d inconclusive (diff %.3g, %d witnesses)",
                        hop.peer_id, step.step, diff, len(outs))
            return Verdict("inconclusive", step.output, diff, witnesses)
        record = sign_dispute(ctx.identity, self._dispute(ctx, step, witnesses, ref, diff))
        self.disputes.append(record)
        log.warning("spot check: %s (layers %d:%d) step %d differs from %d witnesses by %.3g; disputed",
                    hop.peer_id, hop.start, hop.end, record.step, len(outs), diff)
        return Verdict("disagree", ref, diff, witnesses, record)

    def _dispute(self, ctx: CheckContext, step: CheckedStep, witnesses: tuple[str, ...],
                 ref: Tensor, diff: float) -> DisputeRecord:
        payload, pos, mask = step.history[-1]
        step_map = {"v": 0, "t": "step", "step": step.step, "input": payload.to_wire(),
                    "positions": pos.to_wire(), "mask": mask.to_wire() if mask is not None else None}
        return DisputeRecord(
            swarm_id=ctx.swarm_id, model_id=step.model_id, start=step.hop.start, end=step.hop.end,
            step=step.step, session_id=step.session_id, accused=step.hop.peer_id, witnesses=witnesses,
            reporter=ctx.identity.peer_id, input_digest=hashlib.sha256(canonical_pack(step_map)).digest(),
            accused_digest=output_digest(step.output), witness_digest=output_digest(ref),
            max_abs_diff=min(diff, 1e300), tolerance=self.tolerance, created_at=time.time(),
        )

    def _witness_hops(self, ctx: CheckContext, model_id: str, hop: Hop, need_tokens: int) -> list[Hop]:
        """Up to ``self.witnesses`` hops for ``hop``'s layers on other peers (module docstring)."""
        avoid = ctx.avoided() | {hop.peer_id, ctx.identity.peer_id}
        records = list(ctx.known_records(model_id))
        online = [r for r in records if r.state == "online"]
        taken_addrs = {_where(a) for r in records if r.peer_id == hop.peer_id for a in r.addrs}
        taken_addrs |= {_where(a) for a in hop.addrs}
        # Efraimidis-Spirakis: sorting by u ** (1 / w) (u uniform) draws without replacement, each
        # next peer with probability proportional to its weight w = 1 + what the client has been
        # through with it, so a crowd of fresh keys counts for little against known peers.
        keyed = []
        for c in candidates_from(online, model_id):
            if c.start <= hop.start and hop.end <= c.end and eligible(c, avoid=avoid, need_tokens=need_tokens):
                keyed.append((self.rng.random() ** (1.0 / (1 + max(0, ctx.history(c.peer_id)))), c))
        keyed.sort(key=lambda kc: (-kc[0], kc[1].peer_id))
        found: list[Hop] = []
        for _, c in keyed:
            if len(found) >= self.witnesses:
                break
            where = {_where(a) for a in c.addrs}
            if any(f.peer_id == c.peer_id for f in found) or taken_addrs & where:
                continue  # the same peer twice, or one operator behind two identities
            taken_addrs |= where
            whole = (c.start, c.end) == (hop.start, hop.end)
            found.append(Hop(c.peer_id, hop.start, hop.end, c.addrs, None if whole else (c.start, c.end)))
        return found


def _where(addr: str) -> str:
    """A listening address without its ``/p2p/<peer id>`` part (which differs per identity)."""
    return addr.split("/p2p/", 1)[0]
