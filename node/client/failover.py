"""The client's failover half: what a generation's chain is, and how a hop that failed, stalled
or was caught by a spot check is replaced mid-generation (a chain for its layers opened, its
history replayed) while the text goes on unchanged (SPEC.md 9.4, 9.6, 19).

``Failover`` is a part of ``SwarmClient`` (node/client/swarm.py) kept apart to keep each file
about one thing: it uses the client's sessions, health, pacing, records and DHT.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import trio

from protocol.codec import Tensor
from protocol.disputes import sign_dispute
from protocol.identity import Identity
from protocol.errors import Timeout
from protocol.records import CapacityRecord

from node.client.disputes import publish_dispute
from node.client.errors import LayersLost, NoRoute, PeerError, PeerUnreachable
from node.client.hops import HopSession, SessionSpec, StepInput
from node.client.routing import Hop, candidates_from, find_chain_between
from node.client.spotcheck import Verdict
from node.net.wire import concat_steps

log = logging.getLogger("node.client.swarm")

MAX_FAILOVERS = 8  # per generation
FAILOVER_LOOKUP_S = 15.0  # bound on a fresh DHT lookup during failover
DISTRUST_S = 3600.0  # how long the client avoids a node its spot check caught
REVIVAL_WAIT_S = 10.0  # a generation's failovers wait at most this long in all for a failed peer
REVIVAL_POLL_S = 1.0  # how often they look up the records meanwhile
RETRY_FAILED_AFTER_S = 3.0  # then they try the peers that failed without a newer record too


def still_failed(failed: dict[str, int], records: Sequence[CapacityRecord]) -> frozenset[str]:
    """The peers of ``failed`` (peer id -> the sequence number of its record when it failed, -1
    if none was known) that have shown no life since: no record of theirs with a higher
    sequence. A node that restarts publishes a fresh record at once, and every live node
    republishes within a third of its record's lifetime; a peer that did is tried again (at
    most MAX_FAILOVERS failovers in all). Sequence numbers, not clocks: the node's clock and
    ours need not agree."""
    newest = {r.peer_id: r.seq for r in records}
    return frozenset(p for p, seq in failed.items() if newest.get(p, -1) <= seq)


@dataclass
class Chain:
    spec: SessionSpec
    hops: list[HopSession] = field(default_factory=list)
    retired: list[HopSession] = field(default_factory=list)  # replaced by failover
    failovers: int = 0
    # Peers that failed this generation -> their record's sequence number then: never its
    # fallback until they publish a newer record (``still_failed``).
    failed: dict[str, int] = field(default_factory=dict)
    revival_left_s: float = REVIVAL_WAIT_S  # what its failovers may still wait for a failed peer
    silent: set[str] = field(default_factory=set)  # of those, the ones that failed unreachable or stalled
    push: bool = False  # link the hops (SPEC 9.6)
    relink: bool = False  # sessions were replaced under push: link the chain again
    pushed_steps: int = 0
    passes: int = 0
    drafted: int = 0
    accepted: int = 0
    out: list[list[int]] = field(default_factory=list)  # each row's tokens so far (the generation's)

    def open_spec(self) -> SessionSpec:
        """What a session opened now gets: under a grammar or penalties, each row's tokens so
        far, so a replacement's grammar and counts resume where the text stands (SPEC 9.8, 9.10)."""
        sampling = self.spec.sampling
        if (sampling.grammar is None and not sampling.penalized) or not any(self.out):
            return self.spec
        prefix = tuple(tuple(row) for row in self.out)
        return replace(self.spec, sampling=replace(sampling, grammar_prefix=prefix))


class Failover:
    """``SwarmClient``'s failover methods (a mixin: the attributes it uses are the client's)."""

    health: Any
    sessions: Any
    replay: str
    dht: Any
    identity: Identity
    no_push: set[str]
    failovers_total: int

    def _mark_failed(self, chain: Chain, peer_id: str, failure: PeerError) -> None:
        """``peer_id`` failed in ``chain``'s generation with ``failure``: back off from it, and
        remember which of its records it failed under (``still_failed``) and whether it failed
        silently (unreachable or stalled: it may just be back; one that answered an error, a
        refusal above all, is not asked again in this generation)."""
        self.health.failed(peer_id, time.monotonic())
        seqs = [r.seq for r in self.known_records(chain.spec.model_id) if r.peer_id == peer_id]
        chain.failed[peer_id] = max(seqs, default=-1)
        if isinstance(failure, (PeerUnreachable, Timeout)):
            chain.silent.add(peer_id)
        else:
            chain.silent.discard(peer_id)

    async def _replacement(self, spec: SessionSpec, start: int, end: int,
                           chain: Chain | None = None) -> list[Hop]:
        """The fastest chain for layers ``start:end`` among peers not backed off and not failed
        in ``chain``'s generation (``still_failed``): from the records already known first
        (asking the DHT can wait on the very peer that failed), then from a fresh lookup
        (bounded). When neither has one but a peer that failed served these layers, the records
        are looked up again, every REVIVAL_POLL_S, for what is left of the generation's
        REVIVAL_WAIT_S: a node killed and started again is back within seconds under a newer
        record; after RETRY_FAILED_AFTER_S the peers that failed silently are tried as they are
        (a node that stalled and goes on publishes nothing new). NoRoute when none comes."""
        failed = chain.failed if chain is not None else {}
        silent = frozenset(chain.silent) if chain is not None else frozenset()

        def find(strict: bool = True) -> list[Hop]:
            known = self.known_records(spec.model_id)
            candidates = self._candidates(known, spec.model_id)
            return self._with_fallback(lambda avoid: find_chain_between(
                start, end, candidates, avoid=avoid, need_tokens=spec.batch * spec.max_length),
                still_failed(failed, known) - (frozenset() if strict else silent))

        async def look_up() -> None:
            with trio.move_on_after(FAILOVER_LOOKUP_S):
                await self.records(spec.model_id)

        try:
            return find()
        except NoRoute:
            pass
        await look_up()
        try:
            return find()
        except NoRoute as exc:
            missing = exc
        if chain is None or not any(c.peer_id in failed and c.start < end and start < c.end
                                    for c in candidates_from(self.known_records(spec.model_id), spec.model_id)):
            raise missing  # nobody who might come back served these layers
        t0 = trio.current_time()
        try:
            with trio.move_on_after(max(0.0, chain.revival_left_s)):
                while True:
                    await trio.sleep(REVIVAL_POLL_S)  # polling the DHT for a record, bounded above
                    await look_up()
                    for strict in (True, False):
                        if strict or trio.current_time() - t0 >= RETRY_FAILED_AFTER_S:
                            try:
                                return find(strict)
                            except NoRoute as exc:
                                missing = exc
        finally:
            chain.revival_left_s -= trio.current_time() - t0
        raise missing

    async def _reopen_unsupported(self, chain: Chain) -> None:
        """Open again, on the same peers, the hops whose session ended on a Link they did not
        know, replaying what they had done."""
        for i, h in enumerate(chain.hops):
            if h.hop.peer_id in self.no_push and not h.pushed_in and h.stream_ended_on_link:
                await h.reset()
                new = await self._open_paced(chain.open_spec(), h.hop)
                for payload, pos, mask in h.history:
                    await self.sessions.step(new, payload, pos, mask)
                chain.retired.append(h)
                chain.hops[i] = new

    async def _restart_after(self, chain: Chain, start: int) -> None:
        """Under push, open again the sessions of hops ``start`` onwards on the same peers and
        replay their history: a hop that took a push of the failed step holds one step more
        than we know of. They are linked again after the step (``chain.relink``)."""
        if not any(h.pushed_in for h in chain.hops[start:]):
            return
        chain.relink = True
        k = start
        while k < len(chain.hops):
            old = chain.hops[k]
            old.pushed_in = old.pushing = False
            if start > 0:
                chain.hops[start - 1].pushing = False
            await self.sessions.close(old)  # bounded, never raises: its receipts stay
            try:
                new = await self._open_paced(chain.open_spec(), old.hop)
                for payload, pos, mask in old.history:
                    await self.sessions.step(new, payload, pos, mask)
            except PeerError as exc:
                chain.hops[k] = old  # replace it as any failed hop: its history is replayed
                k += await self._fail_over(chain, k, exc)
                continue
            chain.retired.append(old)
            chain.hops[k] = new
            k += 1

    async def _caught(self, chain: Chain, index: int, verdict: Verdict,
                      witness_receipts: dict[str, bytes]) -> int:
        """A spot check caught hop ``index``: refuse its receipts, close its session (for its
        final receipt, the dispute's evidence), replace it (its history is replayed, the checked
        step included), avoid it and publish the dispute with the receipts of the accused and
        the witnesses (SPEC 19). Returns how many hops replaced it (the step goes on after them
        with the witnesses' output)."""
        record = verdict.dispute
        assert record is not None
        h = chain.hops[index]
        h.account.disputed_reason = f"spot check failed at step {record.step}: max diff {verdict.diff:.3g}"
        await self.sessions.close(h)  # bounded, never raises: its final receipt is disputed
        receipts = h.account.receipts  # its last one (the final, disputed) is the evidence
        evidence = [receipts[-1][0].to_bytes()] if receipts else []
        evidence += [witness_receipts[w] for w in record.witnesses if w in witness_receipts]
        replaced_by = await self._fail_over(chain, index, PeerError(
            "spot check: output disagrees with witnesses", peer_id=h.hop.peer_id,
            layers=(h.hop.start, h.hop.end)))
        self.health.distrust(record.accused, time.monotonic(), DISTRUST_S)  # after failover's back-off
        if len(evidence) == 1 + len(record.witnesses):
            signed = sign_dispute(self.identity, replace(record, evidence=tuple(evidence), signature=b""))
            await publish_dispute(self.dht, signed)  # bounded, best effort, never raises
        else:  # readers would not count it (SPEC 19): the accused or a witness sent no receipt
            log.warning("not publishing the dispute against %s: %d of %d receipts to show for it",
                        record.accused, len(evidence), 1 + len(record.witnesses))
        return replaced_by

    async def _fail_over(self, chain: Chain, index: int, failure: PeerError) -> int:
        """Replace hop ``index`` by a chain for its layers and replay its history there.
        Returns the number of hops that replaced it."""
        failed = chain.hops[index]
        log.warning("hop %s (layers %d:%d) failed: %s; failing over",
                    failed.hop.peer_id, failed.hop.start, failed.hop.end, failure.reason)
        self._mark_failed(chain, failed.hop.peer_id, failure)
        chain.failovers += 1
        self.failovers_total += 1
        if chain.failovers > MAX_FAILOVERS:
            raise LayersLost(failed.hop.start, failed.hop.end, f"gave up after {MAX_FAILOVERS} failovers")
        with trio.CancelScope(shield=True):
            await failed.reset()
        spec = chain.open_spec()
        for attempt in range(MAX_FAILOVERS):
            try:
                hops = await self._replacement(spec, failed.hop.start, failed.hop.end, chain)
            except NoRoute as exc:
                raise LayersLost(failed.hop.start, failed.hop.end, str(exc)) from None
            history = failed.history
            sampled = failed.hop.end == hops[-1].end and spec.sampling.temperature > 0
            if self.replay == "merged" and len(history) > 1 and not sampled:
                # One prefill of the whole history: much faster, equal up to float rounding
                # (greedy text may differ in rare near-ties, hence not the default).
                history = [tuple(concat_steps([h[k] for h in history]) for k in range(3))]  # type: ignore[misc]
            try:
                replacement = [await self._open_paced(spec, hop) for hop in hops]
                for payload, pos, mask in history:  # rebuild the KV caches
                    for h in replacement:
                        payload = await self.sessions.step(h, payload, pos, mask)
            except PeerError as exc:
                self._mark_failed(chain, exc.peer_id, exc)
                log.warning("replacement %s failed too: %s", exc.peer_id, exc.reason)
                continue
            chain.retired.append(failed)
            chain.hops[index:index + 1] = replacement
            log.warning("failover to %s after replaying %d steps",
                        ", ".join(f"{h.hop.peer_id} {h.hop.start}:{h.hop.end}" for h in replacement),
                        len(failed.history))
            return len(replacement)
        raise LayersLost(failed.hop.start, failed.hop.end, "every replacement failed")


class Witnessing:
    """What a spot check of one chain may use of its client (a ``spotcheck.CheckContext``)."""

    def __init__(self, client: Any, chain: Chain) -> None:  # a SwarmClient
        self._client = client
        self._chain = chain
        self.receipts: dict[str, bytes] = {}  # witness -> its last receipt countersigned in a replay

    @property
    def identity(self) -> Identity:
        return self._client.identity

    @property
    def swarm_id(self) -> str:
        return self._client.swarm_id

    def known_records(self, model_id: str) -> Sequence[CapacityRecord]:
        return self._client.known_records(model_id)

    def avoided(self) -> frozenset[str]:
        return self._client.health.avoided(time.monotonic()) | self._client.disputes.excluded()

    def history(self, peer_id: str) -> int:
        return self._client.sessions.countersigned.get(peer_id, 0)

    async def replay(self, witness: Hop, history: Sequence[StepInput]) -> Tensor | None:
        sessions = self._client.sessions
        health = self._client.health  # a witness that fails is backed off like a hop that does
        try:
            wh = await self._client._open_paced(self._chain.spec, witness)
        except PeerError as exc:
            log.info("witness %s unavailable: %s", witness.peer_id, exc.reason)
            health.failed(witness.peer_id, time.monotonic())
            return None
        try:
            out = None
            for payload, pos, mask in history:
                out = await sessions.step(wh, payload, pos, mask)
            return out
        except PeerError as exc:
            log.info("witness %s failed: %s", witness.peer_id, exc.reason)
            health.failed(witness.peer_id, time.monotonic())
            return None
        finally:
            await sessions.close(wh)
            signed = [r for r, status, _ in wh.account.receipts if status == "countersigned"]
            if signed:
                self.receipts[witness.peer_id] = signed[-1].to_bytes()
