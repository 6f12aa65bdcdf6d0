"""Protocol handlers of a serving node: node info and inference sessions.

Each inference stream carries exactly one session (SPEC.md, "Inference session"). Anything
wrong with what a peer sends ends that stream with an Error frame carrying the wire code; the
node goes on serving every other stream.

The server speaks to its engine only through ``node.engine.base.Engine`` (wire tensors in and
out: no torch here) and to its streams through ``FramedStream``. What it depends on is passed
in at construction: the engine, the limits, the accounting, the direct-channel listener and
``ServerHooks`` (who hears of each step and of each change of KV-cache room).

Cancellation: a handler cancelled (the node shutting down) ends its session; the engine step in
flight finishes (the scheduler shields it) and what was done is settled in the ledger under a
shield (``_settle_broken``).
"""

from __future__ import annotations

import dataclasses

import logging
import secrets
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import trio

from protocol.errors import (
    BadShape,
    Busy,
    FrameTooLarge,
    Internal,
    InvalidMessage,
    LimitExceeded,
    MalformedFrame,
    NotAllowed,
    SessionClosed,
    ShizaError,
    SpanNotServed,
    Timeout,
    UnknownMessageType,
    UnknownModel,
)
from protocol.codec import FLOAT_DTYPES, Tensor, itemsize
from protocol.ids import DEFAULT_SWARM_ID, MAX_CONTROL_FRAME_BYTES, MAX_FRAME_BYTES, MAX_TENSOR_ELEMENTS
from protocol.messages import (
    CloseSession,
    Closed,
    Countersign,
    Dispute,
    Error,
    InfoRequest,
    NodeInfo,
    OpenSession,
    SessionOpened,
    Message,
    Step,
    StepResult,
)

from protocol.identity import Identity
from protocol.push import Link, Linked, Push, Pushed, push_digest, sign_push, verify_push
from protocol.receipts import Receipt, verify_receipt

from node.engine.base import Engine, Sampling
from node.engine.errors import BadInput, CapacityExceeded, EngineError, SessionUnknown
from node.ledger.accounting import (
    DEFAULT_MAX_UNPAID_WORK_UNITS,
    DEFAULT_RECEIPT_EVERY,
    SeqAllocator,
    ServerAccount,
    UnpaidWork,
    store_issued,
    store_verdict,
)
from node.ledger.store import AWAITING_VERDICT, Ledger, LedgerError
from node.net.direct import DirectListener, Offer
from node.net.links import LinkPool, OutLink, accept_link
from node.net.streams import FramedStream, StreamBroken
from node.net.wire import recv_message, send_message
from node.serve.limits import NodeShares, PeerLimiter, PeerLimits
from node.serve.scheduler import CacheAdmission, StepScheduler
from node.util.groups import unwrap_single_groups

log = logging.getLogger(__name__)

# How long a link from a peer no session names yet waits for a Link naming it (SPEC 9.6).
LINK_NAME_WAIT_S = 5.0
# What a peer sends that cannot be decoded, or is over a frame limit: a strike against it.
_FRAME_VIOLATIONS = (MalformedFrame, FrameTooLarge, LimitExceeded)


@dataclass
class ServerLimits:
    max_sessions: int = 64
    max_batch_size: int = 32
    max_length: int = 4096
    open_timeout_s: float = 30.0  # from stream open to OpenSession
    idle_timeout_s: float = 300.0  # between two steps of a session
    peer: PeerLimits = field(default_factory=PeerLimits)  # per remote peer (node/serve/limits.py)
    shares: NodeShares = field(default_factory=NodeShares)  # max_sessions shared among peers (limits.py)
    allow_peers: frozenset[str] | None = None  # --allow-peers: only these may open sessions
    # Work units (tokens x layers) of a client's receipts disputed or never countersigned, less
    # what it countersigned since, past which it gets a strike and its opens are refused.
    max_unpaid_work_units: int = DEFAULT_MAX_UNPAID_WORK_UNITS


@dataclass
class ServerStats:
    sessions_open: int = 0
    sessions_total: int = 0
    steps_total: int = 0
    errors_by_code: dict[int, int] = field(default_factory=dict)
    receipts: dict[str, int] = field(default_factory=dict)  # by ledger status
    # Tokens through the span: the first step of a session is its prefill, the rest decode.
    tokens_prefill: int = 0
    tokens_decode: int = 0
    work_units: int = 0  # tokens times layers, as receipts count them


@dataclass
class Accounting:
    """What the server needs to issue receipts: who signs, where they go, how often."""

    identity: Identity
    ledger: Ledger | None
    every_tokens: int = DEFAULT_RECEIPT_EVERY
    unit_price: float | None = None
    swarm_id: str = DEFAULT_SWARM_ID  # a private swarm's id (node/swarmkey.py)
    seqs: SeqAllocator = field(init=False)

    def __post_init__(self) -> None:
        self.seqs = SeqAllocator(self.ledger)


@dataclass(frozen=True)
class StepDone:
    """One session step served (for metrics): its engine call's time and size."""

    span: tuple[int, int]  # the engine's layers [start, end)
    prefill: bool  # the session's first step
    rows: int  # rows of every step in the engine call this step ran in
    seconds: float  # that engine call's own time


@dataclass(frozen=True)
class ServerHooks:
    """Who hears what the server does. Each is called in the trio thread and must return at once.

    ``on_step``: after each step served (node/http/metrics.py). ``on_cache_change``: after each
    open and close, with the KV-cache tokens left (None for an engine without a budget; the
    daemon puts it in the node's record).
    """

    on_step: Callable[[StepDone], None] | None = None
    on_cache_change: Callable[[int | None], None] | None = None


@dataclass
class _Session:
    session_id: str
    start: int
    end: int
    account: ServerAccount | None
    pending: Receipt | None = None  # a checkpoint receipt awaiting the client's verdict
    final_sent: bool = False
    client: str = ""
    kv_tokens: int = 0  # reserved against the client's per-peer limit
    frame_limit: int = MAX_CONTROL_FRAME_BYTES  # bytes of one frame of this session (a Step)
    last: bool = False  # ends at the model's last layer: its steps return token ids
    # Node-to-node flow (SPEC 9.6), as the client's last Link set it:
    prev_peer: str | None = None  # whose pushes this session takes (None: the client's Steps only)
    next: OutLink | None = None  # where each output is pushed, to session next_session
    next_session: str = ""
    next_addrs: tuple[str, ...] = ()  # the next peer's addresses, as the Link gave them
    source: "_Source | None" = None  # where its messages come from (the stream, then also pushes)


class SpanServer:
    """Serves one engine (a span of one model) over the info and inference protocols.

    ``direct``: a running ``DirectListener`` lets clients move sessions off libp2p (SPEC 9.5);
    None serves every session on its stream. ``replace_engine`` swaps the engine (the node
    moving to other layers).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        node_info: Callable[[], NodeInfo],
        limits: ServerLimits | None = None,
        accounting: Accounting | None = None,
        hooks: ServerHooks | None = None,
        direct: DirectListener | None = None,
        links: LinkPool | None = None,
        identity: Identity | None = None,
        push: bool = True,
        push_fault: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        self.engine = engine
        self.accounting = accounting
        self.node_info = node_info
        self.limits = limits or ServerLimits()
        self.hooks = hooks or ServerHooks()
        self.direct = direct
        # Node-to-node flow (SPEC 9.6): ``links`` reaches next hops, ``identity`` signs what is
        # pushed; ``push`` False answers Link as a node without 9.6 does (UnknownMessageType).
        self.links = links
        self.identity = identity or (accounting.identity if accounting is not None else None)
        self.push = push
        self.push_fault = push_fault  # testing only: alters what is pushed, not what is reported
        self._sessions: dict[str, _Session] = {}  # open sessions, by id: where pushes go
        self._named = trio.Event()  # set (and replaced) whenever a session names a pushing peer
        self.pushes_in = 0
        self.pushes_out = 0
        self.stats = ServerStats()
        self.peers = PeerLimiter(self.limits.peer, max_sessions=self.limits.max_sessions, shares=self.limits.shares)
        self.accepting = True
        self.unpaid = UnpaidWork()  # per client: work no countersigned receipt covers
        # Steps of concurrent sessions run as batched forwards; opens wait for cache room.
        self.scheduler = StepScheduler()
        self.admission = CacheAdmission(on_change=self.hooks.on_cache_change)
        self._idle = trio.Event()
        self._idle.set()

    def replace_engine(self, engine: Engine) -> None:
        """Serve ``engine`` from now on (the node moving to other layers, after a drain). A
        session still open, past the drain's bound, fails its next step (SessionClosed)."""
        self.engine = engine

    # ---- info -------------------------------------------------------------------------
    async def handle_info(self, stream: FramedStream) -> None:
        try:
            self.peers.check_banned(stream.remote_peer_id)  # refused at once, before reading
            with self._first_frame(stream.remote_peer_id):
                msg = await self._recv(stream, stream.remote_peer_id, self.limits.open_timeout_s)
            if not isinstance(msg, InfoRequest):
                raise InvalidMessage("expected info_req")
            await send_message(stream, self.node_info())
        except ShizaError as exc:
            await self._fail(stream, exc)
            return
        await stream.close()

    # ---- inference --------------------------------------------------------------------
    async def handle_inference(self, stream: FramedStream) -> None:
        session: _Session | None = None
        io: FramedStream = stream  # where the session's frames go: this stream, or its direct channel
        try:
            self._admit(stream.remote_peer_id)  # banned or not allowed: refused before reading
            with self._first_frame(stream.remote_peer_id):
                msg = await self._recv(stream, stream.remote_peer_id, self.limits.open_timeout_s)
            if msg is None:
                return
            if not isinstance(msg, OpenSession):
                raise InvalidMessage(f"expected open, got {type(msg).__name__}")
            session = await self._open(msg, stream.remote_peer_id)
            self._sessions[session.session_id] = session
            offer = None
            direct = self.direct
            if msg.direct_key is not None and direct is not None:
                try:
                    offer = direct.offer(msg.direct_key, stream.remote_peer_id)
                except ValueError as exc:
                    raise InvalidMessage(f"direct_key: {exc}") from None
            try:
                await send_message(stream, SessionOpened(
                    session.session_id, msg.start, msg.end, self.engine.hidden_size,
                    offer.port if offer else None, offer.public if offer else None,
                    windows=bool(getattr(self.engine, "windows", False)),
                    dtype=self.engine.dtype if self.engine.dtype in FLOAT_DTYPES else None,
                    vocab_size=self.engine.vocab_size))
                if offer is not None:  # SPEC 9.5: the session goes on over the direct channel
                    channel = await self._await_channel(stream, offer)
                    if channel is None:
                        raise Timeout("the client did not connect the direct channel it asked for")
                    io = channel
            finally:
                if offer is not None and direct is not None:
                    direct.withdraw(offer)
            await self._serve_steps(io, session)
        except ShizaError as exc:
            await self._fail(io, exc)
        except StreamBroken as exc:
            log.info("session stream broke: %s", exc)
        except Exception as exc:  # noqa: BLE001 - a bug must cost one stream, not the node
            log.exception("internal error in session")
            await self._fail(io, Internal(f"internal error: {type(exc).__name__}"))
        finally:
            if io is not stream:
                await io.close()
                with trio.move_on_after(2):
                    await stream.close()
            if session is not None:
                self._sessions.pop(session.session_id, None)
                if session.next is not None and self.links is not None:
                    self.links.release(session.next)
                    session.next = None
                self.peers.close_session(session.client, session.kv_tokens)
                self._close(session.session_id)
                await self._settle_broken(session)

    async def _await_channel(self, stream: FramedStream, offer: Offer) -> FramedStream | None:
        """The offer's direct channel, or None past the open timeout. A client that closes or
        resets the libp2p stream meanwhile gave up: StreamBroken ends the session at once.
        (The watch read is cancelled when the channel arrives, which resets the libp2p
        stream: from then on the channel alone carries the session.)"""
        channel: FramedStream | None = None

        async def watch() -> None:
            await stream.read_frame(64)
            raise StreamBroken("the client left before connecting its direct channel")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch)
            channel = await offer.wait(self.limits.open_timeout_s)
            nursery.cancel_scope.cancel()
        return channel

    @contextmanager
    def _first_frame(self, peer_id: str) -> Iterator[None]:
        """Count a stream waiting for its first frame against the peer's cap (Busy past it)."""
        self.peers.begin_wait(peer_id)
        try:
            yield
        finally:
            self.peers.end_wait(peer_id)

    async def _recv(self, stream: FramedStream, peer_id: str, timeout: float,
                    max_bytes: int = MAX_CONTROL_FRAME_BYTES) -> Message | None:
        """The next message of ``stream`` under ``max_bytes`` (a control message unless a
        session's Step bound is given). A frame that cannot be decoded or is over a limit is a
        strike against ``peer_id`` (repeated, a ban), then its error goes back as usual."""
        try:
            return await recv_message(stream, timeout, max_bytes)
        except _FRAME_VIOLATIONS as exc:
            self.peers.strike(peer_id, f"bad frame: {exc}")
            raise

    def _admit(self, peer_id: str) -> None:
        allow = self.limits.allow_peers
        if allow is not None and peer_id not in allow:
            raise NotAllowed("this node serves only the peers on its allow list")
        self.peers.check_banned(peer_id)

    async def _open(self, msg: OpenSession, client: str) -> "_Session":
        eng = self.engine
        if not self.accepting:
            raise Busy("node is draining; open the session elsewhere")
        if msg.model_id != eng.model_id:
            raise UnknownModel(f"this node serves {eng.model_id}, not {msg.model_id}")
        if not eng.start <= msg.start < msg.end <= eng.end:
            raise SpanNotServed(f"this node serves layers {eng.start}:{eng.end}, not {msg.start}:{msg.end}")
        if not 1 <= msg.batch_size <= self.limits.max_batch_size:
            raise InvalidMessage(f"batch_size must be in 1..{self.limits.max_batch_size}")
        if not 1 <= msg.max_length <= self.limits.max_length:
            raise InvalidMessage(f"max_length must be in 1..{self.limits.max_length}")
        # Always the server's: a client reusing an id would bill two sessions as one (SPEC 7.4).
        session_id = secrets.token_hex(16)
        sp = msg.sampling
        sampling = Sampling(sp.temperature, sp.top_p, sp.seed if sp.seed is not None else 0,
                            sp.grammar, sp.grammar_start or 0, sp.grammar_prefix or (), sp.logprobs,
                            sp.logit_bias or (), sp.presence_penalty or 0.0, sp.frequency_penalty or 0.0)
        layers = None if (msg.start, msg.end) == (eng.start, eng.end) else (msg.start, msg.end)
        kv_tokens = msg.batch_size * msg.max_length
        self._check_unpaid(client)  # a client over its unpaid work is refused (SPEC 17)
        if self.accounting is not None:
            # The receipts' sequence numbers continue from the ledger: read it off the trio
            # thread now, so that issuing a receipt later never touches SQLite.
            await self.accounting.seqs.prepare(self.accounting.identity.peer_id, client)
        await self.peers.acquire(client, kv_tokens)  # the peer's share: waits (bounded), then Busy

        def open_in_engine() -> None:
            eng.open_session(session_id, msg.batch_size, msg.max_length, sampling, layers)

        try:  # waits (bounded) for KV-cache room, then Busy: node/serve/scheduler.py
            await self.admission.open(eng, open_in_engine, kv_tokens)
        except BaseException as exc:
            self.peers.close_session(client, kv_tokens)
            if isinstance(exc, CapacityExceeded):
                raise Busy(str(exc)) from None
            if isinstance(exc, SessionUnknown):
                raise InvalidMessage(f"session id {session_id!r} is already open") from None
            if isinstance(exc, BadInput):
                raise InvalidMessage(str(exc)) from None
            raise
        self.stats.sessions_open += 1
        self.stats.sessions_total += 1
        if self.stats.sessions_open == 1:
            self._idle = trio.Event()
        account = None
        if self.accounting is not None:
            account = ServerAccount(
                self.accounting.identity, self.accounting.seqs, eng.model_id, msg.start, msg.end,
                client, session_id, every_tokens=self.accounting.every_tokens,
                unit_price=self.accounting.unit_price, swarm_id=self.accounting.swarm_id,
            )
        return _Session(session_id, msg.start, msg.end, account, client=client, kv_tokens=kv_tokens,
                        frame_limit=self._step_frame_limit(msg), last=msg.end == self._num_layers())

    def _num_layers(self) -> int | None:
        """Decoder layers of the served model, as the node's info states them."""
        for span in self.node_info().spans:
            if span.model_id == self.engine.model_id:
                return span.num_layers
        return None

    def _step_frame_limit(self, msg: OpenSession) -> int:
        """Bytes of the largest Step frame the session ``msg`` opens can need: a step of every
        row and all ``max_length`` tokens (ids on the first span, hidden states after it), its
        positions and mask (int64), and the rest of the message."""
        eng = self.engine
        per_token = 8 if msg.start == 0 else eng.hidden_size * itemsize(eng.dtype)
        per_token += 16
        return min(MAX_FRAME_BYTES, msg.batch_size * msg.max_length * per_token + MAX_CONTROL_FRAME_BYTES)

    def _close(self, session_id: str) -> None:
        try:
            self.engine.close_session(session_id)
        except Exception:  # noqa: BLE001 - already gone
            pass
        self.scheduler.forget(session_id)
        self.admission.released(self.engine)
        self.stats.sessions_open -= 1
        if self.stats.sessions_open == 0:
            self._idle.set()

    async def _store_issued(self, receipt: Receipt, reason: str = AWAITING_VERDICT) -> None:
        """Store a receipt before sending it (SPEC 16.9), in a worker thread: a node killed
        after sending holds it, so its seq (and id) is never issued again. One that cannot be
        stored is not sent: the session ends with Internal."""
        assert self.accounting is not None
        try:
            await trio.to_thread.run_sync(store_issued, self.accounting.ledger, receipt, reason)
        except LedgerError as exc:
            log.error("cannot store receipt %s before sending it: %s", receipt.receipt_id, exc)
            raise Internal("this node cannot record its receipt; session ended") from None

    async def _store(self, session: "_Session", receipt: Receipt, status: str, reason: str = "") -> None:
        """Record the client's verdict on a receipt stored by ``_store_issued``."""
        assert self.accounting is not None
        await trio.to_thread.run_sync(store_verdict, self.accounting.ledger, receipt, status, reason)
        self._judged(session, receipt, status)

    def _judged(self, session: "_Session", receipt: Receipt, status: str) -> None:
        """Count a receipt's final status; unpaid work past the limit is a strike (SPEC 17)."""
        self.stats.receipts[status] = self.stats.receipts.get(status, 0) + 1
        if session.account is None:
            return
        limit = self.limits.max_unpaid_work_units
        before = self.unpaid.of(session.client)
        after = self.unpaid.judged(session.client, session.account, receipt.work_units,
                                   paid=status == "countersigned")
        if before <= limit < after:
            self.peers.strike(session.client, f"{after} work units unpaid (disputed or never "
                                              f"countersigned), over the limit of {limit}")

    def _check_unpaid(self, client: str) -> None:
        """Refuse (a strike) to open a session for a client whose unpaid work is over the limit."""
        unpaid, limit = self.unpaid.of(client), self.limits.max_unpaid_work_units
        if unpaid > limit:
            raise self.peers.strike(client, f"{unpaid} work units unpaid (disputed or never "
                                            f"countersigned), over this node's limit of {limit}")

    async def _await_verdict(self, stream: FramedStream, session: "_Session", pending: Receipt,
                             msg: object) -> bool:
        """Store ``pending``'s verdict as the client's message decides; True if ``msg`` was consumed."""
        if isinstance(msg, Countersign) and msg.receipt_id == pending.receipt_id:
            try:
                signed = verify_receipt(pending.with_client_sig(msg.client_sig), require_countersigned=True)
            except ShizaError as exc:
                await self._store(session, pending, "server_only", f"bad countersignature: {exc}")
                raise
            await self._store(session, signed, "countersigned")
            self.peers.countersigned(signed.client)  # history: preferred under pressure (limits.py)
            return True
        if isinstance(msg, Dispute) and msg.receipt_id == pending.receipt_id:
            log.warning("client disputes receipt %s: %s", pending.receipt_id, msg.reason)
            await self._store(session, pending, "disputed", msg.reason)
            return True
        await self._store(session, pending, "server_only", "no countersignature before the next message")
        if msg is None or isinstance(msg, CloseSession):
            return False  # the client left, or closes now: the final receipt follows
        raise InvalidMessage(f"expected cosign or dispute for receipt {pending.receipt_id}")

    async def _serve_steps(self, stream: FramedStream, session: "_Session") -> None:
        with unwrap_single_groups():  # the session's error, not a group of one
            async with trio.open_nursery() as nursery:
                session.source = _Source(self, stream, session, nursery)
                try:
                    await self._serve_loop(stream, session, session.source)
                finally:
                    nursery.cancel_scope.cancel()

    async def _serve_loop(self, stream: FramedStream, session: "_Session", source: "_Source") -> None:
        account = session.account
        expected_step = 0
        while True:
            # While a receipt is pending only the client's verdict may come next (9.3): a
            # step pushed meanwhile waits for it (SPEC 9.6).
            msg, pushed = await source.next(self.limits.idle_timeout_s, client_only=session.pending is not None)
            if session.pending is not None:
                pending, session.pending = session.pending, None
                if await self._await_verdict(stream, session, pending, msg):
                    continue
            if msg is None:
                return  # the client went away; handle_inference settles what was done
            if isinstance(msg, CloseSession):
                final = account.issue(final=True) if account is not None else None
                if final is not None:
                    await self._store_issued(final)  # before it is sent
                await send_message(stream, Closed(final.to_bytes() if final else None))
                if final is not None:
                    session.final_sent = True
                    try:
                        verdict, _ = await source.next(self.limits.open_timeout_s, client_only=True)
                    except ShizaError:
                        verdict = None
                    await self._await_verdict(stream, session, final, verdict)
                await stream.close()
                return
            if isinstance(msg, Link):
                await self._link(stream, session, msg)
                continue
            if not isinstance(msg, Step):
                raise InvalidMessage(f"expected step or close, got {type(msg).__name__}")
            if pushed is not None:  # numbered by its sender: it is this session's next step
                msg = dataclasses.replace(msg, step=expected_step)
            if msg.step != expected_step:
                raise InvalidMessage(f"expected step {expected_step}, got {msg.step}")
            self._check_step(msg, session)
            nbytes = len(msg.input.data) + len(msg.positions.data) + (len(msg.mask.data) if msg.mask else 0)
            self.peers.step(session.client, int(msg.input.shape[0]) * int(msg.input.shape[1]), nbytes)
            engine = self.engine
            try:
                output, step_s, batch_rows = await self.scheduler.step_timed(
                    engine, session.session_id, msg.input, msg.positions, msg.mask, keep=msg.keep, draft=msg.draft)
            except BadInput as exc:
                raise BadShape(str(exc)) from None
            except (CapacityExceeded, SessionUnknown) as exc:  # our words, about this session
                raise SessionClosed(str(exc)) from None
            except EngineError as exc:  # its text is the engine's (paths, devices): kept here
                log.warning("engine failed a step of session %s: %s", session.session_id, exc)
                raise SessionClosed("the engine failed this step; open the session again") from None
            self.stats.steps_total += 1
            tokens = int(msg.input.shape[0]) * int(msg.input.shape[1])
            if msg.step == 0:
                self.stats.tokens_prefill += tokens
            else:
                self.stats.tokens_decode += tokens
            self.stats.work_units += tokens * (session.end - session.start)
            if self.hooks.on_step is not None:
                self.hooks.on_step(StepDone((engine.start, engine.end), msg.step == 0, batch_rows, step_s))
            if session.next is not None and not session.last:
                await self._push(session, msg, output)  # the critical path first (SPEC 9.6)
            receipt_bytes = None
            if account is not None:
                account.record(msg, output)
                if account.checkpoint_due():
                    receipt = account.issue(final=False)
                    await self._store_issued(receipt)  # before it is sent
                    session.pending = receipt
                    receipt_bytes = receipt.to_bytes()
            if pushed is not None:
                await send_message(stream, Pushed(msg.step, pushed[0], pushed[1]))
            logprobs = None
            take = getattr(engine, "take_logprobs", None) if session.last else None
            if take is not None:  # the session asked for them (SPEC 9.9)
                logprobs = take(session.session_id)
            await send_message(stream, StepResult(msg.step, output, receipt_bytes,
                                                  *(logprobs if logprobs is not None else (None, None))))
            expected_step += 1

    # ---- node-to-node flow (SPEC 9.6) -------------------------------------------------
    async def _link(self, stream: FramedStream, session: "_Session", msg: Link) -> None:
        """Apply a client's Link to its session and answer Linked."""
        if not self.push:  # what a node without node-to-node flow answers
            raise UnknownMessageType("unknown message type 'link'")
        if msg.prev_peer is not None and session.start == 0:
            raise InvalidMessage("the first span takes its steps from the client")
        session.prev_peer = msg.prev_peer
        if msg.prev_peer is not None and session.source is not None:
            session.source.merge()
            self._named.set()  # a link from that peer waiting to be allowed may go on
            self._named = trio.Event()
        if session.next is not None and self.links is not None:
            self.links.release(session.next)
        session.next, session.next_session = None, ""
        pushing, reason = False, ""
        if msg.next_peer is not None:
            if session.last:
                reason = "the last span answers the client only"
            elif self.links is None or self.identity is None:
                reason = "this node opens no links"
            else:
                try:
                    session.next = await self.links.acquire(msg.next_peer, msg.next_addrs)
                    session.next_session, pushing = msg.next_session, True
                    session.next_addrs = tuple(msg.next_addrs)
                except StreamBroken as exc:
                    reason = f"no link to {msg.next_peer}: {exc}"[:1000]
                    log.info("session %s: %s", session.session_id, reason)
        await send_message(stream, Linked(pushing, reason))

    async def _push(self, session: "_Session", step: Step, output: Tensor) -> None:
        """Push ``output`` to the next hop's session, signed. A link that fails is opened again
        once and the push sent there (the node it pushes to may have restarted since the link
        was made: the old link is dead, the new session is there); a push that fails on that
        too drops the link: the session goes on, and its client (whose next hop reports
        nothing) re-links."""
        link = session.next
        assert link is not None and self.identity is not None
        nxt = dataclasses.replace(step, input=output)  # keep and draft go on with it (9.7)
        if self.push_fault is not None:
            nxt = dataclasses.replace(nxt, input=self.push_fault(output))
        sig = sign_push(self.identity, push_digest(session.next_session, nxt))
        push = Push(session.next_session, session.client, nxt.step, nxt.input, nxt.positions, sig,
                    nxt.mask, nxt.keep, nxt.draft)
        for attempt in range(2):
            try:
                await link.send(push)
                self.pushes_out += 1
                return
            except StreamBroken as exc:
                log.info("push of session %s to %s failed: %s", session.session_id, link.peer_id, exc)
                if self.links is not None:
                    self.links.release(link)
                session.next = None
            if attempt or self.links is None:
                return
            try:
                link = session.next = await self.links.acquire(link.peer_id, session.next_addrs)
            except StreamBroken as exc:
                log.info("session %s: no new link to %s: %s", session.session_id, link.peer_id, exc)
                return

    async def handle_link(self, stream: FramedStream) -> None:
        """A node linking to us to push steps: allowed when an open session names it."""
        peer = stream.remote_peer_id
        io: FramedStream = stream
        try:
            self._admit(peer)
            if not self.push:
                raise NotAllowed("this node takes no pushed steps")
            with self._first_frame(peer):  # bounded per peer, like streams before their first frame
                await self._until_named(peer)
                io, _ = await accept_link(stream, self.direct, self.limits.open_timeout_s)
            await self._serve_link(io, peer)
        except ShizaError as exc:
            await self._fail(io, exc)
        except StreamBroken as exc:
            log.info("link from %s broke: %s", peer, exc)
        finally:
            await io.close()
            if io is not stream:
                with trio.move_on_after(2):
                    await stream.close()

    async def _until_named(self, peer: str) -> None:
        """Return once an open session names ``peer`` as the one pushing to it; NotAllowed
        past LINK_NAME_WAIT_S (the client links every hop at once, so a link may arrive just
        before the Link that allows it)."""
        with trio.move_on_after(LINK_NAME_WAIT_S):
            while not any(s.prev_peer == peer for s in self._sessions.values()):
                await self._named.wait()
            return
        raise NotAllowed("no session on this node takes pushes from you")

    async def _serve_link(self, io: FramedStream, peer: str) -> None:
        """Hand each Push from ``peer`` to its session, after checking that the session takes
        pushes from ``peer`` for the same client and that ``peer`` signed it."""
        while True:
            # The protocol's frame limit, not the sessions' of this moment: the next push may be
            # for a session opened while this read waits (a long prompt after a short one; it was
            # refused as too large). The peer is one an open session named; each push is then
            # checked against its own session's limits as any step.
            try:
                msg = await self._recv(io, peer, self.limits.idle_timeout_s, MAX_FRAME_BYTES)
            except Timeout:
                return  # an idle link: its sender opens another when it needs one
            if msg is None:
                return
            if not isinstance(msg, Push):
                raise self._violation(peer, InvalidMessage(f"a link carries pushes, got {type(msg).__name__}"))
            session = self._sessions.get(msg.session_id)
            if session is None:
                log.info("push from %s for session %s, which is not open here", peer, msg.session_id)
                continue  # it ended meanwhile (or failed over): nothing to do with the step
            if session.prev_peer != peer or session.client != msg.client:
                raise self._violation(peer, NotAllowed(
                    f"session {msg.session_id} takes no pushes from you for {msg.client}"))
            step = msg.as_step()
            digest = push_digest(msg.session_id, step)
            try:
                verify_push(peer, digest, msg.sig)
            except ShizaError as exc:
                raise self._violation(peer, exc) from None
            assert session.source is not None
            if not session.source.pushed(step, digest, msg.sig):
                raise self._violation(peer, LimitExceeded(f"pushes to session {msg.session_id} faster than it steps"))
            self.pushes_in += 1

    async def _settle_broken(self, session: "_Session") -> None:
        """After a stream ended without a countersigned final receipt, keep what was done."""
        account = session.account
        if account is None:
            return
        with trio.CancelScope(shield=True):
            if session.pending is not None:
                await self._store(session, session.pending, "server_only",
                                  "stream ended before countersignature")
                session.pending = None
            if not session.final_sent and account.unreceipted():
                receipt = account.issue(final=True)  # never sent: stored as it stays
                try:
                    await self._store_issued(receipt, "session ended by failure")
                except Internal:
                    return
                self._judged(session, receipt, "server_only")

    def _check_step(self, msg: Step, session: "_Session") -> None:
        eng = self.engine
        shape = msg.input.shape
        if session.start == 0:
            if msg.input.dtype not in ("int64", "int32") or len(shape) != 2:
                raise BadShape(f"the first span takes token ids [B, T], got {msg.input.dtype} {shape}")
        else:
            if msg.input.dtype != eng.dtype or len(shape) != 3 or shape[2] != eng.hidden_size:
                raise BadShape(
                    f"expected hidden states [B, T, {eng.hidden_size}] of {eng.dtype}, "
                    f"got {msg.input.dtype} {list(shape)}"
                )
        if msg.positions.dtype != "int64" or tuple(msg.positions.shape) != tuple(shape[:2]):
            raise BadShape(f"positions must be int64 {list(shape[:2])}, got {msg.positions.dtype} {list(msg.positions.shape)}")
        if msg.mask is not None and (msg.mask.dtype != "int64" or tuple(msg.mask.shape) != tuple(shape[:2])):
            raise BadShape(f"mask must be int64 {list(shape[:2])}")
        if shape[0] * shape[1] * (shape[2] if len(shape) == 3 else 1) > MAX_TENSOR_ELEMENTS:
            raise BadShape("step too large")
        # The output, before computing it: token ids [B] on the last span ([B, T] for a window
        # step), else hidden states [B, T, H] (from ids, the first span's output can be thousands
        # of times its input).
        last_out = shape[0] * shape[1] if msg.draft is not None else shape[0]
        out_elements = last_out if session.last else shape[0] * shape[1] * eng.hidden_size
        out_bytes = out_elements * (8 if session.last else itemsize(eng.dtype))
        if out_elements > MAX_TENSOR_ELEMENTS or out_bytes + MAX_CONTROL_FRAME_BYTES > MAX_FRAME_BYTES:
            raise self._violation(session.client, LimitExceeded(
                f"step output of {out_elements} elements ({out_bytes} bytes) is over the frame limits "
                f"(MAX_TENSOR_ELEMENTS {MAX_TENSOR_ELEMENTS}, MAX_FRAME_BYTES {MAX_FRAME_BYTES})"))

    def _violation(self, peer_id: str, exc: ShizaError) -> ShizaError:
        """Count ``exc`` as a strike against ``peer_id``; returns it to raise."""
        self.peers.strike(peer_id, str(exc))
        return exc

    async def _fail(self, stream: FramedStream, exc: ShizaError) -> None:
        self.stats.errors_by_code[exc.code] = self.stats.errors_by_code.get(exc.code, 0) + 1
        log.info("closing stream with error %s: %s", exc.code, exc)
        with trio.move_on_after(2):
            try:
                await send_message(stream, Error.from_exception(exc))
                await stream.close()
            except Exception:  # noqa: BLE001 - the peer may be gone already
                await stream.reset()

    async def drain(self, timeout_s: float) -> bool:
        """Stop accepting sessions and wait (bounded) for running ones; True if all finished."""
        self.accepting = False
        with trio.move_on_after(timeout_s):
            await self._idle.wait()
            return True
        return False


_PUSH_QUEUE = 16  # messages queued for a session that takes pushes (client's and pushed)


class _Source:
    """Where a session's messages come from: its stream alone, until a Link names a peer that
    pushes steps to it; from then on (``merge``) a task reads the stream into a queue that the
    link also feeds, and ``next`` takes from that queue in arrival order (a pushed step can be
    held back while the client's verdict on a receipt is due)."""

    def __init__(self, server: SpanServer, stream: FramedStream, session: _Session, nursery: trio.Nursery) -> None:
        self.server = server
        self.stream = stream
        self.session = session
        self.nursery = nursery
        self.merged = False
        self._send, self._recv = trio.open_memory_channel[tuple](_PUSH_QUEUE)
        self._held: deque[tuple] = deque()

    def merge(self) -> None:
        if not self.merged:
            self.merged = True
            self.nursery.start_soon(self._pump)

    def pushed(self, step: Step, digest: bytes, sig: bytes) -> bool:
        """Queue a pushed step; False when the queue is full (the sender is flooding)."""
        try:
            self._send.send_nowait(("push", step, (digest, sig)))
            return True
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False

    async def _pump(self) -> None:
        session = self.session
        try:
            while True:
                msg = await self.server._recv(self.stream, session.client, None, session.frame_limit)
                await self._send.send(("client", msg, None))
                if msg is None:
                    return
        except (ShizaError, StreamBroken) as exc:
            await self._send.send(("error", exc, None))

    async def next(self, timeout: float, *, client_only: bool = False) -> tuple[Message | None, tuple[bytes, bytes] | None]:
        """(message, (digest, sig) of a pushed step or None). Raises as ``_recv`` does."""
        if not self.merged:
            return await self.server._recv(self.stream, self.session.client, timeout, self.session.frame_limit), None
        if not client_only and self._held:
            _, msg, pushed = self._held.popleft()
            return msg, pushed
        try:
            with trio.fail_after(timeout):
                while True:
                    kind, msg, pushed = await self._recv.receive()
                    if kind == "error":
                        raise msg
                    if kind == "push" and client_only:
                        self._held.append((kind, msg, pushed))
                        continue
                    return msg, pushed
        except trio.TooSlowError:
            raise Timeout(f"no message within {timeout:g} s") from None
