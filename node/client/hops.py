"""One hop's inference session, from the client's side: open, step, receipts, close.

A hop is one peer running layers ``start:end`` for one generation (SPEC.md, "Inference
session"). ``HopSessions`` opens its session through a ``Connector`` (libp2p in a real swarm,
memory in one process), moves the session's frames to a direct channel when the node offers
one (SPEC 9.5; when connecting it fails the hop is opened once more without asking), drives
its steps, checks and countersigns (or disputes) its receipts, and closes it.

This is the lowest layer of the client that sees the network, so every failure is converted
here into the client's errors (node/client/errors.py): StreamBroken or a stream that ends
becomes PeerUnreachable, an Error frame the peer's PeerError (e.g. PeerBusy), a message that
breaks the protocol (or a stall past ``step_timeout_s``) the PeerError of that violation.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

import trio

from protocol import direct as direct_wire
from protocol.codec import Tensor
from protocol.errors import InvalidMessage, InvalidSignature, ShizaError, UnknownMessageType
from protocol.identity import Identity
from protocol.ids import DEFAULT_SWARM_ID, INFERENCE_PROTOCOL, MAX_ADDRS
from protocol.messages import (
    CloseSession,
    Closed,
    Countersign,
    Dispute,
    Error,
    Message,
    OpenSession,
    SamplingParams,
    SessionOpened,
    Step,
    StepResult,
)
from protocol.push import Link, Linked, Pushed, push_digest, verify_push

from node.client.errors import InvalidRequest, PeerError, PeerUnreachable, peer_error
from node.client.health import PeerHealth, RttTracker
from node.client.outputs import check_output
from node.client.routing import Hop, relayed_only
from node.ledger.accounting import ClientAccount, record, seq_floor, store
from node.ledger.store import DuplicateEntry, Ledger
from node.net.direct import connect as connect_direct
from node.net.streams import Connector, FramedStream, StreamBroken
from node.net.wire import recv_message, send_message, take_positions

__all__ = ["CLOSE_TIMEOUT_S", "STEP_TIMEOUT_S", "HopSession", "HopSessions", "PushUnsupported", "SessionSpec",
           "StepInput", "TamperedPush"]

log = logging.getLogger(__name__)

STEP_TIMEOUT_S = 60.0  # a hop that answers no step within this is taken for stalled
CLOSE_TIMEOUT_S = 10.0
# A node whose direct channel failed to connect is asked for none for this long, doubling on
# each further failure up to DIRECT_RETRY_MAX_S (its sessions stay on libp2p meanwhile).
DIRECT_RETRY_BASE_S = 30.0
DIRECT_RETRY_MAX_S = 600.0

StepInput = tuple[Tensor, Tensor, Tensor]  # what one step sent a hop: (input, positions, mask)


@dataclass(frozen=True)
class SessionSpec:
    """What every hop session of one generation is opened with."""

    model_id: str
    batch: int
    max_length: int
    sampling: SamplingParams
    num_layers: int | None = None  # the model's; a hop ending there answers token ids (None: unknown)
    vocab_size: int | None = None  # token ids lie below it (None: unknown; see node/client/outputs.py)


@dataclass
class HopSession:
    hop: Hop
    stream: FramedStream  # the session's frames: its libp2p stream or direct channel
    session_id: str
    account: ClientAccount
    anchor: FramedStream | None = None  # the stream the session was opened on, if it moved
    steps: int = 0
    # Every input sent to this hop, so a replacement can rebuild its KV cache (failover).
    history: list[StepInput] = field(default_factory=list)
    spec: SessionSpec | None = None  # what it was opened with: its outputs are checked against it
    hidden_size: int = 0  # as its SessionOpened said
    # The float dtype of its hidden-state outputs: as its SessionOpened said, else its first one's.
    out_dtype: str | None = None
    vocab_size: int | None = None  # as its SessionOpened said: its token ids lie below it
    # Node-to-node flow (SPEC 9.6): its input is pushed by the hop before it; it pushes its
    # output to the hop after it.
    pushed_in: bool = False
    pushing: bool = False
    stream_ended_on_link: bool = False  # it answered Link as unknown: the session is over
    windows: bool = False  # it runs window steps (SPEC 9.7), as its SessionOpened said
    logprobs: tuple[Tensor, Tensor] | None = None  # its last step's (SPEC 9.9), if it reported them

    def trim_last(self, positions: int) -> None:
        """Keep only the first ``positions`` of the last step in the history: a window step
        (SPEC 9.7) whose later drafts were not accepted, so a replay rebuilds exactly the cache
        the hop keeps (``keep`` of the next step cuts the rest)."""
        payload, pos, mask = self.history[-1]
        self.history[-1] = (take_positions(payload, positions), take_positions(pos, positions),
                            take_positions(mask, positions))

    async def reset(self) -> None:
        """Abandon the session: its frames' transport and the stream it was opened on."""
        await self.stream.reset()
        if self.anchor is not None:
            await self.anchor.reset()


class PushUnsupported(Exception):
    """The hop does not take Link (a node without SPEC 9.6): its session ended; open it again."""


class TamperedPush(PeerError):
    """A hop pushed the next hop something other than the output it reported (its own
    signature shows it): that hop is to blame, not the one that received it."""

    name = "tampered_push"


class _DirectFailed(Exception):
    """The node offered a direct channel but connecting it failed (opened again without)."""


class HopSessions:
    """Opens, drives and closes hop sessions for one client (see the module docstring)."""

    def __init__(self, connector: Connector, identity: Identity, ledger: Ledger | None = None, *,
                 swarm_id: str = DEFAULT_SWARM_ID, step_timeout_s: float = STEP_TIMEOUT_S,
                 direct: bool = True, rtt: RttTracker | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.connector = connector
        self.identity = identity
        self.ledger = ledger
        self.swarm_id = swarm_id  # receipts must name it
        self.step_timeout_s = step_timeout_s
        # Ask nodes for a direct activation channel (SPEC 9.5); a peer where connecting it
        # failed is asked again only after a back-off (its sessions stay on libp2p meanwhile).
        self.direct = direct
        self.clock = clock
        self.direct_backoff = PeerHealth(DIRECT_RETRY_BASE_S, DIRECT_RETRY_MAX_S)
        self.direct_sessions = 0  # hop sessions that ran over a direct channel
        self.rtt = rtt or RttTracker()
        self.countersigned: dict[str, int] = {}  # receipts countersigned per server, this client's life

    async def open(self, spec: SessionSpec, hop: Hop) -> HopSession:
        """Open the hop's session; over a direct channel where the node offers one and it
        connects, else (or when it fails to connect: once more without asking) on the stream."""
        # A peer reached only through relays has no address of its own to take a direct
        # channel at (its connection ends at the relay): not asked, no failed try to back off.
        relayed = relayed_only(hop.addrs)
        if self.direct and not relayed and hop.peer_id not in self.direct_backoff.avoided(self.clock()):
            try:
                opened = await self._open_once(spec, hop, direct=True)
            except _DirectFailed as exc:
                again = self.direct_backoff.failed(hop.peer_id, self.clock()) - self.clock()
                log.info("direct channel to %s failed (%s); using its libp2p stream, asking again "
                         "in %.0f s", hop.peer_id, exc, again)
            else:
                if opened.anchor is not None:  # it connected: forget earlier failures
                    self.direct_backoff.succeeded(hop.peer_id)
                return opened
        return await self._open_once(spec, hop, direct=False)

    @property
    def direct_failed(self) -> frozenset[str]:
        """Peers whose direct channel failed and that are not asked for one now."""
        return self.direct_backoff.avoided(self.clock())

    async def _open_once(self, spec: SessionSpec, hop: Hop, *, direct: bool) -> HopSession:
        public, secret = direct_wire.keypair() if direct else (None, None)
        try:
            request = OpenSession(spec.model_id, hop.start, hop.end, spec.max_length, spec.batch,
                                  spec.sampling, direct_key=public)
        except ShizaError as exc:  # the caller's batch or length is out of the protocol's range
            raise InvalidRequest(f"cannot open a session: {exc}") from None
        floor = await seq_floor(self.ledger, hop.peer_id, self.identity.peer_id)  # settlement (9.3)
        t0 = time.perf_counter()
        try:
            stream = await self.connector.open_stream(hop.peer_id, INFERENCE_PROTOCOL, hop.addrs)
        except StreamBroken as exc:
            raise _unreachable(hop, f"cannot open a stream: {exc}") from None
        try:
            await send_message(stream, request)
            opened = _expect(await recv_message(stream, self.step_timeout_s), SessionOpened, hop)
            if opened.direct_port is not None and public is None:
                raise InvalidMessage("the node offered a direct channel nobody asked for")
        except (ShizaError, StreamBroken) as exc:
            await stream.reset()
            raise _converted(exc, hop) from None
        self.rtt.observe(hop.peer_id, time.perf_counter() - t0)
        account = ClientAccount(self.identity, hop.peer_id, spec.model_id, hop.start, hop.end,
                                opened.session_id, swarm_id=self.swarm_id, seq_floor=floor)
        checked = {"spec": spec, "hidden_size": opened.hidden_size, "windows": opened.windows,
                   "out_dtype": opened.dtype, "vocab_size": opened.vocab_size}
        if opened.direct_port is None or public is None or secret is None:
            return HopSession(hop, stream, opened.session_id, account, **checked)
        try:
            ip = self.connector.remote_ip(stream)
            if ip is None:
                raise StreamBroken("no IP address for this peer's connection")
            channel = await connect_direct(ip, opened.direct_port, opened.direct_key or b"",
                                           hop.peer_id, public, secret, self.step_timeout_s)
        except StreamBroken as exc:
            await stream.reset()
            raise _DirectFailed(str(exc)) from None
        self.direct_sessions += 1
        return HopSession(hop, channel, opened.session_id, account, anchor=stream, **checked)

    async def step(self, h: HopSession, payload: Tensor, pos: Tensor, mask: Tensor, *,
                   keep: int | None = None, draft: Tensor | None = None) -> Tensor:
        """One step on one hop: its output. Any failure, or a stall past the step timeout,
        raises PeerError (the caller fails the hop over), and so does an output that this
        session cannot have (node/client/outputs.py): that hop's receipt for it is disputed.
        ``keep`` and ``draft``: a window step's (SPEC 9.7)."""
        await self.send_step(h, payload, pos, mask, keep=keep, draft=draft)
        return await self.result(h, payload, pos, mask, keep=keep, draft=draft)

    async def send_step(self, h: HopSession, payload: Tensor, pos: Tensor, mask: Tensor, *,
                        keep: int | None = None, draft: Tensor | None = None) -> None:
        """Send the hop its next Step (its answer is read by ``result``)."""
        try:
            await send_message(h.stream, Step(h.steps, payload, pos, mask, keep, draft))
        except (ShizaError, StreamBroken) as exc:
            raise _converted(exc, h.hop) from None

    async def result(self, h: HopSession, payload: Tensor, pos: Tensor, mask: Tensor, *,
                     timeout_s: float | None = None, pushed_from: "HopSession | None" = None,
                     keep: int | None = None, draft: Tensor | None = None) -> Tensor:
        """The hop's answer to its step whose input is ``payload`` (sent by us, or, with
        ``pushed_from``, that hop's output, pushed to it: then its ``Pushed`` report comes first
        and is checked against ``payload``; SPEC 9.6). Raises as ``step``; TamperedPush (naming
        ``pushed_from``) when the sender's signature shows it pushed something else."""
        step = Step(h.steps, payload, pos, mask, keep, draft)
        timeout_s = self.step_timeout_s if timeout_s is None else timeout_s
        try:
            reply = await recv_message(h.stream, timeout_s)
            if pushed_from is not None:
                self._check_pushed(h, pushed_from, step, _expect(reply, Pushed, h.hop))
                reply = await recv_message(h.stream, timeout_s)
            result = _expect(reply, StepResult, h.hop)
            if result.step != h.steps:
                raise InvalidMessage(f"answered step {result.step}, expected {h.steps}")
            await self._check_output(h, payload, result, window=draft is not None)
            if result.logprobs is not None:  # SPEC 9.9: only what was asked for
                asked = h.spec.sampling.logprobs if h.spec is not None else None
                if asked is None or result.top_ids.shape[-1] != asked:  # type: ignore[union-attr]
                    raise InvalidMessage(f"log-probabilities of {result.top_ids.shape[-1]} top tokens; "  # type: ignore[union-attr]
                                         f"the session asked for {asked}")
            h.logprobs = None if result.logprobs is None else (result.logprobs, result.top_ids)  # type: ignore[assignment]
            h.account.record(step, result.output)
            if result.receipt is not None:
                await self._judge(h, result.receipt)
        except (ShizaError, StreamBroken) as exc:
            raise _converted(exc, h.hop) from None
        h.history.append((payload, pos, mask))
        h.steps += 1
        return result.output

    def _check_pushed(self, h: HopSession, sender: HopSession, step: Step, pushed: Pushed) -> None:
        """The hop's report of what ``sender`` pushed it, against what ``sender`` reported to us."""
        if pushed.step != step.step:
            raise InvalidMessage(f"reported a push for step {pushed.step}, expected {step.step}")
        try:
            verify_push(sender.hop.peer_id, pushed.input_digest, pushed.sig)
        except InvalidSignature:  # it cannot show what it received: its own fault
            raise InvalidSignature(f"its report of step {step.step}'s push is not signed by "
                                   f"{sender.hop.peer_id}") from None
        sent = dataclasses.replace(step, step=sender.steps - 1)  # numbered by its sender
        if pushed.input_digest != push_digest(h.session_id, sent):
            raise TamperedPush(f"pushed step {step.step} to {h.hop.peer_id} altered (its signature "
                               f"differs from the output it reported)", peer_id=sender.hop.peer_id,
                               layers=(sender.hop.start, sender.hop.end))

    async def link(self, h: HopSession, prev: "HopSession | None", nxt: "HopSession | None") -> bool:
        """Tell the hop whose pushes it takes (``prev``) and where it pushes (``nxt``);
        True when it pushes to ``nxt``. PushUnsupported for a node without SPEC 9.6 (its
        session is over); PeerError when the hop fails."""
        msg = Link(prev.hop.peer_id if prev else None, nxt.hop.peer_id if nxt else None,
                   nxt.session_id if nxt else "", tuple(nxt.hop.addrs)[:MAX_ADDRS] if nxt else ())
        try:
            await send_message(h.stream, msg)
            reply = await recv_message(h.stream, self.step_timeout_s)
            if isinstance(reply, Error) and reply.code == UnknownMessageType.code:
                h.stream_ended_on_link = True
                raise PushUnsupported(reply.message)
            linked = _expect(reply, Linked, h.hop)
        except (ShizaError, StreamBroken) as exc:
            raise _converted(exc, h.hop) from None
        if nxt is not None and not linked.pushing:
            log.info("%s does not push to %s: %s", h.hop.peer_id, nxt.hop.peer_id, linked.reason)
        return linked.pushing

    async def _check_output(self, h: HopSession, payload: Tensor, result: StepResult, *,
                            window: bool = False) -> None:
        """Raise (BadShape or InvalidMessage) when ``result`` cannot answer this step of this
        session, after disputing the receipt that came with it: the hop is not paid for it."""
        spec = h.spec
        if spec is None:
            return
        last = None if spec.num_layers is None else h.hop.end == spec.num_layers
        vocabs = [v for v in (spec.vocab_size, h.vocab_size) if v is not None]  # the tighter bound
        try:
            check_output(result.output, batch=spec.batch, length=payload.shape[1], hidden_size=h.hidden_size,
                         last=last, dtype=h.out_dtype, vocab_size=min(vocabs, default=None), window=window)
        except ShizaError as exc:
            h.account.disputed_reason = f"step {h.steps}: {exc}"
            if result.receipt is not None:
                await self._judge(h, result.receipt)
            raise
        if result.output.dtype != "int64":
            h.out_dtype = result.output.dtype

    async def close(self, h: HopSession) -> None:
        """Close one hop's session and settle its final receipt (best effort, never raises)."""
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

    async def _judge(self, h: HopSession, data: bytes) -> None:
        """Check a receipt against what we sent and received (and the session's receipts
        before it); countersign or dispute it. The verdict is stored before it is sent: a
        countersignature the server holds is always in our ledger too. A receipt whose id, seq
        or checkpoint our ledger already holds (a server reusing numbers) is disputed."""
        receipt, client_sig, reason = h.account.judge(data)
        if receipt is None:
            log.warning("unreadable receipt from %s: %s", h.hop.peer_id, reason)
            return
        recorded = False  # the ledger already holds its id, seq or checkpoint
        if client_sig is not None:
            try:
                await trio.to_thread.run_sync(record, self.ledger, receipt, "countersigned", "")
            except DuplicateEntry as exc:
                client_sig, reason, recorded = None, f"already recorded: {exc}", True
                h.account.refuse(receipt, reason)
        if client_sig is not None:
            await send_message(h.stream, Countersign(receipt.receipt_id, client_sig))
            self.countersigned[h.hop.peer_id] = self.countersigned.get(h.hop.peer_id, 0) + 1
        else:
            log.warning("disputing receipt %s from %s: %s", receipt.receipt_id, h.hop.peer_id, reason)
            if not recorded:
                await trio.to_thread.run_sync(store, self.ledger, receipt, "disputed", reason)
            await send_message(h.stream, Dispute(receipt.receipt_id, reason[:1000]))


M = TypeVar("M", bound=Message)


def _expect(reply: Message | None, cls: type[M], hop: Hop) -> M:
    if isinstance(reply, cls):
        return reply
    if isinstance(reply, Error):
        raise peer_error(reply.to_exception(), peer_id=hop.peer_id, layers=(hop.start, hop.end))
    if reply is None:
        raise _unreachable(hop, "it closed the stream")
    raise InvalidMessage(f"it sent {type(reply).__name__}, expected {cls.__name__}")


def _unreachable(hop: Hop, reason: str) -> PeerUnreachable:
    return PeerUnreachable(reason, peer_id=hop.peer_id, layers=(hop.start, hop.end))


def _converted(exc: ShizaError | StreamBroken, hop: Hop) -> PeerError:
    """What a failure while talking to ``hop`` is to the client's callers."""
    if isinstance(exc, StreamBroken):
        return _unreachable(hop, str(exc))
    return peer_error(exc, peer_id=hop.peer_id, layers=(hop.start, hop.end))
