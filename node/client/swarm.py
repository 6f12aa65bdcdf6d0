"""Inference across a chain of peers: discovery, routing, pipelined generation, failover.

The client drives the pipeline (SPEC.md, "Inference session"): it opens one session per hop,
sends token ids to the first hop, passes each hop's hidden states on to the next unchanged, and
reads the sampled token from the last. Hidden states are opaque bytes here: the client needs no
torch.

    async with SwarmClient.open(bootstrap=[addr]) as client:
        result = await client.generate(model_id, [prompt_ids], max_new_tokens=32)

What it is built from, each passed in at construction: a ``Connector`` that opens streams to
peers (libp2p through the host, or node/net/memory.py in one process), a DHT to read records
from and publish disputes to, an identity and a ledger for receipts, the swarm id, an optional
``SpotChecker``. Hop sessions are node/client/hops.py; what it raises is node/client/errors.py.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import secrets
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import multiaddr
import trio

from protocol.codec import Tensor
from protocol.errors import ShizaError
from protocol.identity import Identity
from protocol.ids import DEFAULT_SWARM_ID, MAX_CONTROL_FRAME_BYTES
from protocol.messages import SamplingParams
from protocol.records import CapacityRecord

from node.client.disputes import DisputeWatch
from node.client.drafts import DRAFTERS, DraftSpec, Drafter, Window, make_drafter
from node.client.failover import MAX_FAILOVERS, Chain, Failover, Witnessing
from node.client.errors import HopFailed, InvalidRequest, LayersLost, NoRoute, PeerError, peer_error
from node.client.health import PeerHealth, RttTracker
from node.client.hops import (
    CLOSE_TIMEOUT_S, STEP_TIMEOUT_S, HopSession, HopSessions, PushUnsupported, SessionSpec,
)
from node.client.pacing import Pacer
from node.client.routing import Candidate, Hop, candidates_from, find_chain, num_layers_of
from node.client.spotcheck import CheckedStep, SpotChecker
from node.ledger.store import LEDGER_FILE, Ledger, LedgerError
from node.net.admission import SwarmKey, SwarmKeyError, check_admitted, open_admission
from node.net.dht import open_dht
from node.net.host import Host, Libp2pConnector, open_host
from node.net.records import DHT_SELECTORS, DHT_VALIDATORS, RecordDHT, fetch_records
from node.net.streams import Connector
from node.net.wire import float32_rows, int64_tensor, int64_values
from node.util.groups import unwrap_single_groups

__all__ = ["CLOSE_TIMEOUT_S", "PREFILL_CHUNK", "STEP_TIMEOUT_S", "GenerationResult", "HopFailed",
           "LayersLost", "NoRoute", "SwarmClient", "candidates_from", "num_layers_of"]

log = logging.getLogger(__name__)

PREFILL_CHUNK = 256  # prompt tokens per prefill step; longer prompts go in several steps
REJOIN_TIMEOUT_S = 10.0  # dialing the known peers again when a lookup found no record


@dataclass
class GenerationResult:
    token_ids: list[list[int]]  # per batch row, new tokens only (EOS included when reached)
    route: list[Hop]  # the chain at the end (after any failover)
    ttft_s: float
    decode_s: float
    steps: int  # tokens generated (per row)
    failovers: int = 0
    receipts: list[str] = field(default_factory=list)  # ids of the receipts stored for it
    pushed_steps: int = 0  # hop steps whose input the previous hop pushed (SPEC 9.6)
    passes: int = 0  # trips through the pipeline, the prefill's included (plain decoding: == steps)
    drafted: int = 0  # draft tokens sent (speculative decoding, SPEC 9.7)
    accepted: int = 0  # of those, the ones the model kept
    speculate: str = "off"  # the draft source used
    # SamplingParams.logprobs (SPEC 9.9): per row, per token of token_ids, its log-probability
    # and the top tokens' as the sampling node computed them; None when not asked for.
    logprobs: list[list["TokenLogprob"]] | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode tokens per second (after the first token), per row."""
        return (self.steps - 1) / self.decode_s if self.steps > 1 and self.decode_s > 0 else 0.0


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens and their log-probabilities, best first


def _step_logprobs(chain: Chain) -> list[tuple[float, list[tuple[int, float]]]] | None:
    """The last hop's log-probabilities of the step just run, one entry per row (per position
    of a window step), or None when it sent none."""
    got = chain.hops[-1].logprobs
    if got is None:
        return None
    values, ids = got
    rows = float32_rows(values)
    k = values.shape[-1] - 1
    flat = int64_values(ids)
    return [(row[0], list(zip(flat[i * k:(i + 1) * k], row[1:]))) for i, row in enumerate(rows)]


SEED_BITS = 63  # a drawn seed fits a signed 64-bit integer, whatever the engine's generator takes


def with_fresh_seed(sampling: SamplingParams) -> SamplingParams:
    """``sampling`` with a newly drawn random seed when it samples (temperature > 0) and names
    none: a node samples an unseeded session with seed 0, so without this every caller who
    asked for randomness would get the same "random" answer. A given seed is kept (a run that
    passes one is reproducible); greedy decoding has no use for one."""
    if sampling.seed is not None or sampling.temperature <= 0:
        return sampling
    return dataclasses.replace(sampling, seed=secrets.randbits(SEED_BITS))


class SwarmClient(Failover):
    """A peer of the swarm that finds spans through the DHT and drives generation across them.

    ``host`` is the libp2p host it runs on (None in one process: then ``connector`` reaches the
    peers and there is no private-swarm check); ``connector`` defaults to one over ``host``.
    ``swarm_id`` is the swarm whose receipts it countersigns (a private swarm's
    ``SwarmKey.swarm_id``); ``bootstrap`` the addresses it joined by, asked whether the swarm is
    private when the DHT shows nothing; ``spot_checker`` verifies sampled steps.
    """

    def __init__(
        self,
        host: Host | None,
        dht: RecordDHT,
        identity: Identity,
        ledger: Ledger | None = None,
        *,
        connector: Connector | None = None,
        swarm_id: str = DEFAULT_SWARM_ID,
        bootstrap: Sequence[str] = (),
        step_timeout_s: float = STEP_TIMEOUT_S,
        replay: str = "exact",
        direct: bool = True,
        spot_checker: SpotChecker | None = None,
        push: bool = True,
        speculate: DraftSpec = "off",
    ) -> None:
        if replay not in ("exact", "merged"):
            raise InvalidRequest("replay must be 'exact' (step by step) or 'merged' (one prefill)")
        if connector is None:
            if host is None:
                raise InvalidRequest("a SwarmClient needs a host or a connector")
            connector = Libp2pConnector(host)
        self.replay = replay
        self.host = host
        self.dht = dht
        self.identity = identity
        self.ledger = ledger
        self.bootstrap_addrs = list(bootstrap)
        self.health = PeerHealth()
        self.rtt = RttTracker()
        self.pacing = Pacer()  # per-peer slots and Busy retries (node/client/pacing.py)
        self.sessions = HopSessions(connector, identity, ledger, swarm_id=swarm_id,
                                    step_timeout_s=step_timeout_s, direct=direct, rtt=self.rtt)
        self.spot_checker = spot_checker
        # Node-to-node flow (SPEC 9.6): activations go hop to hop, each hop reporting to us
        # off the critical path; peers that answered Link as unknown are driven by us.
        self.push = push
        self.no_push: set[str] = set()
        _check_speculate(speculate)  # now, not at the first generation
        self.speculate = speculate  # generate's default draft source (node/client/drafts.py)
        self.disputes = DisputeWatch(dht)  # peers disputed by enough reporters (node/client/disputes.py)
        self.failovers_total = 0  # over the client's life (node/http/metrics.py exports it)
        self._known: dict[str, list[CapacityRecord]] = {}
        self._admission_checked = host is None  # nobody to ask in one process

    @property
    def swarm_id(self) -> str:
        """The swarm whose receipts this client countersigns (set at construction)."""
        return self.sessions.swarm_id

    @property
    def direct_sessions(self) -> int:
        """Hop sessions that ran over a direct channel."""
        return self.sessions.direct_sessions

    @property
    def direct_failed(self) -> frozenset[str]:
        """Peers whose direct channel failed to connect, asked for none until their back-off ends."""
        return self.sessions.direct_failed

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
        spot_checker: SpotChecker | None = None,
        push: bool = True,
        speculate: DraftSpec = "off",
    ) -> AsyncIterator["SwarmClient"]:
        """A client; with ``data_dir`` it keeps its identity and a receipt ledger there.
        With ``swarm_key`` (a key file or a SwarmKey) it joins that private swarm. A key file
        that cannot be used, or a ``listen`` address that is no multiaddr, is InvalidRequest."""
        try:
            multiaddr.Multiaddr(listen)
        except Exception as exc:  # noqa: BLE001 - py-multiaddr raises several kinds
            raise InvalidRequest(f"cannot listen on {listen!r}: {exc}") from None
        if swarm_key is not None and not isinstance(swarm_key, SwarmKey):
            try:
                swarm_key = SwarmKey.load(swarm_key)
            except SwarmKeyError as exc:
                raise InvalidRequest(str(exc)) from None
        ledger = None
        if data_dir is not None:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
            identity = identity or Identity.load_or_create(data_dir)
            try:  # opening verifies the whole hash chain: a worker thread, never the event loop
                ledger = await trio.to_thread.run_sync(Ledger.open, Path(data_dir) / LEDGER_FILE, identity)
            except LedgerError as exc:
                raise InvalidRequest(f"the ledger in {data_dir} cannot be used: {exc}") from None
        identity = identity or Identity.generate()
        swarm_id = swarm_key.swarm_id if swarm_key is not None else DEFAULT_SWARM_ID
        try:
            with unwrap_single_groups():
                async with open_host(identity.seed, listen) as host, open_admission(host, swarm_key):
                    async with open_dht(host, DHT_VALIDATORS, DHT_SELECTORS, list(bootstrap)) as dht:
                        yield cls(host, dht, identity, ledger, swarm_id=swarm_id, bootstrap=bootstrap,
                                  step_timeout_s=step_timeout_s, replay=replay, direct=direct,
                                  spot_checker=spot_checker, push=push, speculate=speculate)
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
        """The fastest chain covering the model, from the records in the DHT now.

        Raises NoRoute, or PeerNotAllowed when a bootstrap peer says the swarm is private."""
        seen = self._known.get(model_id, [])
        records = await self.records(model_id)
        if not records and self.host is not None:
            await self._rejoin(seen)
            records = await self.records(model_id)
        if not records and not self._admission_checked and self.host is not None:
            self._admission_checked = True  # a private swarm's node says so
            try:
                await check_admitted(self.host, self.bootstrap_addrs)
            except ShizaError as exc:
                raise peer_error(exc) from None
        num_layers = num_layers or num_layers_of(records, model_id)
        if num_layers is None:
            raise NoRoute(0, [], [], detail=f"no peer advertises model {model_id}")
        await self.disputes.refresh(r.peer_id for r in records)  # bounded; _candidates drops the excluded
        candidates = self._candidates(records, model_id)
        return self._with_fallback(lambda avoid: find_chain(
            num_layers, candidates, avoid=avoid, need_tokens=need_tokens, allow_partial=True))

    async def _rejoin(self, seen: Sequence[CapacityRecord]) -> None:
        """Dial the bootstrap peers and the peers of ``seen`` again and refresh the DHT's routing
        table, bounded by REJOIN_TIMEOUT_S: a lookup that found nobody may only mean that every
        peer this client knew went away (killed, restarted on another address) meanwhile."""
        addrs = [*self.bootstrap_addrs, *(r.addrs[0] for r in seen if r.addrs)]
        with trio.move_on_after(REJOIN_TIMEOUT_S):
            reached = await self.dht.bootstrap(list(dict.fromkeys(addrs)))
            log.info("no record found: dialed %d of %d known peers again", reached, len(set(addrs)))

    def _with_fallback(self, find: Callable[[frozenset[str]], list[Hop]],
                       failed_now: frozenset[str] = frozenset()) -> list[Hop]:
        """``find`` avoiding the peers backed off; when that leaves no chain, avoiding only the
        distrusted ones (caught lying) and ``failed_now`` (those that failed this generation):
        a peer that failed a while ago is better than none, and every replica of a span backed
        off after one stall must not end every generation."""
        now = time.monotonic()
        try:
            return find(self.health.avoided(now) | failed_now)
        except NoRoute:
            last_resort = self.health.distrusted(now) | failed_now
            if self.health.avoided(now) | failed_now == last_resort:
                raise
            hops = find(last_resort)
            log.warning("no chain without backed-off peers; trying %s again",
                        ", ".join(h.peer_id for h in hops if h.peer_id in self.health.avoided(now)))
            return hops

    async def wait_for_route(
        self, model_id: str, timeout_s: float = 120.0, *, num_layers: int | None = None
    ) -> list[Hop]:
        """Poll the DHT (bounded in time) until the model is fully covered."""
        last: NoRoute | None = None
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
        vocab_size: int | None = None,
        speculate: "DraftSpec | Drafter | None" = None,
        grammar: str | None = None,
        on_logprob: Callable[[int, "TokenLogprob"], None] | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts (left-padded), streaming each step to ``on_tokens``
        (and, with ``sampling.logprobs``, each row's token log-probability to ``on_logprob`` just
        before its token goes to ``on_tokens``).

        A hop that fails or stalls past ``step_timeout_s`` is replaced mid-generation: another
        chain for its layers gets the history replayed, and generation goes on (failover); one
        that cannot be opened is replaced the same way before the first step. Every hop's output
        is checked against its session (node/client/outputs.py; ``vocab_size``, when the caller
        knows the tokenizer, bounds the token ids): a hop whose output fails is failed over.
        ``speculate`` names a draft source (node/client/drafts.py: ``off``, ``ngram``; None: the
        client's ``speculate``), or is a factory of drafters or a fresh ``Drafter``: each pass
        then carries the next token and drafts of the ones after it, and the pipeline keeps those
        it agrees with (SPEC 9.7); greedy output is the same token for token, sampled output has
        the same distribution. It applies to one prompt; a batch decodes one token per pass.
        ``grammar`` (llguidance's JSON form, SPEC 9.8; node/client/grammars.py builds them):
        the last hop chooses every generated token under it, a failover's replacement resumes
        it where the text stands; the prompts must then have one length.
        Raises InvalidRequest, NoRoute (LayersLost mid-generation) or PeerError.
        """
        speculate = speculate or self.speculate
        _check_speculate(speculate)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InvalidRequest("every prompt needs at least one token")
        sampling = with_fresh_seed(sampling)
        if max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1")
        if vocab_size is not None and vocab_size < 1:
            raise InvalidRequest("vocab_size must be at least 1")
        batch = len(prompts)
        width = max(len(p) for p in prompts)
        max_length = width + max_new_tokens
        if grammar is not None or sampling.penalized:
            sampling = _constrained(sampling, grammar, prompts, max_new_tokens, vocab_size)
        route = route or await self.route(model_id, need_tokens=batch * max_length)
        ids = [[0] * (width - len(p)) + list(p) for p in prompts]
        mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
        positions = [[max(0, i - (width - len(p))) for i in range(width)] for p in prompts]
        eos = set(eos_token_ids)
        out: list[list[int]] = [[] for _ in range(batch)]
        lps: list[list[TokenLogprob]] | None = None if sampling.logprobs is None else [[] for _ in range(batch)]

        def note(row: int, lp: TokenLogprob) -> None:
            lps[row].append(lp)  # type: ignore[index]
            if on_logprob is not None:
                on_logprob(row, lp)
        done = [False] * batch
        t0 = time.perf_counter()
        ttft = 0.0
        steps = 0
        chain = Chain(SessionSpec(model_id, batch, max_length, sampling, num_layers=route[-1].end,
                                   vocab_size=vocab_size), push=self.push, out=out)
        drafter = (None if batch != 1 else
                   speculate if hasattr(speculate, "propose") else make_drafter(speculate))  # type: ignore[arg-type]
        async with self._open_chain(chain, route), _closing(drafter):
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
                chain.passes += 1
                if steps == 1:
                    ttft = time.perf_counter() - t0
                got = _step_logprobs(chain) if lps is not None else None
                for row, tok in enumerate(tokens):
                    if not done[row]:
                        out[row].append(tok)
                        done[row] = tok in eos
                        if got is not None:
                            note(row, TokenLogprob(tok, *got[row]))
                if on_tokens is not None:
                    on_tokens(tokens)
                if all(done) or (until is not None and until()):  # until: e.g. a stop sequence
                    break
                if drafter is not None:  # the rest speculates (SPEC 9.7)
                    drafter.extend(prompts[0])
                    steps += await self._speculate(chain, drafter, tokens[0], step_pos[0][-1] + 1,
                                                   max_new_tokens - steps, out[0], eos, on_tokens, until,
                                                   None if lps is None else functools.partial(note, 0))
                    break
                step_ids = [[t] for t in tokens]
                step_pos = [[p[-1] + 1] for p in step_pos]
                step_mask = [[1] for _ in range(batch)]
        decode_s = time.perf_counter() - t0 - ttft
        route_used = [h.hop for h in chain.hops]
        receipts = [r.receipt_id for h in chain.retired + chain.hops for r, _, _ in h.account.receipts]
        return GenerationResult(out, route_used, ttft, decode_s, steps, chain.failovers, receipts,
                                chain.pushed_steps, chain.passes, chain.drafted, chain.accepted,
                                drafter.name if drafter is not None else "off", lps)

    async def _speculate(self, chain: Chain, drafter: Drafter, token: int, position: int, room: int,
                         out: list[int], eos: set[int], on_tokens: Callable[[list[int]], None] | None,
                         until: Callable[[], bool] | None,
                         record: Callable[[TokenLogprob], None] | None = None) -> int:
        """Decode one row by windows (SPEC 9.7) after its first token ``token`` (at ``position``,
        not yet in any cache), at most ``room`` more tokens into ``out``; returns how many.

        Each pass sends ``token`` and up to k drafts after it; the last hop answers its choice
        at every position, the drafts up to the first it disagrees with are kept and its answer
        there is the next token. Every hop then holds rejected drafts past the kept length,
        which the next step's ``keep`` cuts; the hops' histories are trimmed to the kept
        positions at once, so a failover replays accepted tokens only."""
        window = Window()
        held = kept = position  # positions every hop holds / the kept ones among them
        drafter.extend([token])
        emitted = 0
        while emitted < room and not (out and out[-1] in eos) and not (until is not None and until()):
            k = min(window.size(), room - emitted - 1, chain.spec.max_length - kept - 1)
            if not all(h.windows for h in chain.hops):  # a hop without window steps: plain decoding
                k = 0
            started = time.perf_counter()  # a pass's cost includes drafting it (a draft model computes)
            if k <= 0:
                drafts: list[int] = []
            elif getattr(drafter, "blocking", False):  # a draft model: computes
                drafts = await trio.to_thread.run_sync(drafter.propose, k)
            else:
                drafts = drafter.propose(k)
            ids = [[token, *drafts]]
            positions = [[kept + i for i in range(len(ids[0]))]]
            answer = await self._step(chain, ids, positions, [[1] * len(ids[0])],
                                      keep=kept if held != kept else None,
                                      draft=int64_tensor([drafts]) if drafts else None)
            chain.passes += 1
            accepted = 0
            while accepted < len(drafts) and answer[accepted] == drafts[accepted]:
                accepted += 1
            new = answer[:accepted + 1]
            got = _step_logprobs(chain) if record is not None else None
            chain.drafted += len(drafts)
            chain.accepted += accepted
            window.update(len(drafts), accepted, time.perf_counter() - started)
            held, kept = kept + len(ids[0]), kept + accepted + 1
            if accepted < len(drafts):
                for h in chain.hops:  # a replay rebuilds the kept positions only
                    h.trim_last(accepted + 1)
            for j, tok in enumerate(new[:room - emitted]):
                out.append(tok)
                if got is not None:
                    record(TokenLogprob(tok, *got[j]))  # type: ignore[misc]
                emitted += 1
                if on_tokens is not None:
                    on_tokens([tok])
                if tok in eos or (until is not None and until()):
                    return emitted
            drafter.extend(new)
            token = new[-1]
        return emitted

    async def stream(
        self,
        model_id: str,
        prompt: Sequence[int],
        **kwargs: object,
    ) -> AsyncIterator[int]:
        """Yield the new token ids of one prompt as they arrive (errors as ``generate``'s)."""
        send, recv = trio.open_memory_channel[int](math.inf)

        async def run() -> None:
            async with send:
                await self.generate(
                    model_id, [prompt], on_tokens=lambda toks: send.send_nowait(toks[0]), **kwargs  # type: ignore[arg-type]
                )

        with unwrap_single_groups():  # the caller sees generate's error, not a group of one
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run)
                async with recv:
                    async for tok in recv:
                        yield tok

    @asynccontextmanager
    async def _open_chain(self, chain: Chain, route: list[Hop]) -> AsyncIterator[None]:
        try:
            await self._open_hops(chain, route)
            if chain.push:
                await self._link_chain(chain)
            yield
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                async with trio.open_nursery() as nursery:
                    for h in chain.hops:
                        nursery.start_soon(self.sessions.close, h)

    async def _open_hops(self, chain: Chain, route: list[Hop]) -> None:
        """Open a session on every hop of ``route``. A hop that cannot be opened (gone, busy,
        refusing) is backed off and replaced by another chain for its layers, as a failed step
        is; when nobody else serves them its PeerError is raised."""
        # Every hop of the route at once (one round trip, not one per hop); then, in order,
        # each one that failed is replaced as below.
        first: dict[int, HopSession | PeerError] = {}
        other: list[Exception] = []  # not a peer's failure (e.g. InvalidRequest): raised

        async def open_one(k: int, hop: Hop) -> None:
            try:
                first[k] = await self._open_paced(chain.open_spec(), hop)
            except PeerError as exc:
                first[k] = exc
            except Exception as exc:  # noqa: BLE001 - raised below, after the others are closed
                other.append(exc)

        try:
            async with trio.open_nursery() as nursery:
                for k, hop in enumerate(route):
                    nursery.start_soon(open_one, k, hop)
        finally:
            if other or len(first) < len(route):  # raising (or cancelled): none stays open
                with trio.CancelScope(shield=True):
                    for opened in first.values():
                        if isinstance(opened, HopSession):
                            await opened.reset()
        if other:
            raise other[0]
        pending: list[tuple[Hop, HopSession | PeerError | None]] = [(hop, first[k]) for k, hop in enumerate(route)]
        while pending:
            hop, opened = pending.pop(0)
            if isinstance(opened, HopSession):
                chain.hops.append(opened)
                continue
            try:
                if opened is not None:
                    raise opened
                chain.hops.append(await self._open_paced(chain.open_spec(), hop))
                continue
            except PeerError as exc:
                failure = exc
            self._mark_failed(chain, hop.peer_id, failure)
            chain.failovers += 1
            self.failovers_total += 1
            if chain.failovers > MAX_FAILOVERS:
                raise failure
            try:
                replacement = await self._replacement(chain.spec, hop.start, hop.end, chain)
            except NoRoute:
                raise failure from None
            log.warning("cannot open %s (layers %d:%d): %s; opening %s instead", hop.peer_id, hop.start,
                        hop.end, failure.reason, ", ".join(f"{h.peer_id} {h.start}:{h.end}" for h in replacement))
            pending[:0] = [(h, None) for h in replacement]

    async def _open_paced(self, spec: SessionSpec, hop: Hop) -> HopSession:
        """Open a hop's session within this client's slots at that peer, waiting out its Busy
        answers (node/client/pacing.py): failovers, replays and witnesses as first opens."""
        return await self.pacing.open(lambda: self.sessions.open(spec, hop), hop.peer_id)

    async def _step(
        self,
        chain: Chain,
        ids: list[list[int]],
        positions: list[list[int]],
        mask: list[list[int]],
        *,
        keep: int | None = None,
        draft: Tensor | None = None,
    ) -> list[int]:
        """One step through the chain: the sampled ids. A hop that takes pushed input (SPEC
        9.6) gets nothing from us: its previous hop pushed it; we read its report within what
        is left of the step's deadline (the deadline is on the token, not on each hop). A hop
        that fails or stalls is failed over; under push every hop after it is opened again
        (it may hold the failed step already), and the chain is linked again after the step.
        A window step (``keep``, ``draft``; SPEC 9.7) answers a token per position (one row)."""
        pos_t = int64_tensor(positions)
        mask_t = int64_tensor(mask)
        payload: Tensor = int64_tensor(ids)
        inputs: list[Tensor] = []  # inputs[i]: what hop i takes in this step
        deadline = trio.current_time() + self.sessions.step_timeout_s
        i = 0
        while i < len(chain.hops):
            h = chain.hops[i]
            del inputs[i:]
            inputs.append(payload)
            try:
                if h.pushed_in:
                    left = max(0.001, deadline - trio.current_time())
                    payload = await self.sessions.result(h, payload, pos_t, mask_t, timeout_s=left,
                                                         pushed_from=chain.hops[i - 1], keep=keep, draft=draft)
                    chain.pushed_steps += 1
                else:
                    payload = await self.sessions.step(h, payload, pos_t, mask_t, keep=keep, draft=draft)
            except PeerError as exc:
                failed = i - 1 if i > 0 and exc.peer_id == chain.hops[i - 1].hop.peer_id else i
                if failed < i:  # caught by what it pushed: its replacement redoes this step
                    chain.hops[failed].history.pop()
                chain.relink = chain.relink or chain.push
                replaced_by = await self._fail_over(chain, failed, exc)
                await self._restart_after(chain, failed + replaced_by)
                i, payload = failed, inputs[failed]
                continue  # retry this step on the replacement
            self.health.succeeded(h.hop.peer_id)
            tracked = chain.spec.sampling.grammar is not None or chain.spec.sampling.penalized
            constrained = tracked and i == len(chain.hops) - 1
            if self.spot_checker is not None and draft is None and not constrained:
                # Window steps go unchecked, and so do a constrained session's choices (SPEC 9.8).
                spec = chain.spec
                witnessing = Witnessing(self, chain)
                verdict = await self.spot_checker.check(witnessing, CheckedStep(
                    spec.model_id, h.hop, h.session_id, h.steps - 1, h.history, payload,
                    need_tokens=spec.batch * spec.max_length))
                if verdict.dispute is not None:
                    replaced_by = await self._caught(chain, i, verdict, witnessing.receipts)
                    await self._restart_after(chain, i + replaced_by)  # they took the caught output
                    i += replaced_by
                    payload = verdict.output
                    continue
            i += 1
        if chain.relink:
            await self._link_chain(chain)
        try:
            return int64_values(payload)
        except ShizaError as exc:  # the last hop answered something other than token ids
            last = chain.hops[-1].hop
            raise peer_error(exc, peer_id=last.peer_id, layers=(last.start, last.end)) from None

    async def _link_chain(self, chain: Chain) -> None:
        """Link every hop to its neighbours (SPEC 9.6), all at once: each hop is told whose
        pushes it takes and where it pushes (a node's link to the next waits there until that
        session names it). A hop that does not know Link is opened again and driven by us; one that fails is
        failed over and linking starts again (bounded by the failovers allowed)."""
        chain.relink = False
        hops = chain.hops
        for h in hops:
            h.pushed_in = h.pushing = False
        if len(hops) < 2:
            return
        able = [h.hop.peer_id not in self.no_push for h in hops]
        pushing: dict[int, bool] = {}
        failures: list[BaseException] = []

        async def link(i: int, prev: HopSession | None, nxt: HopSession | None) -> None:
            try:  # each Link is read to its answer: one failing cancels none of the others
                result = await self.sessions.link(hops[i], prev, nxt)
            except PushUnsupported as exc:
                self.no_push.add(hops[i].hop.peer_id)
                failures.append(exc)
            except PeerError as exc:
                failures.append(exc)
            else:
                if nxt is not None:
                    pushing[i] = result

        async with trio.open_nursery() as nursery:  # every hop at once: whose pushes it takes, where it pushes
            for i in range(len(hops)):
                if not able[i]:
                    continue
                prev = hops[i - 1] if i > 0 and able[i - 1] else None
                nxt = hops[i + 1] if i + 1 < len(hops) and able[i + 1] else None
                if prev is not None or nxt is not None:
                    nursery.start_soon(link, i, prev, nxt)
        if failures:
            chain.relink = True
            await self._reopen_unsupported(chain)
            for failure in failures:
                if isinstance(failure, PeerError):
                    index = next((k for k, h in enumerate(chain.hops) if h.hop.peer_id == failure.peer_id), None)
                    if index is not None:
                        replaced_by = await self._fail_over(chain, index, failure)
                        await self._restart_after(chain, index + replaced_by)
            await self._link_chain(chain)
            return
        for i, ok in pushing.items():
            hops[i].pushing = ok
            hops[i + 1].pushed_in = ok

    def _candidates(self, records: Sequence[CapacityRecord], model_id: str) -> list[Candidate]:
        excluded = self.disputes.excluded()
        return [replace(c, rtt_s=self.rtt.get(c.peer_id)) for c in candidates_from(records, model_id)
                if c.peer_id not in excluded]


def _constrained(sampling: SamplingParams, grammar: str | None, prompts: Sequence[Sequence[int]],
                 max_new_tokens: int, vocab_size: int | None) -> SamplingParams:
    """``sampling`` with ``grammar`` (if any) and the generated text's start at the prompts' end
    (SPEC 9.8, 9.10: a grammar or penalties), if every session open it may take (a failover's,
    with the text so far) fits a control frame; else InvalidRequest."""
    what = "a grammar" if grammar is not None else "a penalty"
    if len({len(p) for p in prompts}) != 1:
        raise InvalidRequest(f"{what} needs prompts of one length (it starts at one position)")
    per_token = 3 if vocab_size is not None and vocab_size <= 2**16 else 5  # msgpack uint16 / uint32
    size = len(grammar.encode()) if grammar is not None else 0
    need = size + per_token * len(prompts) * max_new_tokens + 4096
    if need > MAX_CONTROL_FRAME_BYTES:
        raise InvalidRequest(f"{what} ({size} bytes) with {len(prompts)} x "
                             f"{max_new_tokens} new tokens does not fit a session's open "
                             f"({MAX_CONTROL_FRAME_BYTES} bytes): shorten either")
    try:
        return replace(sampling, grammar=grammar, grammar_start=len(prompts[0]))
    except ShizaError as exc:
        raise InvalidRequest(f"bad grammar: {exc}") from None


def _check_speculate(spec: object) -> None:
    """InvalidRequest for a draft source name the client does not know."""
    if isinstance(spec, str) and spec not in DRAFTERS:
        raise InvalidRequest(f"unknown draft source {spec!r}; choose one of {', '.join(DRAFTERS)}")


@asynccontextmanager
async def _closing(drafter: Drafter | None) -> AsyncIterator[None]:
    """Close a drafter that holds something (a draft model's session) after its generation."""
    try:
        yield
    finally:
        close = getattr(drafter, "close", None)
        if close is not None:
            close()
