"""Inference across a chain of peers: discovery, routing, and pipelined generation.

The client drives the pipeline (SPEC.md, "Inference session"): it opens one session per hop,
sends token ids to the first hop, passes each hop's hidden states on to the next unchanged, and
reads the sampled token from the last. Hidden states are opaque bytes here: the client needs no
torch.

    async with SwarmClient.open(bootstrap=[addr]) as client:
        result = await client.generate(model_id, [prompt_ids], max_new_tokens=32)
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Sequence

import trio

from protocol import direct as direct_wire
from protocol.codec import Tensor
from protocol.errors import InvalidMessage, ShizaError
from protocol.identity import Identity
from protocol.messages import (
    CloseSession,
    Closed,
    Countersign,
    Dispute,
    Error,
    OpenSession,
    SamplingParams,
    SessionOpened,
    Step,
    StepResult,
)
from protocol.records import CapacityRecord
from protocol.ids import DEFAULT_SWARM_ID, INFERENCE_PROTOCOL

from node.util.groups import unwrap_single_groups
from node.ledger.accounting import ClientAccount, store
from node.net.records import DHT_SELECTORS, DHT_VALIDATORS, fetch_records
from node.net.dht import SwarmDHT, open_dht
from node.net.direct import DirectChannel, connect as connect_direct
from node.client.disputes import DisputeWatch, publish_dispute
from node.client.health import PeerHealth, RttTracker
from node.net.host import Host, Stream, StreamBroken, open_host
from node.ledger.store import LEDGER_FILE, Ledger
from node.client.routing import Candidate, Hop, NoRoute, find_chain, find_chain_between
from node.net.admission import SwarmKey, check_admitted, open_admission

if TYPE_CHECKING:
    from node.client.spotcheck import SpotChecker
from node.net.wire import concat_steps, int64_tensor, int64_values, recv_message, send_message

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 60.0  # a hop that answers no step within this is taken for stalled
MAX_FAILOVERS = 8  # per generation
FAILOVER_LOOKUP_S = 15.0  # bound on a fresh DHT lookup during failover
CLOSE_TIMEOUT_S = 10.0
PREFILL_CHUNK = 256  # prompt tokens per prefill step; longer prompts go in several steps


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # per batch row, new tokens only (EOS included when reached)
    route: list[Hop]  # the chain at the end (after any failover)
    ttft_s: float
    decode_s: float
    steps: int
    failovers: int = 0
    receipts: list[str] = field(default_factory=list)  # ids of the receipts stored for it

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second (after the first token), per row."""
        return (self.steps - 1) / self.decode_s if self.steps > 1 and self.decode_s > 0 else 0.0


@dataclass
class _HopSession:
    hop: Hop
    stream: "Stream | DirectChannel"  # the session's frames: its libp2p stream or direct channel
    session_id: str
    account: ClientAccount
    anchor: Stream | None = None  # the libp2p stream the session was opened on, if it moved
    steps: int = 0
    # Every input sent to this hop, so a replacement can rebuild its KV cache (failover).
    history: list[tuple[Tensor, Tensor, Tensor]] = field(default_factory=list)

    async def reset(self) -> None:
        """Abandon the session: its frames' transport and the stream it was opened on."""
        await self.stream.reset()
        if self.anchor is not None:
            await self.anchor.reset()


def candidates_from(records: Sequence[CapacityRecord], model_id: str) -> list[Candidate]:
    out = []
    for r in records:
        for span in r.spans:
            if span.model_id == model_id:
                out.append(Candidate(r.peer_id, span.start, span.end, r.throughput, tuple(r.addrs),
                                     cache_tokens_left=r.cache_tokens_left))
    return out


def num_layers_of(records: Sequence[CapacityRecord], model_id: str) -> int | None:
    for r in records:
        for span in r.spans:
            if span.model_id == model_id:
                return span.num_layers
    return None


class SwarmClient:
    """A libp2p peer that finds spans through the DHT and drives generation across them."""

    def __init__(
        self,
        host: Host,
        dht: SwarmDHT,
        identity: Identity,
        ledger: Ledger | None = None,
        *,
        step_timeout_s: float = STEP_TIMEOUT_S,
        replay: str = "exact",
        direct: bool = True,
    ) -> None:
        if replay not in ("exact", "merged"):
            raise ValueError("replay must be 'exact' (step by step) or 'merged' (one prefill)")
        self.replay = replay
        # Ask nodes for a direct activation channel (SPEC 9.5); peers where connecting it
        # failed are asked no more (their sessions stay on libp2p streams).
        self.direct = direct
        self.direct_failed: set[str] = set()
        self.direct_sessions = 0  # hop sessions that ran over a direct channel
        self.host = host
        self.dht = dht
        self.identity = identity
        self.ledger = ledger
        self.step_timeout_s = step_timeout_s
        self.health = PeerHealth()
        self.rtt = RttTracker()
        self._known: dict[str, list[CapacityRecord]] = {}
        self.failovers_total = 0  # over the client's life (node/metrics.py exports it)
        self.swarm_id = DEFAULT_SWARM_ID  # the private swarm's, with a swarm key
        self.bootstrap_addrs: list[str] = []
        self._admission_checked = False
        self.spot_checker: SpotChecker | None = None  # verify sampled steps (node/spotcheck.py)
        self.disputes = DisputeWatch(dht)  # peers disputed by enough reporters (node/disputes.py)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        bootstrap: Sequence[str],
        *,
        identity: Identity | None = None,
        data_dir: str | Path | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        step_timeout_s: float = STEP_TIMEOUT_S,
        replay: str = "exact",
        swarm_key: "str | Path | SwarmKey | None" = None,
        direct: bool = True,
    ) -> AsyncIterator["SwarmClient"]:
        """A client; with ``data_dir`` it keeps its identity and a receipt ledger there.
        With ``swarm_key`` (a key file or a SwarmKey) it joins that private swarm."""
        if swarm_key is not None and not isinstance(swarm_key, SwarmKey):
            swarm_key = SwarmKey.load(swarm_key)
        ledger = None
        if data_dir is not None:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            identity = identity or Identity.load_or_create(data_dir)
            ledger = Ledger.open(Path(data_dir) / LEDGER_FILE)
        identity = identity or Identity.generate()
        try:
            with unwrap_single_groups():
                async with open_host(identity.seed, listen) as host, open_admission(host, swarm_key):
                    async with open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, list(bootstrap)) as dht:
                        client = cls(host, dht, identity, ledger, step_timeout_s=step_timeout_s,
                                     replay=replay, direct=direct)
                        client.bootstrap_addrs = list(bootstrap)
                        if swarm_key is not None:
                            client.swarm_id = swarm_key.swarm_id
                        yield client
        finally:
            if ledger is not None:
                ledger.close()

    # ---- discovery ----------------------------------------------------------------------
    async def records(self, model_id: str) -> list[CapacityRecord]:
        """The valid records of the model's peers, asked of the DHT now (and remembered)."""
        records = await fetch_records(self.dht, model_id)
        self._known[model_id] = records
        return records

    def known_records(self, model_id: str) -> list[CapacityRecord]:
        """Records from the last lookup that have not expired: no network, for failover."""
        now = time.time()
        return [r for r in self._known.get(model_id, []) if r.expires_at > now]

    async def route(self, model_id: str, *, num_layers: int | None = None, need_tokens: int = 0) -> list[Hop]:
        """The fastest chain covering the model, from the records in the DHT now."""
        records = await self.records(model_id)
        if not records and not self._admission_checked:  # a private swarm's node says so
            self._admission_checked = True
            await check_admitted(self.host, self.bootstrap_addrs)
        num_layers = num_layers or num_layers_of(records, model_id)
        if num_layers is None:
            raise NoRoute(0, [], [], detail=f"no peer advertises model {model_id}")
        await self.disputes.refresh(r.peer_id for r in records)  # bounded; _candidates drops the excluded
        return find_chain(
            num_layers, self._candidates(records, model_id), avoid=self.health.avoided(time.monotonic()),
            need_tokens=need_tokens, allow_partial=True,
        )

    async def wait_for_route(
        self, model_id: str, timeout_s: float = 120.0, *, num_layers: int | None = None
    ) -> list[Hop]:
        """Poll the DHT (bounded in time) until the model is fully covered."""
        last: Exception | None = None
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    return await self.route(model_id, num_layers=num_layers)
                except NoRoute as exc:
                    last = exc
                await trio.sleep(0.5)
        raise last or NoRoute(0, [], [])

    # ---- generation ---------------------------------------------------------------------
    async def generate(
        self,
        model_id: str,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 32,
        sampling: SamplingParams = SamplingParams(),
        eos_token_ids: Sequence[int] = (),
        route: list[Hop] | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
        until: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts (left-padded), streaming each step to ``on_tokens``.

        A hop that fails or stalls past ``step_timeout_s`` is replaced mid-generation: another
        chain for its layers gets the history replayed, and generation goes on (failover).
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        max_length = width + max_new_tokens
        route = route or await self.route(model_id, need_tokens=batch * max_length)
        ids = [[0] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        positions = [[max(0, i - (width - len(p))) for i in range(width)] for p in prompts]
        eos = set(eos_token_ids)
        out: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        t0 = time.perf_counter()
        ttft = 0.0
        steps = 0
        chain = _Chain(model_id, batch, max_length, sampling)
        async with self._open_chain(chain, route):
            step_ids, step_pos, step_mask = ids, positions, mask
            # A long prompt goes in chunks (bounded memory per step); each chunk keeps >= 2
            # tokens so receipts count it as prefill. Only the last chunk's token is used.
            while len(step_ids[0]) > PREFILL_CHUNK + 1:
                c = min(PREFILL_CHUNK, len(step_ids[0]) - 2)
                await self._step(chain, [r[:c] for r in step_ids], [r[:c] for r in step_pos],
                                 [r[:c] for r in step_mask])
                step_ids, step_pos, step_mask = ([r[c:] for r in x] for x in (step_ids, step_pos, step_mask))
            for _ in range(max_new_tokens):
                tokens = await self._step(chain, step_ids, step_pos, step_mask)
                steps += 1
                if steps == 1:
                    ttft = time.perf_counter() - t0
                for row, tok in enumerate(tokens):
                    if not done[row]:
                        out[row].append(tok)
                        done[row] = tok in eos
                if on_tokens is not None:
                    on_tokens(tokens)
                if all(done) or (until is not None and until()):  # until: e.g. a stop sequence
                    break
                step_ids = [[t] for t in tokens]
                step_pos = [[p[-1] + 1] for p in step_pos]
                step_mask = [[1] for _ in range(batch)]
        decode_s = time.perf_counter() - t0 - ttft
        route_used = [h.hop for h in chain.hops]
        receipts = [r.receipt_id for h in chain.retired + chain.hops for r, _, _ in h.account.receipts]
        return GenerationResult(out, route_used, ttft, decode_s, steps, chain.failovers, receipts)

    async def stream(
        self,
        model_id: str,
        prompt: Sequence[int],
        **kwargs: object,
    ) -> AsyncIterator[int]:
        """Yield the new token ids of one prompt as they arrive."""
        send, recv = trio.open_memory_channel[int](math.inf)

        async def run() -> None:
            async with send:
                await self.generate(
                    model_id, [prompt], on_tokens=lambda toks: send.send_nowait(toks[0]), **kwargs  # type: ignore[arg-type]
                )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            async with recv:
                async for tok in recv:
                    yield tok

    @asynccontextmanager
    async def _open_chain(self, chain: "_Chain", route: list[Hop]) -> AsyncIterator[None]:
        try:
            for hop in route:
                try:
                    chain.hops.append(await self._open_hop(chain, hop))
                except HopFailed as exc:
                    # Opening failed (busy, refused, gone): the caller sees the peer's error.
                    raise exc.error or ShizaError(str(exc)) from None
            yield
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for h in chain.hops:
                        nursery.start_soon(self._close_hop, h)

    async def _open_hop(self, chain: "_Chain", hop: Hop) -> _HopSession:
        """Open the hop's session; over a direct channel where the node offers one and it
        connects, else (or when it fails to connect: once more without asking) over libp2p."""
        if self.direct and hop.peer_id not in self.direct_failed:
            try:
                return await self._open_hop_once(chain, hop, direct=True)
            except _DirectFailed as exc:
                log.info("direct channel to %s failed (%s); using its libp2p stream", hop.peer_id, exc)
                self.direct_failed.add(hop.peer_id)
        return await self._open_hop_once(chain, hop, direct=False)

    async def _open_hop_once(self, chain: "_Chain", hop: Hop, *, direct: bool) -> _HopSession:
        t0 = time.perf_counter()
        for addr in hop.addrs:
            try:
                await self.host.connect(addr)
                break
            except Exception as exc:  # noqa: BLE001 - try the next address
                log.debug("dial %s failed: %s", addr, exc)
        try:
            stream = await self.host.open_stream(hop.peer_id, INFERENCE_PROTOCOL)
        except Exception as exc:  # noqa: BLE001 - unreachable, refused: this hop failed
            raise HopFailed(hop, f"cannot open a stream: {exc}") from None
        public, secret = direct_wire.keypair() if direct else (None, None)
        try:
            await send_message(stream, OpenSession(chain.model_id, hop.start, hop.end, chain.max_length,
                                                   chain.batch, chain.sampling, direct_key=public))
            reply = await recv_message(stream, self.step_timeout_s)
            opened = _expect(reply, SessionOpened, hop)
            if opened.direct_port is not None and public is None:
                raise InvalidMessage("the node offered a direct channel nobody asked for")
        except (ShizaError, StreamBroken) as exc:
            await stream.reset()
            raise HopFailed(hop, str(exc), exc if isinstance(exc, ShizaError) else None) from None
        self.rtt.observe(hop.peer_id, time.perf_counter() - t0)
        account = ClientAccount(self.identity, hop.peer_id, chain.model_id, hop.start, hop.end,
                                opened.session_id, swarm_id=self.swarm_id)
        if opened.direct_port is None or public is None or secret is None:
            return _HopSession(hop, stream, opened.session_id, account)
        remote = stream.libp2p.get_remote_address()
        try:
            if remote is None:
                raise StreamBroken("no IP address for this peer's connection")
            channel = await connect_direct(remote[0], opened.direct_port, opened.direct_key or b"",
                                           hop.peer_id, public, secret, self.step_timeout_s)
        except StreamBroken as exc:
            await stream.reset()
            raise _DirectFailed(str(exc)) from None
        self.direct_sessions += 1
        return _HopSession(hop, channel, opened.session_id, account, anchor=stream)

    async def _close_hop(self, h: _HopSession) -> None:
        """Close one hop's session and settle its final receipt (best effort)."""
        try:
            await send_message(h.stream, CloseSession())
            reply = await recv_message(h.stream, CLOSE_TIMEOUT_S)
            if isinstance(reply, Closed) and reply.receipt is not None:
                await self._judge(h, reply.receipt)
            await h.stream.close()
            if h.anchor is not None:
                await h.anchor.close()
        except Exception as exc:  # noqa: BLE001 - the peer may be gone; its checkpoints stay
            log.info("closing session on %s: %s", h.hop.peer_id, exc)
            await h.reset()

    async def _judge(self, h: _HopSession, data: bytes) -> None:
        """Check a receipt against what we sent and received; countersign or dispute it."""
        receipt, client_sig, reason = h.account.judge(data)
        if receipt is None:
            log.warning("unreadable receipt from %s: %s", h.hop.peer_id, reason)
            return
        if client_sig is not None:
            await send_message(h.stream, Countersign(receipt.receipt_id, client_sig))
            await trio.to_thread.run_sync(store, self.ledger, receipt, "countersigned", "")
        else:
            log.warning("disputing receipt %s from %s: %s", receipt.receipt_id, h.hop.peer_id, reason)
            await send_message(h.stream, Dispute(receipt.receipt_id, reason[:1000]))
            await trio.to_thread.run_sync(store, self.ledger, receipt, "disputed", reason)

    async def _run(self, h: _HopSession, payload: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        """One step on one hop; any failure or a stall past the deadline raises HopFailed."""
        step = Step(h.steps, payload, pos, mask)
        try:
            await send_message(h.stream, step)
            reply = await recv_message(h.stream, self.step_timeout_s)
            result = _expect(reply, StepResult, h.hop)
            if result.step != h.steps:
                raise InvalidMessage(f"answered step {result.step}, expected {h.steps}")
            h.account.record(step, result.output)
            if result.receipt is not None:
                await self._judge(h, result.receipt)
        except (ShizaError, StreamBroken) as exc:
            raise HopFailed(h.hop, str(exc)) from None
        h.history.append((payload, pos, mask))
        h.steps += 1
        return result.output

    async def _step(
        self,
        chain: "_Chain",
        ids: list[list[int]],
        positions: list[list[int]],
        mask: list[list[int]],
    ) -> list[int]:
        pos_t = int64_tensor(positions)
        mask_t = int64_tensor(mask)
        payload: Tensor = int64_tensor(ids)
        i = 0
        while i < len(chain.hops):
            try:
                payload = await self._run(chain.hops[i], payload, pos_t, mask_t)
                if self.spot_checker is not None:
                    accused = len(self.spot_checker.disputes)
                    payload = await self.spot_checker.check(self, chain, i, payload)
                    for record in self.spot_checker.disputes[accused:]:
                        await publish_dispute(self.dht, record)  # bounded, best effort, never raises
            except HopFailed as exc:
                await self._fail_over(chain, i, exc)
                continue  # retry this step on the replacement
            self.health.succeeded(chain.hops[i].hop.peer_id)
            i += 1
        return int64_values(payload)

    async def _fail_over(self, chain: "_Chain", index: int, failure: "HopFailed") -> None:
        """Replace hop ``index`` by a chain for its layers and replay its history there."""
        failed = chain.hops[index]
        log.warning("hop %s (layers %d:%d) failed: %s; failing over",
                    failed.hop.peer_id, failed.hop.start, failed.hop.end, failure.reason)
        self.health.failed(failed.hop.peer_id, time.monotonic())
        chain.failovers += 1
        self.failovers_total += 1
        if chain.failovers > MAX_FAILOVERS:
            raise LayersLost(failed.hop.start, failed.hop.end, f"gave up after {MAX_FAILOVERS} failovers")
        with trio.CancelScope(shield=True):
            await failed.reset()
        for attempt in range(MAX_FAILOVERS):
            # Records already known first: asking the DHT can wait on the very peer that stalled.
            hops = None
            for fresh in (False, True):
                if fresh:
                    with trio.move_on_after(FAILOVER_LOOKUP_S):
                        await self.records(chain.model_id)
                records = self.known_records(chain.model_id)
                try:
                    hops = find_chain_between(
                        failed.hop.start, failed.hop.end, self._candidates(records, chain.model_id),
                        avoid=self.health.avoided(time.monotonic()),
                        need_tokens=chain.batch * chain.max_length,
                    )
                    break
                except NoRoute as exc:
                    if fresh:
                        raise LayersLost(failed.hop.start, failed.hop.end, str(exc)) from None
            assert hops is not None
            history = failed.history
            sampled = failed.hop.end == hops[-1].end and chain.sampling.temperature > 0
            if self.replay == "merged" and len(history) > 1 and not sampled:
                # One prefill of the whole history: much faster, equal up to float rounding
                # (greedy text may differ in rare near-ties, hence not the default).
                history = [tuple(concat_steps([h[k] for h in history]) for k in range(3))]  # type: ignore[misc]
            try:
                replacement = [await self._open_hop(chain, hop) for hop in hops]
                for payload, pos, mask in history:  # rebuild the KV caches
                    for h in replacement:
                        payload = await self._run(h, payload, pos, mask)
            except HopFailed as exc:
                self.health.failed(exc.hop.peer_id, time.monotonic())
                log.warning("replacement %s failed too: %s", exc.hop.peer_id, exc.reason)
                continue
            chain.retired.append(failed)
            chain.hops[index:index + 1] = replacement
            log.warning("failover to %s after replaying %d steps",
                        ", ".join(f"{h.hop.peer_id} {h.hop.start}:{h.hop.end}" for h in replacement),
                        len(failed.history))
            return
        raise LayersLost(failed.hop.start, failed.hop.end, "every replacement failed")

    def _candidates(self, records: Sequence[CapacityRecord], model_id: str) -> list[Candidate]:
        excluded = self.disputes.excluded()
        return [replace(c, rtt_s=self.rtt.get(c.peer_id)) for c in candidates_from(records, model_id)
                if c.peer_id not in excluded]


@dataclass
class _Chain:
    model_id: str
    batch: int
    max_length: int
    sampling: SamplingParams
    hops: list[_HopSession] = field(default_factory=list)
    retired: list[_HopSession] = field(default_factory=list)  # replaced by failover
    failovers: int = 0


class _DirectFailed(Exception):
    """The node offered a direct channel but connecting it failed (the client retries once
    over libp2p)."""


class HopFailed(Exception):
    """One hop failed (internal to the client: failover handles it)."""

    def __init__(self, hop: Hop, reason: str, error: ShizaError | None = None) -> None:
        super().__init__(f"{hop.peer_id} (layers {hop.start}:{hop.end}): {reason}")
        self.hop = hop
        self.reason = reason
        self.error = error


class LayersLost(NoRoute):
    """A hop failed mid-generation and nobody else serves its layers."""

    def __init__(self, start: int, end: int, detail: str) -> None:
        Exception.__init__(self, f"layers {start}:{end} were lost mid-generation and no peer can take "
                                 f"them over ({detail})")
        self.num_layers, self.missing, self.peers_seen = end, [(start, end)], []


def _expect(reply: object, cls: type, hop: Hop):  # type: ignore[no-untyped-def]
    if isinstance(reply, cls):
        return reply
    if isinstance(reply, Error):
        exc = reply.to_exception()
        raise type(exc)(f"peer {hop.peer_id} (layers {hop.start}:{hop.end}): {exc}")
    if reply is None:
        raise ShizaError(f"peer {hop.peer_id} closed the stream")
    raise InvalidMessage(f"peer {hop.peer_id} sent {type(reply).__name__}, expected {cls.__name__}")
